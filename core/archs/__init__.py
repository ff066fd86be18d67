"""The architecture registry: one :class:`ArchSpec` per family, the only place where
architecture names and module/tensor names are written (see :mod:`.spec` for what a spec holds).

=========================  ===========  =========================================
architecture               model_type   family file
=========================  ===========  =========================================
``Qwen3ForCausalLM``       qwen3        :mod:`.qwen3`
``Qwen2ForCausalLM``       qwen2        :mod:`.qwen2`
``LlamaForCausalLM``       llama        :mod:`.llama` (SmolLM2 too)
``MistralForCausalLM``     mistral      :mod:`.mistral`
``Qwen3MoeForCausalLM``    qwen3_moe    :mod:`.qwen3_moe` (experts: uniform or per-layer counts)
``ActpruneForCausalLM``    actprune     a pruned checkpoint of any family above
=========================  ===========  =========================================

A checkpoint sliced into the actprune architecture (per-layer widths or expert counts, biases)
names its base family in ``actprune_base_architecture``; :func:`spec_for_config` follows it.
Adding a family = one module with a ``SPEC`` and its line in ``FAMILIES`` (plus a tiny test
model: ``pruning.fixtures.synthetic`` builds one from ``SPEC.tiny_config``).
"""

from __future__ import annotations

from typing import Any

from actprune.core.errors import ActpruneError

from . import llama, mistral, qwen2, qwen3, qwen3_moe
from .shape import LIMITS, LayerShape, Limits, ModelShape, model_shape
from .spec import ArchSpec, HfLayout, MoeLayout, Role, TensorRef, VllmLayout

__all__ = [
    "ACTPRUNE_ARCHITECTURE",
    "ACTPRUNE_MODEL_TYPE",
    "LIMITS",
    "REGISTRY",
    "ArchSpec",
    "HfLayout",
    "LayerShape",
    "Limits",
    "ModelShape",
    "MoeLayout",
    "Role",
    "TensorRef",
    "UnsupportedArchitecture",
    "VllmLayout",
    "model_shape",
    "moe_shape",
    "spec_for_architecture",
    "spec_for_config",
]

FAMILIES = (qwen3, qwen2, llama, mistral, qwen3_moe)
REGISTRY: dict[str, ArchSpec] = {m.SPEC.architecture: m.SPEC for m in FAMILIES}

# The architecture actprune writes for checkpoints whose layers differ in shape.
ACTPRUNE_ARCHITECTURE = "ActpruneForCausalLM"
ACTPRUNE_MODEL_TYPE = "actprune"


class UnsupportedArchitecture(ActpruneError):
    """A model of a family the registry does not describe."""


def spec_for_architecture(architecture: str, base_architecture: str | None = None) -> ArchSpec:
    """The spec of ``architecture`` (for the actprune architecture: of ``base_architecture``)."""
    name = base_architecture if architecture == ACTPRUNE_ARCHITECTURE else architecture
    if name in REGISTRY:
        return REGISTRY[name]
    raise UnsupportedArchitecture(
        f"unsupported architecture {architecture!r}; actprune supports {sorted(REGISTRY)} "
        f"(and {ACTPRUNE_ARCHITECTURE} checkpoints of them)"
    )


def moe_shape(config: dict[str, Any]) -> dict[str, Any]:
    """What ``config_hash`` adds for an MoE model (``MoeLayout.hashed``: experts, top-k, expert
    width, sparse layers, whatever the keys' spelling); {} for a dense or unreadable config, so
    dense hashes are unchanged and a malformed config still hashes its other keys."""
    try:
        moe = spec_for_config(config).moe
        return moe.hashed(config) if moe is not None else {}
    except (ActpruneError, KeyError, TypeError, ValueError):
        return {}


def spec_for_config(config: dict[str, Any]) -> ArchSpec:
    """The spec of a config dict, by its ``architectures`` entry."""
    archs = config.get("architectures") or []
    if not archs:
        raise UnsupportedArchitecture("config.json has no `architectures`; is this a Hugging Face checkpoint?")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UnsupportedArchitecture("config.json: `architectures` must be a list of class names")
    base = config.get("actprune_base_architecture")
    if base is not None and not isinstance(base, str):
        raise UnsupportedArchitecture("config.json: `actprune_base_architecture` must be a class name")
    for a in archs:
        if a in REGISTRY or (a == ACTPRUNE_ARCHITECTURE and base in REGISTRY):
            return spec_for_architecture(a, base)
    return spec_for_architecture(archs[0], base)
