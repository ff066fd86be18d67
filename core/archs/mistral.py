"""Mistral (7B v0.1/v0.3, Ministral-style checkpoints in Hugging Face format): the Llama
layout; vLLM serves it with its own ``MistralDecoderLayer`` (same call as Llama's)."""

from __future__ import annotations

from .spec import ArchSpec, VllmLayout

__all__ = ["SPEC"]

SPEC = ArchSpec(
    architecture="MistralForCausalLM",
    model_type="mistral",
    vllm=VllmLayout(decoder_layer="vllm.model_executor.models.mistral:MistralDecoderLayer"),
    tiny_config={"sliding_window": None},
)
