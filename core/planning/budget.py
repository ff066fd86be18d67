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
empty a layer.
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
    a noisy near-zero or negative Δ would otherwise make a layer look free)."""

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
    at the least modelled cost; no pool loses more than ``cap`` of its units, nor more than its
    own limit (:attr:`Pool.limit`)."""
    pos = [len(p.allowed) - 1 for p in pools]
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        p, j = pools[i], pos[i]
        if j > 0 and p.removed[j - 1] <= min(cap, p.limit) + 1e-12:
            freed = p.params[j] - p.params[j - 1]
            heapq.heappush(heap, ((p.cost(j - 1) - p.cost(j)) / max(freed, 1), i))

    for i in range(len(pools)):
        push(i)
    left = budget
    while heap and left > 0:
        _, i = heapq.heappop(heap)
        p, j = pools[i], pos[i]
        freed = p.params[j] - p.params[j - 1]
        if freed > left:
            continue  # too coarse for what is left: this pool stops here, finer ones fill in
        left -= freed
        pos[i] -= 1
        push(i)
    return [p.allowed[j] for p, j in zip(pools, pos, strict=True)]
