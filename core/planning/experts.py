"""Expert scores and kept experts of a mixture-of-experts layer: pure functions of the router
statistics (``layers.{i}.router.*``, docs/moe.md), and the planner's part (:func:`expert_choice`:
the same share of experts in every sparse layer, or per-layer counts from one threshold across
layers, :func:`global_expert_counts`; :func:`check_expert_request`: what is refused).

Convention as in :mod:`.scores`: a *higher* score means *more important*. Each strategy maps one
sparse layer's router group — ``count`` (), ``topk_count`` (E,), ``weight_sum`` (E,),
``prob_sum`` (E,) — to (E,) scores:

- ``router_weighted`` (default)  ``weight_sum / count``: the mean routing weight an expert gets
  per token (zero when not picked), i.e. how much of the layer's output it carries on average
  if every expert's output had the same norm.
- ``frequency``                  ``topk_count / count``: the share of tokens whose top-k holds it.
- ``reap``                       ``reap_sum / topk_count``: REAP's saliency, the mean of routing
  weight × ‖expert output‖ over the tokens that picked the expert. Each expert's output is
  hidden inside vLLM's fused MoE kernel, so ``reap_sum`` comes from the offline recorder only
  (docs/moe.md); stats without it are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from actprune.core.archs import ModelShape, spec_for_config
from actprune.core.planning.allocation import of_free_layers
from actprune.core.wire.plan import PlanError
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import Stats

__all__ = ["EXPERT_STRATEGIES", "check_expert_request", "expert_choice", "expert_counts", "global_expert_counts",
           "kept_experts"]

ExpertStrategy = Callable[[dict[str, np.ndarray]], np.ndarray]


def _per_token(x: np.ndarray, count: np.ndarray) -> np.ndarray:
    n = float(count)
    return np.asarray(x, dtype=np.float64) / n if n > 0 else np.zeros(np.shape(x), dtype=np.float64)


def _reap(g: dict[str, np.ndarray]) -> np.ndarray:
    """REAP's saliency: mean routing weight × ‖output‖ over the tokens that picked the expert."""
    picks = np.asarray(g["topk_count"], dtype=np.float64)
    return np.divide(g["reap_sum"], picks, out=np.zeros_like(picks), where=picks > 0)


EXPERT_STRATEGIES: dict[str, ExpertStrategy] = {
    "router_weighted": lambda g: _per_token(g["weight_sum"], g["count"]),
    "frequency": lambda g: _per_token(g["topk_count"], g["count"]),
    "reap": _reap,
}
# strategy -> the router fields it reads beyond ROUTER_FIELDS, and who writes them
_NEEDS = {"reap": ("reap_sum", "the offline recorder (actprune record), which recomputes each routed expert's "
                   "output; a server's fused MoE kernel hides them")}


def expert_counts(num_experts: int, top_k: int, multiple: int, minimum: int = 1) -> list[int]:
    """Legal kept expert counts, ascending: at least ``top_k`` (every token still finds k
    experts) and ``minimum``, multiples of ``multiple`` (expert parallelism shards whole
    experts), at most E."""
    return [k for k in range(multiple, num_experts + 1, multiple) if k >= max(top_k, minimum)]


def kept_experts(scores: np.ndarray, keep: int) -> list[int]:
    """The ``keep`` best-scored experts, in source order; ties keep the lower index."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")  # (E,) best first
    return sorted(int(e) for e in order[:keep])


# ---- the planner's part --------------------------------------------------------------------
def check_expert_request(shape: ModelShape, request: PlanRequest) -> None:
    """What the planner does for a mixture-of-experts model, and refuses to do yet."""
    if not any(s.num_experts is not None for s in shape.layers):
        if request.expert_ratio is not None:
            raise PlanError("expert_ratio: this model has no routed experts; use mlp_ratio / head_ratio")
        return
    if request.expert_strategy not in EXPERT_STRATEGIES:
        raise PlanError(f"expert_strategy: unknown {request.expert_strategy!r}; "
                        f"choose one of {sorted(EXPERT_STRATEGIES)}")
    if request.param_ratio is not None and request.expert_ratio is not None:
        raise PlanError("param_ratio: on a mixture-of-experts model it sets how many experts go; "
                        "give param_ratio or expert_ratio, not both")
    refused = {"head_ratio": request.head_ratio, "drop_layers": request.drop_layers,
               "drop_layer_ratio": request.drop_layer_ratio, "layer_sensitivity": request.layer_sensitivity}
    for name, value in refused.items():
        if value:
            raise PlanError(f"{name}: not supported for mixture-of-experts models yet; use expert_ratio "
                            "(with per_layer: counts per sparse layer) and mlp_ratio (dense layers)")


def global_expert_counts(scores: dict[int, np.ndarray], allowed: dict[int, list[int]], remove: int) -> dict[int, int]:
    """Per sparse layer, how many experts to keep so that about ``remove`` experts go in all,
    those of least score across layers (one threshold on the score, within each layer's legal
    counts ``allowed``, ascending). Removal goes in steps from one legal count to the next lower
    one, the step whose experts have the least mean score first; since each layer's experts go
    lowest first, a layer's steps cost more and more, and the greedy choice removes the least
    total score for its count. A step that would overshoot ``remove`` by more than it falls
    short is not taken (ties keep more)."""
    keep = {i: len(s) for i, s in scores.items()}
    ranked = {i: np.sort(np.asarray(s, dtype=np.float64)) for i, s in scores.items()}  # (E_i,) ascending

    def step(i: int) -> tuple[float, int, int] | None:
        lower = [c for c in allowed[i] if c < keep[i]]
        if not lower:
            return None
        gone = ranked[i][len(ranked[i]) - keep[i]: len(ranked[i]) - lower[-1]]  # the next experts to go
        return float(gone.mean()), i, lower[-1]

    removed = 0
    steps = [s for i in scores if (s := step(i)) is not None]
    while steps and removed < remove:
        steps.sort()
        _, i, c = steps.pop(0)
        size = keep[i] - c
        if removed + size - remove >= remove - removed:  # would land farther from (or as far as) the target
            continue
        keep[i], removed = c, removed + size
        if (s := step(i)) is not None:
            steps.append(s)
    return keep


def _budget_ratio(shape: ModelShape, sparse: list[int], param_ratio: float) -> float:
    """The fraction of routed experts whose parameters (3 · hidden · width each, plus a router
    row) make ``param_ratio`` of the whole model's: what ``param_ratio`` removes from an MoE
    model, all of it from experts (attention and dense layers keep their widths)."""
    h = shape.hidden_size
    per_expert = {i: 3 * h * shape.layers[i].intermediate_size + h for i in sparse}
    held = sum(shape.layers[i].num_experts * per_expert[i] for i in sparse)
    want = param_ratio * shape.params()
    if want >= held:
        raise PlanError(f"param_ratio: {param_ratio} of the parameters is more than the routed experts it may "
                        f"remove hold ({held / shape.params():.1%}: those outside keep_layers); on a mixture-of-experts "
                        "model it removes experts only")
    return want / held  # every expert holds as many parameters (one moe_intermediate_size)


def expert_choice(stats: Stats, shape: ModelShape, config: dict[str, Any], request: PlanRequest,
                  protected: frozenset[int] = frozenset()) -> dict[int, list[int]]:
    """Sparse layer -> kept experts, its best-scored ones: in every sparse layer the legal count
    nearest to (1 − ratio) · E_i, or with ``per_layer`` the counts of :func:`global_expert_counts`.
    Layers in ``protected`` (``keep_layers``) keep every expert; the ratio still counts every
    sparse layer's experts, taken from the others."""
    every = [i for i, s in enumerate(shape.layers) if s.num_experts is not None]
    whole = {i: list(range(shape.layers[i].num_experts)) for i in every if i in protected}
    sparse = [i for i in every if i not in protected]
    full = {i: shape.layers[i].num_experts for i in sparse}
    # the same number of experts, from the layers not kept whole
    ratio = of_free_layers(request.expert_ratio, "expert_ratio", "routed experts",
                           {i: shape.layers[i].num_experts for i in every}, protected)
    if request.param_ratio is not None and every:
        if not sparse:
            raise PlanError("param_ratio: every sparse layer is in keep_layers: no expert may go")
        ratio = _budget_ratio(shape, sparse, request.param_ratio)
    if not ratio:
        return {i: list(range(full[i])) for i in sparse} | whole
    top_k = spec_for_config(config).moe.routing(config)[1]
    allowed = {}
    for i in sparse:
        # vLLM's Qwen3-MoE block refuses fewer experts than tensor-parallel ranks
        allowed[i] = expert_counts(full[i], top_k, request.expert_multiple, max(request.tp_size, request.min_experts))
        if not allowed[i]:
            raise PlanError(f"expert_multiple: no count of experts <= {full[i]} (layer {i}) is a multiple of "
                            f"{request.expert_multiple} and >= top-k {top_k}, tp_size {request.tp_size} and "
                            f"min_experts {request.min_experts}")
    groups = {i: stats.router(i) for i in sparse}
    need = _NEEDS.get(request.expert_strategy)
    if need is not None and any(need[0] not in g for g in groups.values()):
        raise PlanError(f"expert_strategy {request.expert_strategy!r} needs the stats' {need[0]}, which only "
                        f"{need[1]}; these stats lack it: record them offline or choose router_weighted")
    score = EXPERT_STRATEGIES[request.expert_strategy]
    scores = {i: score(groups[i]) for i in sparse}
    if request.per_layer:
        counts = global_expert_counts(scores, allowed, round(ratio * sum(full.values())))
    else:  # nearest legal count, ties keep more
        counts = {i: min(allowed[i], key=lambda k, i=i: (abs(k - (1.0 - ratio) * full[i]), -k))
                  for i in sparse}
    return {i: kept_experts(scores[i], counts[i]) for i in sparse} | whole
