"""Global allocation of a parameter budget across layers and unit kinds (pure maths, no torch).

A *pool* is one layer's units of one kind: its MLP neurons, or its attention heads counted in
the steps GQA allows (whole KV groups, or one query head per group). Each pool has legal kept
counts, the parameters it holds at each count, and a measured sensitivity: ``Δ`` = the loss
increase when that layer alone loses the fraction ``p0`` of that kind's units, refitted
(:mod:`actprune.pruning.compensate.sensitivity`). As for MLP widths (``removed_fractions``) the
cost of removing a fraction ``p`` is modelled as ``Δ · (p / p0)²``.

:func:`allocate_budget` removes at least nothing and at most ``budget`` parameters, taking the
steps down (pool at count ``hi`` → its next smaller legal count ``lo``) in order of least added
cost per parameter removed. With convex costs and fine steps this is the Lagrangian optimum
``p_ik ∝ P_ik p0_k² / Δ_ik``; a coarse step (one KV group is ~170 SmolLM2 neurons' worth of
parameters) that no longer fits the remaining budget is skipped, and the fine-grained MLP
pools fill the rest. A pool loses at most twice the fraction its Δ was measured at (the rule
that made MLP-only sensitivity widths robust, BENCHMARKS.md issue 7), so a noisy Δ ≤ 0 cannot
empty a layer — unless the budget cannot be met within those limits: then the rest is taken
past them, cheapest first (the budget is what the user asked for).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

__all__ = ["Pool", "allocate_budget"]


@dataclass(frozen=True)
class Pool:
    """allowed: ascending legal kept counts, the last one whole; params[j]: parameters the pool
    holds at ``allowed[j]``; removed[j]: the fraction of its units removed at ``allowed[j]``;
    delta: measured loss increase at removed fraction ``at``; cap: the most it may lose
    (default ``2 · at``: a Δ measured at one fraction says little about much larger cuts, and
    a noisy near-zero or negative Δ would otherwise make a layer look free). An explicit ``cap``
    holds even when the budget cannot be met within the limits (the user set it)."""

    allowed: list[int]
    params: list[int]
    removed: list[float]
    delta: float
    at: float
    cap: float | None = None

    @property
    def limit(self) -> float:
        return 2 * self.at if self.cap is None else self.cap

    def cost(self, j: int, floor: float = 1e-6) -> float:
        return max(self.delta, floor) * (self.removed[j] / self.at) ** 2


def allocate_budget(pools: list[Pool], budget: int, cap: float = 0.9) -> list[int]:
    """Kept count per pool removing at most ``budget`` parameters (as close as the steps allow)
    at the least modelled cost; no pool loses more than ``cap`` of its units. Each pool's own
    limit (:attr:`Pool.limit`, twice the fraction its Δ was measured at) holds while the budget
    can be met within the limits; when it cannot, a second pass goes past them (not past an
    explicit :attr:`Pool.cap`), still cheapest first, rather than returning a plan that silently
    removes less than was asked."""
    pos = [len(p.allowed) - 1 for p in pools]
    left = budget
    hard = [cap if p.cap is None else min(cap, p.cap) for p in pools]  # a pool's explicit cap always holds
    for bounds in ([min(cap, p.limit) for p in pools], hard):
        left = _take_steps(pools, pos, bounds, left)
        if left <= 0:
            break
    return [p.allowed[j] for p, j in zip(pools, pos, strict=True)]


def _take_steps(pools: list[Pool], pos: list[int], bounds: list[float], left: int) -> int:
    """Move ``pos`` down, cheapest step per parameter first, while steps fit in ``left`` and no
    pool passes its bound (a removed fraction); returns what is left of the budget."""
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        p, j = pools[i], pos[i]
        if j > 0 and p.removed[j - 1] <= bounds[i] + 1e-12:
            freed = p.params[j] - p.params[j - 1]
            heapq.heappush(heap, ((p.cost(j - 1) - p.cost(j)) / max(freed, 1), i))

    for i in range(len(pools)):
        push(i)
    while heap and left > 0:
        _, i = heapq.heappop(heap)
        p, j = pools[i], pos[i]
        freed = p.params[j] - p.params[j - 1]
        if freed > left:
            continue  # too coarse for what is left: this pool stops here, finer ones fill in
        left -= freed
        pos[i] -= 1
        push(i)
    return left
