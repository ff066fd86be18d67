"""Scores: pure functions from activation statistics (and a few weight norms) to importance.

Convention: a *higher* score means *more important*; the planner removes the lowest. Every unit
strategy maps the per-channel figures of one layer's group (MLP neurons at the input of
``down_proj``, or attention channels at the input of ``o_proj``) to a ``(C,)`` array. Weight-aware
strategies also get ``col_norm``: the L2 norm of each input column of that ``down_proj`` /
``o_proj`` (read tensor by tensor from the checkpoint by :class:`actprune.core.tensor.checkpoint.ColumnNorms`).

Strategies (adding one = one decorated function):

- ``magnitude``  mean |x| (Minitron)
- ``variance``   Var[x]
- ``sparsity``   1 - fraction of near-zero activations (sparse units go first)
- ``importance`` w_m·mm(mean|x|) + w_v·mm(Var x) + w_s·mm(1 - sparsity), mm = min-max per layer
- ``wifv``       Var[x] · ‖W[:, j]‖²   (FLAP's weighted input feature variance)
- ``wanda_sp``   ‖x_j‖₂ · ‖W[:, j]‖₂   (structured Wanda: activation L2 norm × column norm)

Layer strategy: ``block_influence`` = 1 - mean cos(residual in, residual out) (ShortGPT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from actprune.core.stats_math import ChannelFigures, figures
from actprune.core.wire.plan_request import ImportanceWeights
from actprune.core.wire.schema import SPARSE_FRACTION
from actprune.core.wire.stats import Stats

__all__ = [
    "LAYER_STRATEGIES",
    "STRATEGIES",
    "GroupFigures",
    "ScoreInput",
    "Strategy",
    "head_scores",
    "layer_scores",
    "minmax",
    "standardise",
    "strategy",
    "describe_group",
]


# ---- the figures users expect -------------------------------------------------------------
@dataclass(frozen=True)
class GroupFigures:
    """User-facing figures of one channel group; per-channel arrays are (C,)."""

    l1_norm: float  # sum |x| over every token and channel
    l2_norm: float  # sqrt(sum x^2) over every token and channel
    channel_l1: np.ndarray
    channel_l2: np.ndarray
    max_abs: float
    mean_abs: float
    variance: float  # pooled over every token and channel
    channel_variance: np.ndarray
    variance_min: float
    variance_max: float
    sparsity: float  # fraction of near-zero values over every token and channel
    channel_sparsity: np.ndarray
    sparse_90_ratio: float  # fraction of channels that are near zero on > 90 % of tokens


def describe_group(group: dict[str, np.ndarray]) -> GroupFigures:
    """Figures of one accumulator group (the fields of the stats file)."""
    f = figures(group)
    n, c = max(f.count, 1.0), f.mean.shape[0]
    grand_mean = float(f.mean.mean())
    # Law of total variance: within-channel spread plus spread of the channel means.
    pooled = (float(group["m2"].sum()) + n * float(((f.mean - grand_mean) ** 2).sum())) / (n * c)
    return GroupFigures(
        l1_norm=float(group["sum_abs"].sum()),
        l2_norm=float(np.sqrt(np.maximum(group["sum_sq"], 0).sum())),
        channel_l1=group["sum_abs"].astype(np.float64),
        channel_l2=f.l2,
        max_abs=float(f.max_abs.max()),
        mean_abs=float(f.mean_abs.mean()),
        variance=pooled,
        channel_variance=f.var,
        variance_min=float(f.var.min()),
        variance_max=float(f.var.max()),
        sparsity=float(f.sparsity.mean()),
        channel_sparsity=f.sparsity,
        sparse_90_ratio=float((f.sparsity > SPARSE_FRACTION).mean()),
    )


# ---- normalisations -----------------------------------------------------------------------
def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant array maps to zeros (it carries no ranking information)."""
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x, dtype=np.float64)


def standardise(x: np.ndarray) -> np.ndarray:
    """z-score within one layer, so that scores of different layers can be ranked together."""
    sd = float(x.std())
    return (x - float(x.mean())) / sd if sd > 0 else np.zeros_like(x, dtype=np.float64)


# ---- unit strategies ----------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreInput:
    figures: ChannelFigures
    weights: ImportanceWeights
    col_norm: np.ndarray | None = None  # (C,) L2 norm of the matching output-weight column


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[[ScoreInput], np.ndarray]
    needs_weights: bool


STRATEGIES: dict[str, Strategy] = {}


def strategy(name: str, *, needs_weights: bool = False) -> Callable:
    """Register a unit strategy ``fn(ScoreInput) -> (C,) scores``."""

    def register(fn: Callable[[ScoreInput], np.ndarray]) -> Callable[[ScoreInput], np.ndarray]:
        STRATEGIES[name] = Strategy(name, fn, needs_weights)
        return fn

    return register


def _col_norm(s: ScoreInput) -> np.ndarray:
    if s.col_norm is None:
        raise ValueError("this strategy needs weight column norms (pass the checkpoint)")
    return s.col_norm


@strategy("magnitude")
def magnitude(s: ScoreInput) -> np.ndarray:
    return s.figures.mean_abs


@strategy("variance")
def variance(s: ScoreInput) -> np.ndarray:
    return s.figures.var


@strategy("sparsity")
def sparsity(s: ScoreInput) -> np.ndarray:
    """Density, 1 - sparsity: the units most often near zero score lowest and go first."""
    return 1.0 - s.figures.sparsity


@strategy("importance")
def importance(s: ScoreInput) -> np.ndarray:
    w = s.weights
    f = s.figures
    return w.magnitude * minmax(f.mean_abs) + w.variance * minmax(f.var) + w.sparsity * minmax(1.0 - f.sparsity)


@strategy("wifv", needs_weights=True)
def wifv(s: ScoreInput) -> np.ndarray:
    return s.figures.var * _col_norm(s) ** 2


@strategy("wanda_sp", needs_weights=True)
def wanda_sp(s: ScoreInput) -> np.ndarray:
    return s.figures.l2 * _col_norm(s)


def head_scores(channel_scores: np.ndarray, num_heads: int) -> np.ndarray:
    """Per-head score = sum of its channels' scores. channel_scores: (H*D,) -> (H,)."""
    if channel_scores.shape[0] % num_heads:
        raise ValueError(f"{channel_scores.shape[0]} attention channels do not split into {num_heads} heads")
    return channel_scores.reshape(num_heads, -1).sum(axis=1)  # (H, D) -> (H,)


# ---- layer strategies ---------------------------------------------------------------------
LAYER_STRATEGIES: dict[str, Callable[[Stats, list[int]], np.ndarray]] = {}


def _block_influence(stats: Stats, layers: list[int]) -> np.ndarray:
    return np.array([stats.block_influence(i) for i in layers], dtype=np.float64)


LAYER_STRATEGIES["block_influence"] = _block_influence


def layer_scores(stats: Stats, layers: list[int], name: str = "block_influence") -> np.ndarray:
    """(L,) layer importance; NaN (a layer that saw no token) ranks as most important."""
    s = LAYER_STRATEGIES[name](stats, layers)
    return np.where(np.isnan(s), np.inf, s)
