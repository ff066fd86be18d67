"""Llama (Llama 2/3, SmolLM2): the plain layout, no attention or MLP biases."""

from __future__ import annotations

from ._common import GLOBAL_NAMES, LLAMA_LAYER_ROLES
from .base import Adapter

__all__ = ["ADAPTER"]

ADAPTER = Adapter(
    architecture="LlamaForCausalLM",
    model_type="llama",
    layer_roles=dict(LLAMA_LAYER_ROLES),
    global_names=GLOBAL_NAMES,
)
