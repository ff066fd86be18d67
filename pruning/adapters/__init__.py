"""Architecture adapters: the only place Hugging Face weight names appear in pruning.

``adapter_for(config)`` picks one by the ``architectures`` entry of config.json. A checkpoint
already sliced into the actprune architecture (per-layer widths) names its base family in
``actprune_base_architecture``. Adding a family = one module with an ``ADAPTER`` and a line here.
"""

from __future__ import annotations

from typing import Any

from . import llama, qwen2, qwen3
from .base import Adapter, LayerShape, ModelShape, Role, TensorRef

__all__ = [
    "ACTPRUNE_ARCHITECTURE",
    "ADAPTERS",
    "Adapter",
    "LayerShape",
    "ModelShape",
    "Role",
    "TensorRef",
    "adapter_for",
]

ACTPRUNE_ARCHITECTURE = "ActpruneForCausalLM"

ADAPTERS: dict[str, Adapter] = {a.architecture: a for a in (qwen3.ADAPTER, qwen2.ADAPTER, llama.ADAPTER)}


def adapter_for(config: dict[str, Any]) -> Adapter:
    """The adapter of a config dict; ValueError naming the supported architectures otherwise."""
    archs = list(config.get("architectures") or [])
    if ACTPRUNE_ARCHITECTURE in archs:
        archs = [config.get("actprune_base_architecture", "")]
    for a in archs:
        if a in ADAPTERS:
            return ADAPTERS[a]
    raise ValueError(
        f"unsupported architecture {archs or '(config.json has no `architectures`)'}; "
        f"actprune can prune {sorted(ADAPTERS)}"
    )
