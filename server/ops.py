"""Torch ops that fold activations into preallocated accumulators, for the capture hooks.

Why ops: vLLM compiles the decoder stack with torch.compile. A hook that mutates Python state
breaks Dynamo (``TensorifyScalarRestartAnalysis``); an opaque op that updates tensors passed
to it, declared mutable in its schema (``Tensor(a!)``), is traced as a single node, kept in
order, never dead-code-eliminated, and runs eagerly at run time. Scalars travel as 0-d
tensors: a Python float argument becomes a symbolic float under vLLM's full-graph AOT compile
and fails with ``TensorifyScalarRestartAnalysis``; ints (offsets, slots) are graph constants.

Why a decode step costs little (docs/capture.md): a step of T <= N tokens (N: the rows of the
step buffers) only *copies* each layer's activations into a step buffer — one cheap op per
tap — and the last layer's ``fold_step`` folds every layer at once, with one fused kernel.
A longer step (a big prefill chunk) folds each tap where it is, as the op runs: its cost is
spread over many tokens. The stash ops are defined with ``torch.library.Library`` rather than
``torch.library.custom_op``, whose Python wrappers cost ~13 µs more per call (21 vs 8 µs).

Ops (all return nothing; buffers and accumulators are updated in place):

    actprune::stash_channels(x (T,C), buf (N,ΣC), fields [7 x (ΣC,)], counts (G,), zero_gid (≥C,),
                             armed (), threshold (), offset, group)
    actprune::stash_stream(hidden (T,H), residual (T,H) | None, buf (N,L+1,H), scratch (M,H),
                           blocks (2,L), armed (), slot)
    actprune::fold_step(hidden (T,H), chan_buf (N,ΣC), stream_buf (N,L+1,H), fields [7 x (ΣC,)],
                        counts (G,), gid (ΣC,), blocks (2,L), armed (), threshold ())
    actprune::observe_router(logits (T,E), armed (), count, topk_count, weight_sum, prob_sum,
                             top_k, renormalize)

No op reads a tensor's value on the host (no ``.item()``, no data-dependent shape): the only
branch is on T, a shape, which a CUDA graph fixes at capture (docs/capture.md).
"""

from __future__ import annotations

import functools

import torch
from actprune.core.tensor.accumulate import fold_blocks, fold_packed, update_router
from torch import Tensor

__all__ = ["step_tokens", "valid_rows"]

_LIB = torch.library.Library("actprune", "FRAGMENT")  # the stash ops below


def valid_rows(num_tokens: int, armed: Tensor) -> Tensor:
    """(T,) bool: the rows of this step that are real tokens of a real request.

    ``armed`` is a device scalar (1 = capturing): it stays 0 through vLLM's profile and
    warm-up passes and while paused. vLLM marks padding rows in ``is_padding``; that tensor is
    a view of a persistent buffer, so a CUDA graph captured with it reads each replay's mask.
    """
    pad = None
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if is_forward_context_available():
            pad = get_forward_context().is_padding
    except ImportError:  # the offline recorder has no forward context
        pass
    on = armed.to(torch.bool)
    if pad is None:
        return on.expand(num_tokens)
    return torch.logical_and(torch.logical_not(pad[:num_tokens]), on)


def step_tokens() -> tuple[int, int] | None:
    """(prefill, decode) real tokens of the current forward step, or None for a dummy run.

    A request whose query in this step is one token long is counted as decode (a one-token
    prompt chunk is indistinguishable here and rare)."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return None
    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # dual-batch overlap: one dict per micro-batch
        md = md[0] if md else None
    if not md:
        return None
    m = next(iter(md.values()))
    qsl = getattr(m, "query_start_loc_cpu", None)
    if qsl is None:
        qsl = getattr(m, "query_start_loc", None)
    if qsl is None:
        n = int(getattr(m, "num_actual_tokens", 0))
        return (n, 0) if n else None
    q = torch.diff(qsl.to("cpu")).tolist()
    q = [x for x in q if x > 0]
    decode = sum(1 for x in q if x == 1)
    return sum(q) - decode, decode


@functools.cache
def _compiled(fn):
    """``fn`` compiled once per process: its dozen element-wise passes and reductions become
    one fused loop. Sizes are dynamic, so one compile serves every width and batch size."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _fold_step_math(chan: Tensor, streams: Tensor, fields: list[Tensor], counts: Tensor, gid: Tensor,
                    blocks: Tensor, valid: Tensor, threshold: Tensor) -> None:
    # chan: (T, ΣC); streams: (T, L + 1, H), the residual stream entering the first layer and
    # leaving each layer (= entering the next); one compiled call (one Dynamo guard check)
    fold_packed(fields, counts, gid, chan, valid, threshold)
    fold_blocks(blocks, streams[:, :-1], streams[:, 1:], valid)


def _define(schema: str, fn) -> None:
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"actprune::{name}", lambda *args: None, lib=_LIB)


def stash_channels(x: Tensor, buf: Tensor, fields: list[Tensor], counts: Tensor, zero_gid: Tensor,
                   armed: Tensor, threshold: Tensor, offset: int, group: int) -> None:
    x2 = x.reshape(-1, x.shape[-1])  # (T, C)
    t, c = x2.shape
    if t <= buf.shape[0]:  # kept for fold_step at the end of this step
        buf[:t, offset:offset + c].copy_(x2)
        return
    # a long step: fold this group now (its columns, its count)
    _compiled(fold_packed)([f[offset:offset + c] for f in fields], counts[group:group + 1],
                           zero_gid[:c], x2, valid_rows(t, armed), threshold)


def stash_stream(hidden: Tensor, residual: Tensor | None, buf: Tensor, scratch: Tensor,
                 blocks: Tensor, armed: Tensor, slot: int) -> None:
    # The residual stream around a vLLM decoder layer is hidden + residual (vLLM defers the
    # residual add into the next fused add-RMSNorm); layer 0 gets residual=None. Slot 0 is the
    # stream entering a rank's first layer, slot j + 1 the one leaving its layer j, which is
    # what layer j + 1 is given (vLLM's decoder loop passes it on as it is): one copy a layer.
    t = hidden.shape[0]
    if t <= buf.shape[0]:
        dst = buf[:t, slot]  # (T, H)
        if residual is None:
            dst.copy_(hidden)
        else:
            torch.add(hidden.float(), residual.float(), out=dst)
        return
    if t > scratch.shape[0]:
        raise RuntimeError(f"actprune: batch of {t} tokens exceeds the capture scratch buffer "
                           f"({scratch.shape[0]} rows); this is a bug, please report it")
    h = hidden.float() if residual is None else hidden.float() + residual.float()  # (T, H)
    if slot:  # a long step: layer slot - 1's cosine now, against the stream it was given
        fold_blocks(blocks[:, slot - 1:slot], scratch[:t, None], h[:, None], valid_rows(t, armed))
    scratch[:t].copy_(h)  # what the next layer is given


# Rows per call of the compiled fold. The fold reduces each column over the rows; the fused
# loop walks a tile of columns down all T rows, which sit ΣC * 4 bytes apart (270 kB on the
# benchmark model): past a few dozen rows those reads outrun the TLB and the prefetchers, and
# the cost per activation doubles (4.8 vs 2.0 ns at T = 256 vs 32). Chunks of 16 rows keep it
# flat; each chunk merges into the accumulators (exact: Chan's merge), which costs one pass
# over the (ΣC,) accumulators per chunk (BENCHMARKS.md, issue 16). A CPU matter: a GPU folds
# the step whole (one set of kernels, not T / 16).
FOLD_ROWS = 16


def fold_step(hidden: Tensor, chan_buf: Tensor, stream_buf: Tensor, fields: list[Tensor], counts: Tensor,
              gid: Tensor, blocks: Tensor, armed: Tensor, threshold: Tensor) -> None:
    t = hidden.shape[0]
    if t > chan_buf.shape[0]:  # folded tap by tap already
        return
    valid = valid_rows(t, armed)
    rows = FOLD_ROWS if chan_buf.device.type == "cpu" else max(t, 1)
    for a in range(0, t, rows):  # a shape loop: the same calls at every replay of a graph
        b = min(t, a + rows)
        _compiled(_fold_step_math)(chan_buf[a:b], stream_buf[a:b], fields, counts, gid, blocks,
                                   valid[a:b], threshold)


_define("stash_channels(Tensor x, Tensor(a!) buf, Tensor(b!)[] fields, Tensor(c!) counts, "
        "Tensor zero_gid, Tensor armed, Tensor threshold, int offset, int group) -> ()", stash_channels)
_define("stash_stream(Tensor hidden, Tensor? residual, Tensor(a!) buf, Tensor(b!) scratch, "
        "Tensor(c!) blocks, Tensor armed, int slot) -> ()", stash_stream)
_define("fold_step(Tensor hidden, Tensor chan_buf, Tensor stream_buf, Tensor(a!)[] fields, "
        "Tensor(b!) counts, Tensor gid, Tensor(c!) blocks, Tensor armed, Tensor threshold) -> ()",
        fold_step)


@torch.library.custom_op(
    "actprune::observe_router", mutates_args=("count", "topk_count", "weight_sum", "prob_sum"))
def observe_router(
    logits: Tensor, armed: Tensor, count: Tensor, topk_count: Tensor, weight_sum: Tensor,
    prob_sum: Tensor, top_k: int, renormalize: bool,
) -> None:
    # top_k and renormalize are the model's own (config), constants of the traced graph.
    z = logits.reshape(-1, logits.shape[-1])  # (T, E)
    state = {"count": count, "topk_count": topk_count, "weight_sum": weight_sum, "prob_sum": prob_sum}
    update_router(state, z, valid_rows(z.shape[0], armed), top_k, renormalize)


@observe_router.register_fake
def _(logits, armed, count, topk_count, weight_sum, prob_sum, top_k, renormalize):
    return None
