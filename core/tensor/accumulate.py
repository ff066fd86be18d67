"""Streaming accumulators, as pure torch functions that update preallocated buffers in place.

The same functions run inside vLLM (through the custom ops in :mod:`actprune.server.ops`) and
in the offline recorder (plain transformers hooks), so both produce identical stats files. The
field names are the stats file's own (:mod:`actprune.core.wire.schema`).

A *channel group* is the state of one set of channels (MLP neurons at the input of
``down_proj``, or attention channels at the input of ``o_proj``):

    count    (1,) float64   tokens seen (a scalar in the stats file)
    mean     (C,) float64   running mean          } merged with Chan's formula: no
    m2       (C,) float64   sum of sq. deviations } catastrophic cancellation at 1e8+ tokens
    sum      (C,) float64
    sum_sq   (C,) float64
    sum_abs  (C,) float64
    max_abs  (C,) float32
    near_zero(C,) float64   tokens with |x| <= threshold

A *router group* is the state of one MoE layer's router over its E experts (``ROUTER_FIELDS``):
``count`` (1,) tokens, ``topk_count`` / ``weight_sum`` / ``prob_sum`` (E,), all float64
(counts are exact integers up to 2^53).

Nothing here branches on tensor values in Python, so the updates are safe inside torch.compile
graphs and CUDA-graph replays: rows are masked with ``valid`` instead of being sliced away.
"""

from __future__ import annotations

import numpy as np
import torch
from actprune.core.wire.schema import (
    BLOCK_FIELDS,
    GROUP_FIELDS,
    ROUTER_FIELDS,
    SCALAR_FIELDS,
    SUMMED_FIELDS,
)

__all__ = [
    "PACKED_FIELDS",
    "route",
    "export_state",
    "fold_channels",
    "fold_blocks",
    "fold_packed",
    "fold_routers",
    "merge_channels",
    "new_block_state",
    "new_channel_state",
    "new_packed_channels",
    "new_packed_routers",
    "new_router_state",
    "update_block",
    "update_router",
    "reset_state",
    "update_channels",
]


# Scalars (count, cos_sum) are kept as shape-(1,) tensors, not 0-d: torch.compile treats a
# captured 0-d float64 CPU tensor like a Python float, and vLLM's full-graph AOT compile then
# fails with TensorifyScalarRestartAnalysis. ``export_state`` turns them into the file's scalars.
def new_channel_state(width: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Zeroed accumulators of ``width`` channels: float64, ``max_abs`` float32, ``count`` (1,)."""
    def zeros(f: str) -> torch.Tensor:
        dtype = torch.float32 if f == "max_abs" else torch.float64
        return torch.zeros(1 if f in SCALAR_FIELDS else width, dtype=dtype, device=device)

    return {f: zeros(f) for f in GROUP_FIELDS}


def new_block_state(device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {f: torch.zeros(1, dtype=torch.float64, device=device) for f in BLOCK_FIELDS}


def fold_channels(
    acc: list[torch.Tensor],
    n_a: torch.Tensor,
    x: torch.Tensor,
    valid: torch.Tensor,
    threshold: float | torch.Tensor,
) -> None:
    """Fold a batch into channel accumulators in place, in one pass over it: every reduction
    reads the same element once, so torch.compile fuses the whole update into one loop.

    acc: the (C,) accumulators in PACKED_FIELDS order (mean, m2, sum, sum_sq, sum_abs float64;
    max_abs float32 or float64; near_zero float64); n_a: (C,) or (1,) float64, the tokens each
    channel had seen before this batch (its count is the caller's to update); x: (T, C) any
    float dtype; valid: (T,) bool.

    Exact as before, with fewer passes and narrower types where nothing is rounded:

    * Moments, shifted by the running mean c (y = x - c, float64): Chan's merge of the batch's
      (mean_b = c + Σy/n_b, m2_b = Σy² - (Σy)²/n_b) into (c, m2) with n = n_a + n_b simplifies,
      exactly, to mean' = c + Σy/n and m2' = m2 + Σy² - (Σy)²/n: no batch mean, no delta, fewer
      roundings. The increment is >= 0 in exact arithmetic (Cauchy-Schwarz: (Σy)² <= n_b Σy²
      <= n Σy²); the clamp removes a rounding -0. With c near the batch's mean nothing cancels
      (``test_variance_stays_accurate_over_1e8_tokens_with_large_mean``).
    * max|x| in float32: |x| of a float32 (or bfloat16) value is exact in float32, and a maximum
      selects one of its inputs, so it rounds nothing: the float64 maximum was the same number.
    * near-zero counts per batch in int32: a count of at most T < 2^31 rows is an exact integer;
      added to the float64 accumulator it stays exact up to 2^53 tokens.
    """
    mean, m2, s, s_sq, s_abs, max_abs, near_zero = acc
    v = valid.view(-1, 1)  # (T, 1)
    n_b = valid.sum(dtype=torch.float64)  # ()
    inv = 1.0 / (n_a + n_b).clamp(min=1.0)  # (C,) or (1,)
    xd = x.double()  # (T, C): float32 and bfloat16 values are exact in float64
    # torch.where, not multiplication: vLLM's profile run pushes NaN rows through the model
    # and NaN * 0 is still NaN.
    xm = torch.where(v, xd, 0.0)  # (T, C)
    y = torch.where(v, xd - mean, 0.0)  # (T, C) deviations from the running mean
    s1 = y.sum(0)  # (C,)
    mean.add_(s1 * inv)
    m2.add_(((y * y).sum(0) - s1 * s1 * inv).clamp(min=0.0))
    s.add_(xm.sum(0))
    s_sq.add_((xm * xm).sum(0))
    s_abs.add_(xm.abs().sum(0))
    ax = x.float().abs()  # (T, C) float32; the threshold is stated in the activation's float32
    max_abs.copy_(torch.maximum(max_abs, torch.where(v, ax, 0.0).amax(0).to(max_abs.dtype)))
    near_zero.add_(torch.logical_and(v, ax <= threshold).sum(0, dtype=torch.int32))


def update_channels(
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    valid: torch.Tensor,
    threshold: float | torch.Tensor,
) -> None:
    """Fold a batch into ``state``. x: (T, C) any float dtype; valid: (T,) bool;
    threshold: |x| at or below which a value counts as near zero (float or 0-d tensor)."""
    fold_channels([state[f] for f in PACKED_FIELDS], state["count"], x, valid, threshold)
    state["count"].add_(valid.sum(dtype=torch.float64))


# ---- packed channel groups (the server's layout) -----------------------------------------------
# Every channel group of a model side by side: one (ΣC,) tensor per field of PACKED_FIELDS
# (float64; max_abs float32, as in a group's own state) and one count per group, so
# that a whole step of every layer is folded by one call (one fused kernel) instead of one call
# per layer. Each group's state dict holds views, so the dict API above still applies. (One
# tensor per field, not one (7, ΣC) tensor: torch.compile copies a whole input for every
# in-place update of one of its rows, 6x slower.)
PACKED_FIELDS = tuple(f for f in GROUP_FIELDS if f != "count")


def new_packed_channels(
    widths: list[int], device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Zeroed packed accumulators of groups of ``widths`` channels: ([one (ΣC,) per field of
    PACKED_FIELDS], counts (G,) float64, gid (ΣC,) int32 = the group of each channel (int32:
    half the bytes the fold reads), [each group's state, of views])."""
    fields = [torch.zeros(sum(widths), dtype=torch.float32 if f == "max_abs" else torch.float64,
                          device=device) for f in PACKED_FIELDS]
    counts = torch.zeros(len(widths), dtype=torch.float64, device=device)
    gid = torch.repeat_interleave(torch.arange(len(widths), dtype=torch.int32, device=device),
                                  torch.tensor(widths, device=device))
    groups, off = [], 0
    for g, c in enumerate(widths):
        st = {"count": counts[g:g + 1]}
        st.update({f: t[off:off + c] for f, t in zip(PACKED_FIELDS, fields, strict=True)})
        groups.append({f: st[f] for f in GROUP_FIELDS})  # the schema's order
        off += c
    return fields, counts, gid, groups


def fold_packed(
    fields: list[torch.Tensor],
    counts: torch.Tensor,
    gid: torch.Tensor,
    x: torch.Tensor,
    valid: torch.Tensor,
    threshold: float | torch.Tensor,
) -> None:
    """Fold a batch into packed groups. fields: one (C,) per field of PACKED_FIELDS (the
    columns of some groups); counts: (G',) the counts of those groups, every one of which this
    batch reaches; gid: (C,) each column's index into ``counts``; x: (T, C); valid: (T,) bool."""
    fold_channels(fields, counts[gid], x, valid, threshold)  # counts[gid]: (C,) each channel's own
    counts.add_(valid.sum(dtype=torch.float64))


def merge_channels(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    """Fold the accumulators of a disjoint sample ``other`` into ``state`` in place.

    Moments merge with Chan et al.'s pairwise update; sums add; maxima take the maximum."""
    n_a = state["count"].clone()
    n_b = other["count"]
    n = n_a + n_b
    delta = other["mean"] - state["mean"]
    inv_n = 1.0 / n.clamp(min=1.0)
    state["mean"].add_(delta * (n_b * inv_n))
    state["m2"].add_(other["m2"] + delta * delta * (n_a * n_b * inv_n))
    state["count"].copy_(n)
    for f in SUMMED_FIELDS:
        state[f].add_(other[f])
    state["max_abs"].copy_(torch.maximum(state["max_abs"], other["max_abs"]))


def update_block(
    state: dict[str, torch.Tensor], h_in: torch.Tensor, h_out: torch.Tensor, valid: torch.Tensor
) -> None:
    """Add the per-token cosine similarity between the residual stream entering (h_in) and
    leaving (h_out) a decoder layer. h_in, h_out: (T, H); valid: (T,) bool."""
    a = h_in.float()
    b = h_out.float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)  # (T,)
    cos = torch.where(valid, cos, 0.0)
    state["cos_sum"].add_(cos.sum(dtype=torch.float64))
    state["count"].add_(valid.sum(dtype=torch.float64))


def fold_blocks(
    blocks: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor, valid: torch.Tensor
) -> None:
    """``update_block`` for L consecutive layers at once. blocks: (2, L) float64, rows
    (cos_sum, count); h_in, h_out: (T, L, H); valid: (T,) bool."""
    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1, eps=1e-12)  # (T, L)
    cos = torch.where(valid.view(-1, 1), cos, 0.0)
    blocks[0].add_(cos.sum(0, dtype=torch.float64))
    blocks[1].add_(valid.sum(dtype=torch.float64))


def new_router_state(num_experts: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Zeroed float64 accumulators of one router: ``count`` (1,), the others (E,)."""
    return {f: torch.zeros(1 if f in SCALAR_FIELDS else num_experts, dtype=torch.float64, device=device)
            for f in ROUTER_FIELDS}


def new_packed_routers(
    widths: list[int], device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Zeroed accumulators of the routers of L layers with ``widths`` experts each, packed so
    that one call folds them all: ([count (L,), then (L, max E) for the other ROUTER_FIELDS],
    [each router's state, of views: count (1,), the others (E_l,)]). Columns past a layer's
    own E stay zero (its logits there are -inf: never picked, probability 0)."""
    e = max(widths, default=0)
    fields = [torch.zeros(len(widths), *(() if f in SCALAR_FIELDS else (e,)), dtype=torch.float64, device=device)
              for f in ROUTER_FIELDS]
    states = [{f: t[i:i + 1] if f in SCALAR_FIELDS else t[i, :w] for f, t in zip(ROUTER_FIELDS, fields, strict=True)}
              for i, w in enumerate(widths)]
    return fields, states


def route(logits: torch.Tensor, valid: torch.Tensor, top_k: int,
          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Qwen3-MoE's routing re-derived in float64: (probabilities (T, ..., E), top-k expert ids
    (T, ..., k), their weights (T, ..., k) — softmax over all E, divided by their sum when
    ``renormalize``). Padding rows (``valid`` (T,) False) are routed as zero logits; callers
    mask them. The top-k is taken on the logits, as vLLM's router does (softmax is monotone: the
    same experts as transformers' top-k of the probabilities)."""
    v = valid.view(-1, *([1] * (logits.dim() - 1)))  # (T, 1, ...)
    # torch.where, not multiplication: the profile run's NaN rows would poison the sums
    z = torch.where(v, logits.double(), 0.0)  # (T, ..., E)
    probs = torch.softmax(z, dim=-1)  # (T, ..., E)
    top_i = torch.topk(z, top_k, dim=-1).indices  # (T, ..., k)
    w = probs.gather(-1, top_i)  # (T, ..., k)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return probs, top_i, w


def fold_routers(
    fields: list[torch.Tensor],
    logits: torch.Tensor,
    valid: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> None:
    """Fold a batch of router logits of L layers into their accumulators: which experts each
    token's top-k picks and with what weight, as Qwen3-MoE routes (:func:`route`).

    fields: ROUTER_FIELDS in order: count (L,), topk_count / weight_sum / prob_sum (L, E), each
    row contiguous; logits: (T, L, E) any float dtype, as the model computed them; valid: (T,)
    bool."""
    count, topk_count, weight_sum, prob_sum = fields
    t, n_layers, e = logits.shape
    v = valid.view(-1, 1, 1)  # (T, 1, 1)
    probs, top_i, w = route(logits, valid, top_k, renormalize)  # (T, L, E), (T, L, k), (T, L, k)
    hit = v.expand_as(top_i).double()  # (T, L, k): 1 for a real token's pick, 0 for padding
    flat = (top_i + torch.arange(n_layers, device=logits.device).view(1, -1, 1) * e).reshape(-1)  # into (L·E,)
    topk_count.view(-1).index_add_(0, flat, hit.reshape(-1))
    weight_sum.view(-1).index_add_(0, flat, (w * hit).reshape(-1))
    prob_sum.add_(torch.where(v, probs, 0.0).sum(0))
    count.add_(valid.sum(dtype=torch.float64))


def update_router(
    state: dict[str, torch.Tensor],
    logits: torch.Tensor,
    valid: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> None:
    """Fold a batch of one router's logits into ``state`` (:func:`fold_routers` for L = 1).
    logits: (T, E) any float dtype, as the model computed them; valid: (T,) bool."""
    fields = [state[f] if f in SCALAR_FIELDS else state[f].view(1, -1) for f in ROUTER_FIELDS]
    fold_routers(fields, logits.reshape(logits.shape[0], 1, -1), valid, top_k, renormalize)


def reset_state(state: dict[str, torch.Tensor]) -> None:
    for t in state.values():
        t.zero_()


def export_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy a channel, block or router state to host numpy arrays in the stats-file layout."""
    out = {}
    for f, t in state.items():
        a = t.detach().to("cpu", copy=True).numpy()
        out[f] = a.reshape(()) if f in SCALAR_FIELDS else a
    return out
