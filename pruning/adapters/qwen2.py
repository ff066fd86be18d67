"""Qwen2 / Qwen2.5: Llama layout plus biases on q/k/v (sliced with their heads)."""

from __future__ import annotations

from ._common import GLOBAL_NAMES, LLAMA_LAYER_ROLES
from .base import Adapter, Role

__all__ = ["ADAPTER"]

ADAPTER = Adapter(
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    layer_roles={
        **LLAMA_LAYER_ROLES,
        "self_attn.q_proj.bias": Role.Q_ROWS,
        "self_attn.k_proj.bias": Role.KV_ROWS,
        "self_attn.v_proj.bias": Role.KV_ROWS,
    },
    global_names=GLOBAL_NAMES,
    qkv_bias=True,
)
