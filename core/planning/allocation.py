"""Kept counts per layer: how many units each layer keeps, from unit scores and legal counts.

Pure functions (numbers in, numbers out: no stats, configs or requests), so they sit apart from
:mod:`.planner`, which gathers scores and constraints and calls them; they are unit-tested on
small hand-checked inputs, and the benches call them on their own.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np
from actprune.core.planning.scores import standardise
from actprune.core.wire.plan import PlanError

__all__ = ["allocate", "allocate_by_cost", "allowed_counts", "nearest_within", "of_free_layers", "removed_fractions"]


def allowed_counts(full: int, multiple: int, minimum: int, ok=None) -> list[int]:
    """Kept counts in [minimum, full] that are multiples of ``multiple`` and pass ``ok``."""
    return [k for k in range(multiple, full + 1, multiple) if k >= minimum and (ok is None or ok(k))]


def allocate(
    unit_scores: list[np.ndarray], allowed: list[list[int]], keep: float, per_layer: bool
) -> list[int]:
    """Kept unit count per layer keeping about ``keep`` of all units.

    unit_scores[i]: (n_i,) scores of layer i sorted best first; allowed[i]: ascending legal kept
    counts. Uniform: every layer keeps the legal count nearest to ``keep * n_i`` (ties keep
    more). Per-layer: scores are standardised within each layer, then the globally cheapest
    steps down (mean standardised score of the units a step removes) are taken until the total
    reaches ``round(keep * sum n_i)``.
    """
    if not per_layer:
        return [_nearest(a, keep * len(s)) for s, a in zip(unit_scores, allowed, strict=True)]
    z = [standardise(s) for s in unit_scores]
    target = round(keep * sum(len(s) for s in unit_scores))
    return _step_down(allowed, lambda i, lo, hi: float(z[i][lo:hi].mean()), target)


def allocate_by_cost(costs: list[dict[int, float]], target: int) -> list[int]:
    """Kept count per layer with ``sum <= target`` (as close as the steps allow) and the least
    total cost, greedily: from every layer whole, take the step down (to the next smaller
    allowed count) whose cost increase is smallest, until the total reaches ``target``.

    costs[i]: allowed kept count -> cost of layer i at that width (e.g. the output error left
    after refitting, :func:`compensate.refit_residual`); the largest count is the layer whole.
    Exact when each layer's cost is convex in the count, a good heuristic otherwise."""
    return _step_down([sorted(c) for c in costs],
                      lambda i, lo, hi: (costs[i][lo] - costs[i][hi]) / (hi - lo), target)


def _step_down(allowed: list[list[int]], step_cost: Callable[[int, int, int], float], target: int) -> list[int]:
    """From every layer at its largest allowed count, take the cheapest step down (layer i
    from count hi to the next smaller lo costs ``step_cost(i, lo, hi)``) until the total kept
    is at most ``target`` or no step is left."""
    pos = [len(a) - 1 for a in allowed]
    counts = [a[-1] for a in allowed]
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        if pos[i] > 0:
            heapq.heappush(heap, (step_cost(i, allowed[i][pos[i] - 1], allowed[i][pos[i]]), i))

    for i in range(len(allowed)):
        push(i)
    while sum(counts) > target and heap:
        _, i = heapq.heappop(heap)
        pos[i] -= 1
        counts[i] = allowed[i][pos[i]]
        push(i)
    return counts


def removed_fractions(deltas: list[float], ratio: float, sizes: list[int] | None = None,
                      cap: float | None = None, floor: float = 1e-6, exponent: float = 1.0) -> list[float]:
    """Removed MLP fraction per layer from measured sensitivities Δ (:mod:`.sensitivity`), so
    that ``ratio`` of all units (layer i has ``sizes[i]``, default equal) go: ``p_i = c · Δ_i^-e``
    (e = ``exponent``) below ``cap`` (default ``min(2 · ratio, 0.9)``), ``cap`` above it
    (water-filling). With the model ``Δ_i(p) = Δ_i · (p / ratio)^α`` this minimises the summed
    loss increase at that total for ``e = 1 / (α − 1)``: 1 for a quadratic model, 1/2 for a cubic
    one, 0 (uniform) in the limit. Δ below ``floor`` (zero or negative: noise) counts as ``floor``."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if not 0 <= exponent <= 4:
        raise ValueError(f"exponent must be in [0, 4], got {exponent}")
    cap = min(2 * ratio, 0.9) if cap is None else cap
    if ratio == 0 or not deltas:
        return [0.0] * len(deltas)
    inv = np.maximum(np.asarray(deltas, dtype=np.float64), floor) ** -exponent
    n = np.ones(len(inv)) if sizes is None else np.asarray(sizes, dtype=np.float64)
    free = np.ones(len(inv), dtype=bool)
    budget = ratio * n.sum()
    while True:
        c = (budget - cap * n[~free].sum()) / (n[free] * inv[free]).sum()
        p = np.where(free, c * inv, cap)
        if not (p[free] > cap + 1e-12).any():
            return [float(x) for x in p]
        free &= p <= cap + 1e-12


def nearest_within(want: list[float], allowed: list[list[int]], floor: float) -> list[int]:
    """Per layer the allowed count nearest to ``want[i]`` (ties keep more), then, while the total
    is below ``floor``, the layer rounded down furthest raised one allowed step: rounding each
    layer alone can remove a few units more than asked, and a budget is a most (compress
    compares candidates at the same parameter count). Layers already whole stay so."""
    counts = [_nearest(a, w) for a, w in zip(allowed, want, strict=True)]
    while sum(counts) < floor - 1e-9:
        up = [i for i, (a, c) in enumerate(zip(allowed, counts, strict=True)) if c < a[-1]]
        if not up:
            break
        i = max(up, key=lambda j: want[j] - counts[j])
        counts[i] = next(k for k in allowed[i] if k > counts[i])
    return counts


def _nearest(allowed: list[int], want: float) -> int:
    return min(allowed, key=lambda k: (abs(k - want), -k))


def of_free_layers(ratio: float | None, name: str, what: str, units: dict[int, int],
                   protected: frozenset[int]) -> float | None:
    """A ratio of all ``units`` (layer -> count) as a ratio of those of the layers outside
    ``protected`` (``keep_layers``): the same number of units removed, from those layers only.
    PlanError, naming the request field ``name``, when they do not hold that many."""
    if not ratio or not protected:
        return ratio
    free = sum(n for i, n in units.items() if i not in protected)
    total = sum(units.values())
    if free == 0 or ratio * total >= free:
        raise PlanError(f"{name}: {ratio:g} of the {what} is {ratio * total:.0f} of {total}; the layers outside "
                        f"keep_layers hold {free}: keep fewer layers whole or remove less")
    return ratio * total / free
