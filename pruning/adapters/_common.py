"""Tensor names shared by the Llama-style families (Qwen2, Qwen3, Llama)."""

from __future__ import annotations

from .base import Role

__all__ = ["GLOBAL_NAMES", "LLAMA_LAYER_ROLES"]

GLOBAL_NAMES = frozenset({"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"})

LLAMA_LAYER_ROLES: dict[str, Role] = {
    "input_layernorm.weight": Role.COPY,
    "post_attention_layernorm.weight": Role.COPY,
    "self_attn.q_proj.weight": Role.Q_ROWS,
    "self_attn.k_proj.weight": Role.KV_ROWS,
    "self_attn.v_proj.weight": Role.KV_ROWS,
    "self_attn.o_proj.weight": Role.Q_COLS,
    "mlp.gate_proj.weight": Role.NEURON_ROWS,
    "mlp.up_proj.weight": Role.NEURON_ROWS,
    "mlp.down_proj.weight": Role.NEURON_COLS,
}
