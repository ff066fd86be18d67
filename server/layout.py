"""Where capture finds its taps in vLLM's module tree: the decoder layers a rank owns, the
partition of a row-parallel linear's input, the expert count of a router. Read from module
attributes, never from weight shapes (vLLM's CPU backend repacks some weights)."""

from __future__ import annotations

from actprune.core.archs import VllmLayout
from torch import nn

__all__ = ["decoder_layers", "has_module", "partition", "router_width"]


def partition(linear: nn.Module) -> tuple[int, int, int]:
    """(offset, local width, global width) of a RowParallelLinear's input.

    Sizes come from the layer's attributes, never from ``weight.shape``: the CPU backend may
    repack fp32 weights into a blocked layout."""
    local = int(getattr(linear, "input_size_per_partition", 0) or 0)
    total = int(getattr(linear, "input_size", 0) or 0)
    rank = int(getattr(linear, "tp_rank", 0) or 0)
    if not local:  # a plain nn.Linear (tests, unsharded models)
        local = total = int(linear.in_features)
    return rank * local, local, total


def router_width(gate: nn.Module, default: int) -> int:
    """E of one router, from the module's attributes (never ``weight.shape``: the CPU backend
    repacks and removes the gate's weight): the layer's own count in a checkpoint with per-layer
    expert counts (the actprune architecture), the config's otherwise."""
    return int(getattr(gate, "output_size", 0) or getattr(gate, "out_features", 0) or default)


def decoder_layers(model: nn.Module, layout: VllmLayout) -> list[tuple[int, nn.Module]]:
    """(global index, layer) for the decoder layers this rank owns; pipeline-parallel ranks hold
    placeholders (PPMissingLayer) for the others, which have no attention (an MoE layer has
    no ``mlp.down_proj`` either, so attention is what marks a real layer)."""
    return [(i, layer) for i, layer in enumerate(model.get_submodule(layout.layers))
            if has_module(layer, layout.attn_in)]


def has_module(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True
