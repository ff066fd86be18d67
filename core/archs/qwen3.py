"""Qwen3 (dense): the Llama layout plus per-head-dim ``q_norm`` / ``k_norm`` (one weight of
head_dim shared by all heads, so copied whole when heads are pruned)."""

from __future__ import annotations

from .spec import ArchSpec, HfLayout, VllmLayout

__all__ = ["SPEC"]

SPEC = ArchSpec(
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    hf=HfLayout(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
    vllm=VllmLayout(decoder_layer="vllm.model_executor.models.qwen3:Qwen3DecoderLayer"),
    tiny_config={"attention_bias": False},
)
