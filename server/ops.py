"""Torch ops that fold activations into preallocated accumulators, for the capture hooks.

Why ops: vLLM compiles the decoder stack with torch.compile. A hook that mutates Python state
breaks Dynamo (``TensorifyScalarRestartAnalysis``); an opaque op that updates tensors passed
to it, declared mutable in its schema (``Tensor(a!)``), is traced as a single node, kept in
order, never dead-code-eliminated, and runs eagerly at run time. Scalars travel as 0-d
tensors: a Python float argument becomes a symbolic float under vLLM's full-graph AOT compile
and fails with ``TensorifyScalarRestartAnalysis``; ints (offsets, slots) are graph constants.

Why a decode step costs little (docs/capture.md): each decoder layer makes *one* op call,
``stash_layer``, which copies the layer's channel taps and the residual stream leaving it into
the step buffers (on a GPU in one Triton kernel, :mod:`actprune.server.stash_kernel`);
``end_step``, after the last layer, folds the buffered rows into the accumulators with one
fused kernel. On a CPU the rows of small steps wait in the buffers until
``fold_rows`` of them are there (one pass over the accumulators per 16 rows, not per step); a
GPU folds every step (``cursor`` None: no host read of a device value). A step too long for the
buffers folds each tap where it is, its cost spread over many tokens. The ops are defined with
``torch.library.Library`` rather than ``torch.library.custom_op``, whose Python wrappers cost
~13 µs more per call (21 vs 8 µs). On a CPU a step that is not captured (paused, or not drawn
by the opt-in ``step_sample``) sets ``StepBuffers.idle``: its ops return at once.

Ops (all return nothing; buffers and accumulators are updated in place):

    actprune::stash_layer(taps [(T,C_k)], router (T,E) | None, hidden (T,H), residual (T,H) | None,
                          phase (1,), offsets [k], groups [k], slot, router_slot, top_k, renormalize)
    actprune::end_step(hidden (T,H), phase (1,))

Every other tensor the ops read or update (``StepBuffers``: the step buffers, the accumulators,
the row cursor) is found from ``phase``, the one mutable argument, by its address. Passed as
arguments they cost more than the work at small steps: each call converts every argument from
Python to the dispatcher's values and back (a Python-bodied op), two dozen tensors and lists,
and in a serving worker whose caches the weights have just flushed a call cost ~100 µs where it
costs 13 µs hot (BENCHMARKS.md, issue 16, ``perf`` on both workers). ``phase`` keeps the calls
in order (each mutates it) and alive (a mutating op is never dead code); nothing else in the
graph reads the buffers, so the compiler need not know the op writes them.

R: the MoE layers of the rank (0 for a dense model), E': the most experts of one of them.

No op reads a device tensor's value on the host (no ``.item()``, no data-dependent shape): the
branches are on T, a shape a CUDA graph fixes at capture, and on a GPU nothing else; the row
cursor of a CPU (a CPU tensor) is read on the CPU it lives on.

``phase`` says how far the current step got, for a worker whose step was cut short (a signal,
or a collective failing because another rank stopped): STEP_OPEN (the capture sets it as a
step starts) — its rows only wait past the cursor, the accumulators hold whole steps;
STEP_FOLDING — accumulators are changing (a long step's taps, the end-of-step fold): torn;
STEP_DONE — the step is in. ``Capture.settle_step`` reads it.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from actprune.core.tensor.accumulate import fold_blocks, fold_packed, fold_routers
from torch import Tensor

from .forward import valid_rows

__all__ = ["FOLD_ROWS", "STEP_DONE", "STEP_FOLDING", "STEP_OPEN", "StepBuffers"]

_LIB = torch.library.Library("actprune", "FRAGMENT")  # the stash ops below

# On a CPU, the rows a fold waits for and the rows of one call of the compiled fold (the
# capture option ``fold_rows``). A fold reads and writes every accumulator, seven (ΣC,) tensors
# (~100 bytes a column), whatever its rows, so small steps' rows gather first. 16, measured end
# to end: 128 rows a fold (fewer passes over accumulators that a worker's weights have pushed
# out of the caches: half the fold's cost a step in process, caches flushed) was not shown
# faster (batch 8 1.01, interval 0.98-1.05; batch 1 0.95, 0.93-0.98, within what two identical
# server instances differ by; BENCHMARKS.md, issue 16). A GPU folds each step whole.
FOLD_ROWS = 16
# stash_layer keeps its destination views for steps of fewer tokens than this (decode steps)
_VIEW_TOKENS = 16
_VIEWS_MAX = 4096  # kept views at most: the cache is emptied past this (mixed step sizes)
STEP_OPEN, STEP_FOLDING, STEP_DONE = 0, 1, 2  # StepBuffers.phase


@dataclass(frozen=True)
class StepBuffers:
    """Every tensor the step ops read or update, allocated once per worker: their addresses
    never change (a CUDA graph bakes them in). N: rows of the step buffers; ΣC: the channel
    groups side by side; G: groups; L: decoder layers of this rank; H: hidden size."""

    chan: Tensor  # (N, ΣC) float32: pending rows of the channel taps
    stream: Tensor  # (N, L + 1, H) float32: the residual stream at each layer boundary
    routers: Tensor  # (N, R, E') float32: router logits of the MoE layers, -inf past a layer's E
    valid: Tensor  # (N,) bool: pending row is a real token, captured while armed
    cursor: Tensor | None  # (1,) int64 on the CPU: rows pending; None: fold every step (GPU)
    phase: Tensor  # (1,) int64: how far the current step got (STEP_OPEN / _FOLDING / _DONE)
    scratch: Tensor  # (M, H) float32: the stream entering the current layer of a long step
    fields: list[Tensor]  # 7 x (ΣC,): the packed accumulators (accumulate.PACKED_FIELDS)
    counts: Tensor  # (G,) float64
    router_fields: list[Tensor]  # count (R,), topk_count / weight_sum / prob_sum (R, E') float64
    gid: Tensor  # (ΣC,) int32: each column's group
    zero_gid: Tensor  # (max C,) int32 zeros: one group's columns folded alone
    blocks: Tensor  # (2, L) float64: cos_sum, count of each layer
    armed: Tensor  # () float32: 1 = capturing
    threshold: Tensor  # () float32: near-zero threshold
    # (2,) float64: [0] 1 while the current step began with no hook run (phase still STEP_DONE
    # at its first stash: vLLM replaying a full CUDA graph, which calls no module's hooks);
    # [1] the real tokens of such steps, which the model's Python pre-hook could not count
    hookless: Tensor
    top_k: int = 0  # the MoE model's routing (its config)
    renormalize: bool = False
    # on a CPU: rows that wait before a fold, and rows per call of the compiled fold (at most
    # half the buffers, so that a step of up to the other half always fits beside them)
    fold_rows: int = FOLD_ROWS
    # [0]: True while the current step is not captured on a CPU (paused, or not drawn by the
    # capture option step_sample): the ops return at once, no copy and no fold. Host state the
    # model's eager pre-hook sets each step (Capture._on_step); never set on a GPU, where a
    # CUDA graph replays the ops' kernels whatever a Python flag says. A list: the dataclass
    # is frozen (its tensors' addresses are fixed), this flag is not.
    idle: list[bool] = field(default_factory=lambda: [False])

    def __post_init__(self) -> None:
        _BUFFERS[self.phase.data_ptr()] = self  # the ops find the buffers from phase

    @classmethod
    def new(cls, fields: list[Tensor], counts: Tensor, gid: Tensor, armed: Tensor, threshold: Tensor, *,
            rows: int, long_rows: int, n_layers: int, hidden: int, router_fields: list[Tensor] | None = None,
            top_k: int = 0, renormalize: bool = False, fold_rows: int = FOLD_ROWS) -> StepBuffers:
        device = gid.device
        f32 = {"dtype": torch.float32, "device": device}
        _VIEWS.clear()  # views of earlier buffers: let them go
        if router_fields is None:  # a dense model
            router_fields = [torch.zeros(0, dtype=torch.float64, device=device)] + [
                torch.zeros(0, 1, dtype=torch.float64, device=device) for _ in range(3)]
        return cls(
            chan=torch.zeros(rows, gid.shape[0], **f32),
            stream=torch.zeros(rows, n_layers + 1, hidden, **f32),
            routers=torch.full((rows, *router_fields[1].shape), float("-inf"), **f32),
            router_fields=router_fields, top_k=top_k, renormalize=renormalize,
            valid=torch.zeros(rows, dtype=torch.bool, device=device),
            cursor=torch.zeros(1, dtype=torch.int64) if device.type == "cpu" else None,
            phase=torch.full((1,), STEP_DONE, dtype=torch.int64, device=device),
            scratch=torch.zeros(long_rows, hidden, **f32),
            fields=fields, counts=counts, gid=gid,
            zero_gid=torch.zeros(int(torch.bincount(gid).max()) if gid.numel() else 0,
                                 dtype=torch.int32, device=device),
            blocks=torch.zeros(2, n_layers, dtype=torch.float64, device=device),
            armed=armed, threshold=threshold, hookless=torch.zeros(2, dtype=torch.float64, device=device),
            fold_rows=max(1, min(fold_rows, rows // 2)),
        )

    @staticmethod
    def sizes(max_tokens: int, budget_rows: int, cpu: bool, fold_rows: int = FOLD_ROWS) -> tuple[int, int]:
        """(rows of the step buffers, rows of the long-step scratch). ``budget_rows``: the rows
        the memory budget allows; a step has at most ``max_tokens`` rows. On a CPU up to
        fold_rows - 1 rows of earlier steps may be waiting: the buffers hold that many more
        when the budget allows, and otherwise a step that does not fit beside them is folded
        tap by tap, which needs the scratch."""
        slack = fold_rows - 1 if cpu else 0
        rows = min(max_tokens + slack, budget_rows)
        return rows, (max_tokens if rows < max_tokens + slack else 0)

    def stash_args(self) -> tuple:
        """stash_layer's arguments after (taps, router, hidden, residual), to offsets."""
        return (self.phase,)

    def end_args(self) -> tuple:
        """end_step's arguments after hidden."""
        return (self.phase,)

    def flush(self) -> None:
        """Fold the rows still waiting (a CPU's): before the accumulators are read. Between
        steps only."""
        n = _pending(self.cursor)
        if n:
            self._fold(n)
            self.cursor.zero_()

    def warm_up(self) -> None:
        """Compile the fold now, on rows marked not valid (which change no accumulator), for a
        one-row chunk and a many-row one (dynamic shapes specialise a size of 1). Otherwise a
        CPU's rows, which wait past vLLM's warm-up steps, would compile it at the first fold
        or snapshot while serving (seconds on a small machine), and a GPU must never compile
        inside a CUDA-graph capture. Before any step: nothing is waiting."""
        for n in sorted({min(1, self.chan.shape[0]), min(self.fold_rows, self.chan.shape[0])} - {0}):
            self.valid[:n].zero_()
            self._fold(n)

    def _fold(self, n: int) -> None:
        _fold_rows(n, self.chan, self.stream, self.routers, self.valid, self.fields, self.counts,
                   self.router_fields, self.gid, self.blocks, self.threshold, self.top_k, self.renormalize,
                   self.fold_rows)

    def discard(self) -> None:
        """Drop the rows still waiting: a reset starts a new window."""
        if self.cursor is not None:
            self.cursor.zero_()


# phase's address -> the StepBuffers it belongs to (the last one built with it: a copy made with
# dataclasses.replace takes over). Weak: the capture owns its buffers.
_BUFFERS: weakref.WeakValueDictionary[int, StepBuffers] = weakref.WeakValueDictionary()


def _buffers(phase: Tensor) -> StepBuffers:
    b = _BUFFERS.get(phase.data_ptr())  # a live StepBuffers keeps its phase, so no other tensor has the address
    if b is not None:
        return b
    if len(_BUFFERS) == 1:
        # a compiler that did not re-inplace the mutable argument passes a copy of phase (and
        # copies it back after the graph): a worker has one capture, so its buffers are these
        return next(iter(_BUFFERS.values()))
    raise RuntimeError("actprune: a capture op was given a phase tensor of no StepBuffers; this is a bug, "
                       "please report it")


def _pending(cursor: Tensor | None) -> int:
    # a CPU tensor, read on the CPU; a GPU has no cursor (its ops never read a value)
    return 0 if cursor is None else int(cursor[0])


@functools.cache
def _compiled(fn):
    """``fn`` compiled once per process: its dozen element-wise passes and reductions become
    one fused loop. Sizes are dynamic, so one compile serves every width and batch size."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _fold_math(chan: Tensor, streams: Tensor, routers: Tensor, fields: list[Tensor], counts: Tensor,
               router_fields: list[Tensor], gid: Tensor, blocks: Tensor, valid: Tensor, threshold: Tensor,
               top_k: int, renormalize: bool) -> None:
    # chan: (R, ΣC); streams: (R, L + 1, H), the residual stream entering the first layer and
    # leaving each layer (= entering the next); routers: (R, MoE layers, E'); one compiled call
    # (one Dynamo guard check)
    fold_packed(fields, counts, gid, chan, valid, threshold)
    fold_blocks(blocks, streams[:, :-1], streams[:, 1:], valid)
    if routers.shape[1]:  # an MoE model
        fold_routers(router_fields, routers, valid, top_k, renormalize)


def _fold_rows(n: int, chan: Tensor, stream: Tensor, routers: Tensor, valid: Tensor, fields: list[Tensor],
               counts: Tensor, router_fields: list[Tensor], gid: Tensor, blocks: Tensor, threshold: Tensor,
               top_k: int, renormalize: bool, fold_rows: int = FOLD_ROWS) -> None:
    """Fold the first n rows of the step buffers, in chunks of ``fold_rows`` on a CPU."""
    rows = fold_rows if chan.device.type == "cpu" else max(n, 1)
    for a in range(0, n, rows):  # a shape loop: the same calls at every replay of a graph
        b = min(n, a + rows)
        _compiled(_fold_math)(chan[a:b], stream[a:b], routers[a:b], fields, counts, router_fields, gid, blocks,
                              valid[a:b], threshold, top_k, renormalize)


# On a GPU a layer's stash is one Triton kernel (actprune.server.stash_kernel: 1 launch, not 4-5;
# in a CUDA graph each costs ~2-3 µs whatever its size). False: the torch copies (benchmarks).
STASH_KERNEL = True


def _stash_kernel_for(hidden: Tensor):
    """actprune.server.stash_kernel where a stash of ``hidden``'s device uses it (CUDA, Triton
    installed, ``STASH_KERNEL``), else None."""
    return _kernel() if STASH_KERNEL and hidden.is_cuda else None


@functools.cache
def _kernel():
    try:
        from . import stash_kernel
    except ImportError:  # no Triton: the torch copies
        return None
    return stash_kernel


def _define(schema: str, fn) -> None:
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"actprune::{name}", lambda *args: None, lib=_LIB)


# (chan's address, slot, row, T) -> (the taps' and router's destinations, the stream's): the
# views a small step of one layer writes to. Slicing them anew costs more than the copies (two
# __getitem__ per tap, ~2 µs each, 25 layers a step); a small step (T < _VIEW_TOKENS, on a CPU) of
# a given layer, row and T writes to the same views every time. The views keep the buffers alive,
# so an address cannot be reused while it is a key; StepBuffers.new empties the cache.
_VIEWS: dict[tuple[int, int, int, int], tuple[list[Tensor], Tensor]] = {}


def _stash_views(taps: list[Tensor], router: Tensor | None, chan: Tensor, stream: Tensor, routers: Tensor,
                 offsets: list[int], slot: int, router_slot: int, row: int, t: int) -> tuple[list[Tensor], Tensor]:
    key = (chan.data_ptr(), slot, row, t)
    hit = _VIEWS.get(key)
    if hit is not None:
        return hit
    dsts = [chan[row:row + t, offset:offset + x.shape[-1]] for x, offset in zip(taps, offsets, strict=True)]
    if router is not None:  # the columns past this layer's E stay -inf
        dsts.append(routers[row:row + t, router_slot, :router.shape[-1]])
    views = dsts, stream[row:row + t, slot]  # (T, C_k) each, (T, H)
    if t < _VIEW_TOKENS:  # a prefill's T takes too many values to keep
        if len(_VIEWS) >= _VIEWS_MAX:  # steps of many sizes at many rows: start again
            _VIEWS.clear()
        _VIEWS[key] = views
    return views


def stash_layer(taps: list[Tensor], router: Tensor | None, hidden: Tensor, residual: Tensor | None, phase: Tensor,
                offsets: list[int], groups: list[int], slot: int, router_slot: int, top_k: int,
                renormalize: bool) -> None:
    # taps: the inputs of the layer's tapped linears, (T, C_k) each, their columns at offsets[k]
    # of group groups[k]; router: an MoE layer's router logits (T, E), its row router_slot of
    # the router accumulators. The residual stream around a vLLM decoder layer is hidden +
    # residual (vLLM defers the residual add into the next fused add-RMSNorm); layer 0 gets
    # residual=None. Slot 0 is the stream entering a rank's first layer (no taps), slot j + 1
    # the one leaving its layer j, which is what layer j + 1 is given (vLLM's decoder loop
    # passes it on as it is): one copy a layer.
    b = _buffers(phase)
    if b.idle[0]:  # a step not captured (CPU): its rows are neither stashed nor folded
        return
    chan, stream, routers, cursor = b.chan, b.stream, b.routers, b.cursor
    t = hidden.shape[0]
    if slot == 0:  # a step's first stash: did the model's pre-hook open it?
        b.hookless[0:1].copy_(phase == STEP_DONE)
    row = _pending(cursor)
    if row + t <= chan.shape[0]:  # kept for end_step
        dsts, dst = _stash_views(taps, router, chan, stream, routers, offsets, slot, router_slot, row, t)
        srcs = [x if x.dim() == 2 else x.reshape(t, -1) for x in taps]
        if router is not None:
            srcs.append(router if router.dim() == 2 else router.reshape(t, -1))
        kernel = _stash_kernel_for(hidden)
        if kernel is not None and kernel.usable(srcs, dsts, hidden, residual, dst):
            kernel.stash_rows(srcs, dsts, hidden, residual, dst)  # one launch for the whole layer
            return
        if srcs:
            torch._foreach_copy_(dsts, srcs)  # one call for every tap's copy
        if residual is None:
            dst.copy_(hidden)
        else:
            torch.add(hidden.float(), residual.float(), out=dst)
        return
    # a long step: fold each tap now (its columns, its count), and the layer's cosine
    scratch, fields, counts, router_fields, blocks = b.scratch, b.fields, b.counts, b.router_fields, b.blocks
    threshold, zero_gid = b.threshold, b.zero_gid
    if t > scratch.shape[0]:
        raise RuntimeError(f"actprune: batch of {t} tokens exceeds the capture scratch buffer "
                           f"({scratch.shape[0]} rows); this is a bug, please report it")
    phase.fill_(STEP_FOLDING)  # from here a step cut short leaves a torn state
    valid = valid_rows(t, b.armed)
    for x, offset, group in zip(taps, offsets, groups, strict=True):
        c = x.shape[-1]
        _compiled(fold_packed)([f[offset:offset + c] for f in fields], counts[group:group + 1],
                               zero_gid[:c], x.reshape(t, c), valid, threshold)
    if router is not None:
        e, r = router.shape[-1], router_slot
        own = [router_fields[0][r:r + 1], *(f[r:r + 1, :e] for f in router_fields[1:])]  # (1,), (1, E)
        _compiled(fold_routers)(own, router.reshape(t, 1, e), valid, top_k, renormalize)
    h = hidden.float() if residual is None else hidden.float() + residual.float()  # (T, H)
    if slot:  # layer slot - 1: against the stream it was given
        fold_blocks(blocks[:, slot - 1:slot], scratch[:t, None], h[:, None], valid)
    scratch[:t].copy_(h)  # what the next layer is given


def end_step(hidden: Tensor, phase: Tensor) -> None:
    b = _buffers(phase)
    if b.idle[0]:  # not captured: rows of earlier steps still wait past the cursor, untouched
        phase.fill_(STEP_DONE)
        return
    chan, cursor, valid = b.chan, b.cursor, b.valid
    t = hidden.shape[0]
    row = _pending(cursor)
    rows = valid_rows(t, b.armed)  # (T,): which rows count, decided as the step runs
    b.hookless[1:2].add_(rows.sum(dtype=torch.float64) * b.hookless[0])  # a step no hook counted
    if row + t > chan.shape[0]:  # folded tap by tap already
        phase.fill_(STEP_DONE)
        return
    valid[row:row + t].copy_(rows)
    n = row + t
    phase.fill_(STEP_FOLDING)  # the cursor and the accumulators change from here
    if cursor is not None and n < b.fold_rows:  # a CPU: wait for a chunk's worth of rows
        cursor.fill_(n)
        phase.fill_(STEP_DONE)
        return
    b._fold(n)
    if cursor is not None:
        cursor.zero_()
    phase.fill_(STEP_DONE)


_define("stash_layer(Tensor[] taps, Tensor? router, Tensor hidden, Tensor? residual, Tensor(a!) phase, "
        "int[] offsets, int[] groups, int slot, int router_slot, int top_k, bool renormalize) -> ()", stash_layer)
_define("end_step(Tensor hidden, Tensor(a!) phase) -> ()", end_step)
