"""Per-worker capture: accumulators on the model's device, hooks on every decoder layer.

One :class:`Capture` lives in each vLLM worker process (one per tensor/pipeline-parallel
rank), attached to the loaded model. It owns a :class:`HookRegistry` and these hooks
(the ops: :mod:`actprune.server.ops`; why they are cheap: docs/capture.md):

* pre-hooks on ``self_attn.o_proj`` and ``mlp.down_proj``: hold the input (attention channels
  of the local heads, MLP neurons of the local shard) for the layer's post-hook; no op
* post-hook on ``mlp.gate`` of an MoE layer (instead of ``down_proj``, which the fused experts
  do not have): hold the router logits vLLM routes with, (T, E), for the layer's post-hook
* pre-hook on the first decoder layer -> actprune::stash_layer (slot 0: the stream entering it)
* post-hook on every decoder layer -> actprune::stash_layer: the held inputs and the stream
  leaving the layer, which is the stream entering the next (vLLM's decoder loop hands each
  layer's (hidden, residual) output on unchanged): one op call a layer
* post-hook on the last decoder layer -> actprune::end_step: every statistic of every layer for
  the rows buffered so far, folded at once (on a CPU once 16 rows have gathered; a step too
  long for the step buffers was folded tap by tap)
* pre-hook on the top-level model (runs eagerly, outside the compiled graph, once per step):
  arms capture at the first real step, decides whether this step is captured (not while
  paused; with ``step_sample`` < 1 a seeded draw: on a CPU a step not captured skips the ops'
  work) and counts prefill / decode tokens; with the post-hook on
  the same model it tells whether a step is under way (``in_step``). A step cut short (a signal,
  or a collective failing because another rank stopped first) is taken back by
  ``settle_step`` when its rows only wait in the buffers; one stopped while folding leaves a
  torn state, which the worker must not save.

The channel accumulators of all layers are packed side by side (``new_packed_channels``);
``groups`` maps each stats-file group to its state dict of views into them.

``snapshot()`` folds the rows still buffered and returns this rank's shard as safetensors
bytes (:mod:`actprune.server.shard_io`); the API process assembles the shards of all ranks into
one stats file (:mod:`actprune.server.snapshot`).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from actprune.core.archs import VllmLayout
from actprune.core.tensor.accumulate import new_packed_channels, new_packed_routers, reset_state
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.schema import (
    BLOCK_KIND,
    CHANNEL_KINDS,
    DEFAULT_NEAR_ZERO,
    ROUTER_KIND,
    group_name,
)
from torch import nn

from .forward import step_tokens
from .layout import decoder_layers, has_module, partition, router_width
from .ops import (  # importing ops registers torch.ops.actprune.*
    FOLD_ROWS,
    STEP_FOLDING,
    STEP_OPEN,
    StepBuffers,
)
from .shard_io import merge_saved, read_slices, write_shard

__all__ = ["Capture", "CaptureOptions", "Routing", "ShardInfo"]

HOOK_GROUP = "actprune.capture"


@dataclass(frozen=True)
class CaptureOptions:
    near_zero_threshold: float = DEFAULT_NEAR_ZERO
    max_tokens: int = 8192  # the most tokens vLLM puts in one step (max batched tokens)
    # memory for the step buffers: steps of up to stash_mib / (4 (ΣC + 2 L H)) tokens are
    # folded once per step, longer ones tap by tap (docs/capture.md)
    stash_mib: int = 256
    # on a CPU: the rows of small steps that gather before a fold, and the rows per call of the
    # fold (at most half the step buffers; why 16: server/ops.py)
    fold_rows: int = FOLD_ROWS
    # opt-in, CPU only: the chance that a forward step is captured, drawn per step from a
    # generator seeded with sample_seed (every rank draws the same); the steps not drawn cost
    # no copy and no fold, and their tokens are counted as tokens_unsampled (docs/capture.md)
    step_sample: float = 1.0
    sample_seed: int = 0

    def __post_init__(self) -> None:
        for name, least in (("stash_mib", 0), ("fold_rows", 1), ("sample_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"actprune: capture option {name} must be an integer >= {least}, got {value!r}")
        p = self.step_sample
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"actprune: capture option step_sample must be a number in (0, 1], got {p!r}")


@dataclass(frozen=True)
class ShardInfo:
    """Where this rank's channels sit in the global layout."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1


@dataclass(frozen=True)
class Routing:
    """How an MoE model routes (its config), for the router hooks to reproduce the choice."""

    num_experts: int
    top_k: int
    renormalize: bool  # norm_topk_prob: top-k weights divided by their sum


class Capture:
    def __init__(
        self,
        model: nn.Module,
        layout: VllmLayout,
        options: CaptureOptions,
        shard: ShardInfo,
        device: torch.device,
        hidden_size: int,
        routing: Routing | None = None,
    ) -> None:
        if options.step_sample < 1 and device.type != "cpu":
            raise ValueError("actprune: step_sample < 1 is for CPU servers: under CUDA graphs the capture's "
                             "kernels replay whether a step is drawn or not, so sampling would save nothing "
                             "(the GPU capture costs 1-2 % of a step; docs/capture.md)")
        self.layout = layout
        self.routing = routing
        self.options = options
        self.shard = shard
        self.device = device
        self.hidden_size = hidden_size
        self.registry = HookRegistry()
        # Device flag read by the ops: 0 through warm-up and while paused.
        self.armed = torch.zeros((), dtype=torch.float32, device=device)
        self.threshold = torch.tensor(float(options.near_zero_threshold), dtype=torch.float32, device=device)
        self.started = False  # a real step has been seen
        self.in_step = False  # between the pre- and post-hook of the model on a real step
        self._step_counted = (0, 0)  # (prefill, decode) tokens the current step added
        self.after_step: Callable[[], None] | None = None  # the worker's, run as each step ends
        self.paused = False
        self.tokens_prefill = 0
        self.tokens_decode = 0
        self._draw = random.Random(options.sample_seed)  # one draw per real step, the same on every rank
        self.tokens_unsampled = 0  # tokens of the real steps step_sample skipped
        self._step_unsampled = 0  # ... of the current step
        self.window_start = time.time()
        self.groups: dict[str, dict[str, torch.Tensor]] = {}
        self.partitions: dict[str, tuple[int, int, int]] = {}
        self._install(model)

    # ---- hooks --------------------------------------------------------------------------
    def _install(self, model: nn.Module) -> None:
        layers = decoder_layers(model, self.layout)
        if not layers:
            raise RuntimeError(f"actprune: found no decoder layers under {self.layout.layers!r}")
        taps, gates = self._taps(layers)  # (layer index, group name, linear) in layer order; routers
        self._allocate([self.partitions[name][1] for _, name, _ in taps], len(layers), gates)
        # stream slot 0: entering the first layer (of this rank); slot j + 1: leaving layer j
        self.registry.pre_hook(HOOK_GROUP, layers[0][1], self._stream_in_hook())
        for j, (i, layer) in enumerate(layers):
            self.groups[group_name(i, BLOCK_KIND)] = {"cos_sum": self.bufs.blocks[0, j:j + 1],
                                                      "count": self.bufs.blocks[1, j:j + 1]}
            mine = [(g, linear) for g, (li, _, linear) in enumerate(taps) if li == i]
            held: list[torch.Tensor | None] = [None] * (len(mine) + 1)  # tap inputs, router logits
            for k, (_, linear) in enumerate(mine):
                self.registry.pre_hook(HOOK_GROUP, linear, self._tap_hook(held, k))
            router_slot = list(gates).index(i) if i in gates else -1
            if router_slot >= 0:
                self.registry.post_hook(HOOK_GROUP, gates[i], self._router_hook(held))
            self.registry.post_hook(HOOK_GROUP, layer, self._layer_hook(held, [g for g, _ in mine], j + 1,
                                                                        router_slot))
        # after the last layer's stash (hooks run in registration order): fold what is due
        self.registry.post_hook(HOOK_GROUP, layers[-1][1], self._end_hook())
        self.registry.pre_hook(HOOK_GROUP, model, self._on_step, with_kwargs=True)
        self.registry.post_hook(HOOK_GROUP, model, self._after_step)

    def _taps(self, layers: list[tuple[int, nn.Module]]
              ) -> tuple[list[tuple[int, str, nn.Module]], dict[int, nn.Module]]:
        """The channel taps (layer index, group name, linear), with each group's partition, and
        the router of each MoE layer (layer index -> gate), which it has instead of a
        ``down_proj`` tap."""
        paths = dict(zip(CHANNEL_KINDS, (self.layout.mlp_in, self.layout.attn_in), strict=True))
        taps, gates = [], {}
        for i, layer in layers:
            for kind, path in paths.items():
                gate = self._router(i, layer) if kind == "mlp" else None
                if gate is not None:  # an MoE layer: the router instead of down_proj
                    gates[i] = gate
                    continue
                linear = layer.get_submodule(path)
                name = group_name(i, kind)
                self.partitions[name] = partition(linear)
                taps.append((i, name, linear))
        return taps, gates

    def _allocate(self, widths: list[int], n_layers: int, gates: dict[int, nn.Module]) -> None:
        """The packed accumulators and the step buffers. Steps of up to ``rows`` tokens are
        copied into the buffers and folded later; ``rows`` is what fits in ``stash_mib``, at
        most the largest batch vLLM schedules."""
        fields, counts, gid, states = new_packed_channels(widths, self.device)
        self.groups.update(zip(self.partitions, states, strict=True))
        self.offsets = [0, *itertools.accumulate(widths)][:-1]
        experts = [router_width(g, self.routing.num_experts) for g in gates.values()]
        router_fields, router_states = new_packed_routers(experts, self.device)
        self.groups.update({group_name(i, ROUTER_KIND): st for i, st in zip(gates, router_states, strict=True)})
        row_bytes = 4 * (sum(widths) + (n_layers + 1) * self.hidden_size + len(experts) * max(experts, default=0))
        rows, long_rows = StepBuffers.sizes(self.options.max_tokens, (self.options.stash_mib << 20) // row_bytes,
                                            self.device.type == "cpu", self.options.fold_rows)
        routing = {"top_k": self.routing.top_k, "renormalize": self.routing.renormalize} if gates else {}
        self.bufs = StepBuffers.new(fields, counts, gid, self.armed, self.threshold, rows=rows, long_rows=long_rows,
                                    n_layers=n_layers, hidden=self.hidden_size,
                                    router_fields=router_fields if gates else None, fold_rows=self.options.fold_rows,
                                    **routing)
        self.bufs.warm_up()  # compile the fold at load, not in the middle of serving

    def _router(self, i: int, layer: nn.Module) -> nn.Module | None:
        """Layer ``i``'s router if it routes to experts: vLLM built one there (by the rule of
        ``mlp_only_layers`` / ``decoder_sparse_step``; the module tree is what runs)."""
        path = self.layout.router_out
        if path is None or not has_module(layer, path):
            return None
        if self.routing is None:
            raise RuntimeError(f"actprune: layer {i} has a router ({path}) but capture was given no routing")
        if getattr(layer.get_submodule(path.rpartition(".")[0]), "is_sequence_parallel", False):
            # each rank's router then sees its own chunk of the tokens, not the rows is_padding marks
            raise RuntimeError("actprune: capture does not support sequence-parallel MoE (expert "
                               "parallelism with TP > 1 and DP > 1); serve with DP = 1")
        return layer.get_submodule(path)

    @staticmethod
    def _router_hook(held: list[torch.Tensor | None]):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # GateLinear returns (logits, bias): the (T, E) logits vLLM routes with
            held[-1] = output[0] if isinstance(output, tuple) else output

        return hook

    @staticmethod
    def _tap_hook(held: list[torch.Tensor | None], k: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            held[k] = args[0]  # (T, C): stashed by the layer's post-hook, with the stream

        return hook

    def _layer_hook(self, held: list[torch.Tensor | None], groups: list[int], slot: int, router_slot: int):
        # One op call a layer for all its taps (each call's dispatch costs more than its copy).
        # The held inputs are not written again before the layer ends (a linear's input and the
        # router's output are their own tensors), and in compiled mode Dynamo traces this list
        # away: the op gets the tensors as graph values; the list is empty again at the end.
        bufs, offsets = self.bufs.stash_args(), [self.offsets[g] for g in groups]
        routing = (router_slot, self.bufs.top_k, self.bufs.renormalize)

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            hidden, residual = output
            taps, router = held[:-1], held[-1]
            for k in range(len(held)):
                held[k] = None
            torch.ops.actprune.stash_layer(taps, router, hidden, residual, *bufs, offsets, groups, slot, *routing)

        return hook

    def _stream_in_hook(self):
        h, r = self.layout.hidden_arg, self.layout.residual_arg
        bufs = self.bufs.stash_args()

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            torch.ops.actprune.stash_layer([], None, args[h], args[r], *bufs, [], [], 0, -1, 0, False)

        return hook

    def _end_hook(self):
        bufs = self.bufs.end_args()

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            torch.ops.actprune.end_step(output[0], *bufs)

        return hook

    def _on_step(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Eager, once per forward step: arm at the first real step, count tokens."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # vLLM capturing a CUDA graph on a dummy batch: not a real step (for a full graph it
            # has attention metadata, so step_tokens would count its rows); its replays are
            # counted by the ops (hookless_tokens)
            return
        split = step_tokens()
        if split is None:  # vLLM's profile / warm-up / padding-only dummy runs
            # run the ops as ever: their rows are not armed (or padding), and a profile run's
            # long step compiles the tap-by-tap fold now rather than while serving
            self.bufs.idle[0] = False
            return
        self.in_step = True
        self.bufs.phase.fill_(STEP_OPEN)
        if not self.started:
            self.started = True
            if not self.paused:
                self.armed.fill_(1.0)
        drawn = self.options.step_sample >= 1 or self._draw.random() < self.options.step_sample
        # on a CPU a step not captured skips the ops' work; a GPU's steps run them (unarmed
        # while paused), and step_sample < 1 is refused there
        self.bufs.idle[0] = self.device.type == "cpu" and (self.paused or not drawn)
        self._step_counted = (0, 0) if self.paused or not drawn else split
        self._step_unsampled = 0 if drawn or self.paused else sum(split)
        self.tokens_prefill += self._step_counted[0]
        self.tokens_decode += self._step_counted[1]
        self.tokens_unsampled += self._step_unsampled

    def _after_step(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.in_step = False
        if self.after_step is not None:
            self.after_step()

    def settle_step(self) -> bool:
        """After a step that never reached the model's post-hook (a signal, or an exception such
        as a collective failing because another rank stopped, unwound it): bring the state back
        to the last step boundary where that is exact. Its rows only waiting past the cursor
        (``STEP_OPEN``) are left there and its tokens taken back; a step that got to its end
        (``STEP_DONE``) stays. False when it stopped while accumulators were changing (a long
        step folded tap by tap, or the end-of-step fold): a torn state, not to be saved. Between
        steps only; reads a device value (shutdown, not the serving path)."""
        if not self.in_step:
            return True
        phase = int(self.bufs.phase[0])
        if phase == STEP_FOLDING:
            return False
        if phase == STEP_OPEN:
            self.tokens_prefill -= self._step_counted[0]
            self.tokens_decode -= self._step_counted[1]
            self.tokens_unsampled -= self._step_unsampled
        self._step_counted, self._step_unsampled = (0, 0), 0
        self.in_step = False
        return True

    def hookless_tokens(self) -> int:
        """Tokens of the steps no Python hook saw: vLLM on a GPU replays a *full* CUDA graph for a
        batch of decodes (its default cudagraph mode, FULL_AND_PIECEWISE), calling no module's
        hooks, so ``_on_step`` never counts them; the ops in the graph do (``end_step``). All
        decode tokens. Reads a device value: between steps only."""
        return int(self.bufs.hookless[1])

    # ---- control ------------------------------------------------------------------------
    def reset(self) -> None:
        self.bufs.discard()  # rows of the old window not yet folded
        for st in self.groups.values():
            reset_state(st)
        self.bufs.hookless.zero_()
        self.tokens_prefill = self.tokens_decode = self.tokens_unsampled = 0
        self.window_start = time.time()

    def pause(self) -> None:
        self.paused = True
        self.armed.fill_(0.0)

    def resume(self) -> None:
        self.paused = False
        if self.started:
            self.armed.fill_(1.0)

    def status(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "paused": self.paused,
            "tokens_prefill": self.tokens_prefill,
            "tokens_decode": self.tokens_decode + self.hookless_tokens(),
            "tokens_unsampled": self.tokens_unsampled,
            "step_sample": self.options.step_sample,
            "window_start": self.window_start,
            "near_zero_threshold": float(self.options.near_zero_threshold),
            "tp_rank": self.shard.tp_rank,
            "pp_rank": self.shard.pp_rank,
            "layers": sorted({int(name.split(".")[1]) for name in self.groups}),
        }

    # ---- snapshot -----------------------------------------------------------------------
    def snapshot(self, extra: dict[str, str] | None = None) -> bytes:
        """This rank's accumulators as safetensors bytes, with the partition of each group, the
        time they were read (``taken_at``: which of two saved states is newer) and ``extra``
        metadata."""
        self.bufs.flush()  # rows of the last steps not yet folded (a CPU's)
        meta = {"shard": json.dumps(self.shard.__dict__), "status": json.dumps(self.status()),
                "taken_at": repr(time.time()), **(extra or {})}
        return write_shard(self.groups, self.partitions, meta)

    def load(self, data: bytes) -> None:
        """Fold a saved stats file (the assembled, global layout) into this rank's
        accumulators, taking this rank's slice of each group: resume after a restart. The file
        is checked whole first (names, shapes, counts, metadata): a bad one raises ValueError
        and leaves the accumulators untouched."""
        parts, meta = read_slices(data, self.groups, self.partitions)
        prefill, decode = int(meta.get("tokens_prefill", 0)), int(meta.get("tokens_decode", 0))
        unsampled = int(meta.get("tokens_unsampled", 0))
        window_start = float(meta["window_start"]) if "window_start" in meta else None
        if min(prefill, decode, unsampled) < 0:
            raise ValueError(f"saved token counts are negative ({prefill}, {decode}, {unsampled})")
        merge_saved(self.groups, self.partitions, parts)
        self.tokens_prefill += prefill
        self.tokens_decode += decode
        self.tokens_unsampled += unsampled
        if window_start is not None:  # the counts now reach back to the saved window's start
            self.window_start = min(self.window_start, window_start)

    def remove(self) -> None:
        self.registry.remove_all()
