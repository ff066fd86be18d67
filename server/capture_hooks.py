"""The capture's hooks (closures the registry installs; :mod:`actprune.server.capture` says
which go where). In compiled mode Dynamo traces them into the graph: what they do there is
either one op call (``actprune::stash_layer``, ``actprune::end_step``) or, on a CPU whose step
buffers hold every step, graph ops that write the rows themselves (``stash_rows``).

``held``: a layer's tap inputs, then its router logits (None for a dense layer), set by the tap
and router hooks and consumed by the layer's post-hook. The held inputs are not written again
before the layer ends (a linear's input and the router's output are their own tensors), and in
compiled mode Dynamo traces this list away: the stash gets the tensors as graph values; the
list is empty again at the end.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .ops import StepBuffers, stash_rows

__all__ = ["end_hook", "layer_hook", "router_hook", "stream_in_hook", "tap_hook"]

Held = list[torch.Tensor | None]


def router_hook(held: Held):
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # GateLinear returns (logits, bias): the (T, E) logits vLLM routes with
        held[-1] = output[0] if isinstance(output, tuple) else output

    return hook


def tap_hook(held: Held, k: int):
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        held[k] = args[0]  # (T, C): stashed by the layer's post-hook, with the stream

    return hook


def _destinations(bufs: StepBuffers) -> tuple[torch.Tensor, ...]:
    """stash_rows' buffers: the tensors themselves in the hook's closure, so that the graph
    takes them as inputs it writes in place."""
    return bufs.chan, bufs.stream, bufs.routers, bufs.cursor, bufs.step_rows


def layer_hook(bufs: StepBuffers, in_graph: bool, held: Held, offsets: list[int], groups: list[int], slot: int,
               router_slot: int):
    """Decoder layer ``slot - 1``'s post-hook: its taps, router logits and the stream leaving it
    into the step buffers, in one op call (each call's dispatch costs more than its copy) or
    by the graph itself."""
    if in_graph:
        dst = _destinations(bufs)

        def by_graph(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            hidden, residual = output
            taps, router = held[:-1], held[-1]
            for k in range(len(held)):
                held[k] = None
            stash_rows(taps, router, hidden, residual, *dst, offsets, slot, router_slot)

        return by_graph

    args_ = bufs.stash_args()
    routing = (router_slot, bufs.top_k, bufs.renormalize)

    def by_op(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        hidden, residual = output
        taps, router = held[:-1], held[-1]
        for k in range(len(held)):
            held[k] = None
        torch.ops.actprune.stash_layer(taps, router, hidden, residual, *args_, offsets, groups, slot, *routing)

    return by_op


def stream_in_hook(bufs: StepBuffers, in_graph: bool, hidden_arg: int, residual_arg: int):
    """The first decoder layer's pre-hook: the stream entering it (slot 0)."""
    h, r = hidden_arg, residual_arg
    if in_graph:
        dst = _destinations(bufs)

        def by_graph(module: nn.Module, args: tuple[Any, ...]) -> None:
            stash_rows([], None, args[h], args[r], *dst, [], 0, -1)

        return by_graph

    args_ = bufs.stash_args()

    def by_op(module: nn.Module, args: tuple[Any, ...]) -> None:
        torch.ops.actprune.stash_layer([], None, args[h], args[r], *args_, [], [], 0, -1, 0, False)

    return by_op


def end_hook(bufs: StepBuffers):
    """The last decoder layer's post-hook when the ops stash: fold what is due."""
    args_ = bufs.end_args()

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        torch.ops.actprune.end_step(output[0], *args_)

    return hook
