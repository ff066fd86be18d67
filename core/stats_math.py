"""Pure numpy maths on streaming activation accumulators.

Every accumulator in a stats file adds up across batches, ranks and servers, so merging two
snapshots of the same model is exact. Variance is carried as (count, mean, m2) and merged with
Chan et al.'s pairwise formula, which stays accurate over 10^8+ tokens with large means where
``sum_sq / n - mean**2`` would cancel catastrophically.

Shapes: ``count`` is a scalar (every token reaches every channel of a layer); all other
per-channel arrays are ``(C,)`` for C channels (MLP neurons or attention channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from actprune.core.wire.schema import SUMMED_FIELDS

__all__ = ["ChannelFigures", "chan_merge", "figures", "merge_channel_arrays"]


def chan_merge(
    n_a: float, mean_a: np.ndarray, m2_a: np.ndarray, n_b: float, mean_b: np.ndarray, m2_b: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Merge two (count, mean, m2) summaries of disjoint samples (Chan, Golub & LeVeque 1979)."""
    n = n_a + n_b
    if n == 0:
        return 0.0, np.zeros_like(mean_a), np.zeros_like(m2_a)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return float(n), mean, m2


def merge_channel_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merge two per-channel accumulator groups (keys: count, mean, m2, sum, sum_sq, sum_abs,
    max_abs, near_zero). Sums add, maxima take the maximum, moments merge with Chan."""
    n, mean, m2 = chan_merge(
        float(a["count"]), a["mean"], a["m2"], float(b["count"]), b["mean"], b["m2"]
    )
    out = {"count": np.asarray(n, dtype=np.float64), "mean": mean, "m2": m2,
           "max_abs": np.maximum(a["max_abs"], b["max_abs"])}
    out.update({f: a[f] + b[f] for f in SUMMED_FIELDS})
    return out


@dataclass(frozen=True)
class ChannelFigures:
    """Per-channel figures derived from one accumulator group; every array is (C,)."""

    count: float
    mean: np.ndarray
    var: np.ndarray  # population variance
    mean_abs: np.ndarray
    rms: np.ndarray  # sqrt(E[x^2]) = per-channel L2 norm / sqrt(count)
    l2: np.ndarray  # sqrt(sum x^2): the per-channel L2 norm over all tokens
    max_abs: np.ndarray
    sparsity: np.ndarray  # fraction of tokens with |x| <= threshold

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)


def figures(group: dict[str, np.ndarray]) -> ChannelFigures:
    """Derive the user-facing per-channel figures from an accumulator group."""
    n = float(group["count"])
    safe = max(n, 1.0)
    var = np.maximum(group["m2"] / safe, 0.0)
    sum_sq = np.maximum(group["sum_sq"], 0.0)
    return ChannelFigures(
        count=n,
        mean=group["mean"].astype(np.float64),
        var=var,
        mean_abs=group["sum_abs"] / safe,
        rms=np.sqrt(sum_sq / safe),
        l2=np.sqrt(sum_sq),
        max_abs=group["max_abs"].astype(np.float64),
        sparsity=group["near_zero"] / safe,
    )
