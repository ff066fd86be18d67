"""Llama (Llama 2/3, SmolLM2): the plain layout, no attention or MLP biases."""

from __future__ import annotations

from .spec import ArchSpec

__all__ = ["SPEC"]

SPEC = ArchSpec(
    architecture="LlamaForCausalLM",
    model_type="llama",
    tiny_config={"attention_bias": False, "mlp_bias": False},
)
