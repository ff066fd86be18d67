"""The JSON summary of a snapshot (``GET /activations/stats``), as a pure numpy function.

The server calls :func:`summarize` on its snapshot; ``actprune stats show`` calls it on a file,
so both always show the same figures. The importance score is mean |x| per unit (a head's score
is the mean over its channels); see :class:`~actprune.core.wire.api.StatsSummary`.

Heads need ``head_dim``: taken from the argument, else from the metadata key ``head_dim``;
without either, ``heads`` is null and only per-channel attention figures are given.
"""

from __future__ import annotations

import math

import numpy as np
from actprune.core.wire.api import (
    ChannelGroupSummary,
    ExpertsSummary,
    HeadsSummary,
    LayerSummary,
    SnapshotMeta,
    Spread,
    StatsSummary,
    UnitScore,
)
from actprune.core.wire.schema import SPARSE_FRACTION
from actprune.core.wire.stats import Stats, StatsFormatError

__all__ = ["summarize"]


def summarize(stats: Stats, k: int = 10, *, head_dim: int | None = None) -> StatsSummary:
    """Summarise every layer of ``stats``; ``k`` least-important units are listed per group."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if head_dim is None and stats.meta.get("head_dim") is not None:
        head_dim = int(stats.meta["head_dim"])
    if head_dim is not None and head_dim < 1:
        raise StatsFormatError(f"head_dim must be >= 1, got {head_dim}")
    layers = [_layer(stats, i, k, head_dim) for i in stats.layers]
    meta = dict(stats.meta)
    meta.setdefault("format_version", 1)
    return StatsSummary(k=k, meta=SnapshotMeta.model_validate(meta), layers=layers)


def _layer(stats: Stats, i: int, k: int, head_dim: int | None) -> LayerSummary:
    router = stats.router(i)
    mlp = None if router is not None else stats.figures(i, "mlp")
    attn = stats.figures(i, "attn")
    heads = None
    if head_dim is not None:
        width = attn.mean_abs.shape[0]
        if width % head_dim:
            raise StatsFormatError(
                f"layer {i}: {width} attention channels is not a multiple of head_dim {head_dim}"
            )
        nh = width // head_dim
        per_head = {
            # (C,) -> (nh, head_dim) -> (nh,)
            name: arr.reshape(nh, head_dim).mean(axis=1)
            for name, arr in (("mean_abs", attn.mean_abs), ("std", attn.std), ("sparsity", attn.sparsity))
        }
        heads = HeadsSummary(
            num_heads=nh,
            head_dim=head_dim,
            mean_abs=_list(per_head["mean_abs"]),
            std=_list(per_head["std"]),
            sparsity=_list(per_head["sparsity"]),
            least_important=_lowest(per_head["mean_abs"], k),
        )
    return LayerSummary(
        layer=i,
        tokens=int(attn.count),
        mlp=None if mlp is None else _group(mlp.mean, mlp.std, mlp.mean_abs, mlp.sparsity, mlp.max_abs, k),
        experts=None if router is None else _experts(router, k),
        attn=_group(attn.mean, attn.std, attn.mean_abs, attn.sparsity, attn.max_abs, k),
        heads=heads,
        block_influence=_finite(stats.block_influence(i)),
    )


def _experts(router: dict[str, np.ndarray], k: int) -> ExpertsSummary:
    n = float(router["count"])
    picks, weights = router["topk_count"], router["weight_sum"]  # (E,) each
    with np.errstate(invalid="ignore", divide="ignore"):  # no token yet: null, not NaN
        frequency = picks / n
        mean_weight = weights / picks
        weighted = weights / n
    return ExpertsSummary(num_experts=int(picks.shape[0]), frequency=_list(frequency),
                          mean_weight=_list(mean_weight), least_used=_lowest(weighted, k))


def _group(
    mean: np.ndarray, std: np.ndarray, mean_abs: np.ndarray, sparsity: np.ndarray,
    max_abs: np.ndarray, k: int,
) -> ChannelGroupSummary:
    width = int(mean.shape[0])
    return ChannelGroupSummary(
        width=width,
        mean=_spread(mean),
        std=_spread(std),
        mean_abs=_spread(mean_abs),
        sparsity=_spread(sparsity),
        frac_sparse_90=_finite(np.mean(sparsity > SPARSE_FRACTION)) if width else None,
        max_abs=_finite(np.max(max_abs)) if width else None,
        least_important=_lowest(mean_abs, k),
    )


def _spread(x: np.ndarray) -> Spread:
    if x.size == 0:
        return Spread(min=None, mean=None, max=None)
    return Spread(min=_finite(np.min(x)), mean=_finite(np.mean(x)), max=_finite(np.max(x)))


def _lowest(score: np.ndarray, k: int) -> list[UnitScore]:
    """The k smallest scores, smallest first; ties broken by index so the answer is stable.
    NaN scores sort last (never "least important" by accident)."""
    k = min(k, score.shape[0])
    if k == 0:
        return []
    key = np.where(np.isnan(score), np.inf, score)
    # argpartition first: a full sort of 25k neurons x 64 layers dominates the summary time
    if k < key.shape[0]:
        kth = np.partition(key, k - 1)[k - 1]
        cand = np.flatnonzero(key <= kth)  # every index that can be among the k (ties kept)
    else:
        cand = np.arange(key.shape[0])
    order = cand[np.lexsort((cand, key[cand]))][:k]
    return [UnitScore(index=int(j), score=_finite(score[j])) for j in order]


def _list(x: np.ndarray) -> list[float | None]:
    return [_finite(v) for v in x.tolist()]


def _finite(x: float | np.floating) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
