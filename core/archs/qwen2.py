"""Qwen2 / Qwen2.5: the Llama layout plus biases on q/k/v (sliced with their heads).

vLLM's ``Qwen2Attention`` derives head_dim as hidden_size // num_heads, which is wrong once
heads are pruned, so the actprune architecture builds Qwen2 layers as vLLM Llama layers with
q/k/v biases: they read the explicit ``head_dim`` and are otherwise the same computation.
"""

from __future__ import annotations

from .spec import ArchSpec, VllmLayout

__all__ = ["SPEC"]

SPEC = ArchSpec(
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    qkv_bias=True,
    vllm=VllmLayout(layer_config={"qkv_bias": True, "attention_bias": False}),
)
