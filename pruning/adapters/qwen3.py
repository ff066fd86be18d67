"""Qwen3: Llama layout plus per-head-dim `q_norm` / `k_norm` (shared by all heads, so copied)."""

from __future__ import annotations

from ._common import GLOBAL_NAMES, LLAMA_LAYER_ROLES
from .base import Adapter, Role

__all__ = ["ADAPTER"]

ADAPTER = Adapter(
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    layer_roles={
        **LLAMA_LAYER_ROLES,
        "self_attn.q_norm.weight": Role.COPY,
        "self_attn.k_norm.weight": Role.COPY,
    },
    global_names=GLOBAL_NAMES,
    qk_norm=True,
)
