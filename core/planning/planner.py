"""Planner: statistics + config + request -> a validated :class:`Plan`.

``make_plan`` is the one entry point (the CLI and the server's ``POST /prune/plan`` call it).
Steps: score units per layer (:mod:`.scores`), pick layers to drop by layer score, turn the
request's ratios (or its parameter budget) into kept counts per layer that satisfy the
constraints (:func:`.allocation.allocate`), then keep the best-scored units of every layer.

A *unit* is what the planner counts: an MLP neuron; a KV group (``head_mode="kv_groups"``, all
its query heads go with it); or, with ``head_mode="query_heads"``, one *level* of query heads,
i.e. the j-th best query head of every KV group (GQA needs the same number per group).

Mixture-of-experts models (:mod:`.experts`): every sparse layer keeps the same number of its
best-scored routed experts (``expert_ratio``), dense layers may lose MLP neurons
(``mlp_ratio``); heads, layer drops, budgets and per-layer counts are refused for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import numpy as np
from actprune.core.archs import LayerShape, ModelShape, model_shape, spec_for_config
from actprune.core.planning.allocation import (
    allocate,
    allowed_counts,
    nearest_within,
    of_free_layers,
    removed_fractions,
)
from actprune.core.planning.budget import Pool, allocate_budget
from actprune.core.planning.experts import check_expert_request, expert_choice
from actprune.core.planning.scores import (
    LAYER_STRATEGIES,
    STRATEGIES,
    ScoreInput,
    head_scores,
    layer_scores,
)
from actprune.core.wire.plan import (
    DENSE_PLAN_VERSION,
    PLAN_VERSION,
    LayerPlan,
    LayerWidths,
    Plan,
    PlanError,
    Provenance,
    SourceModel,
)
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.schema import ROUTER_KIND, key
from actprune.core.wire.stats import Stats, config_hash

__all__ = ["ColumnNormsFn", "make_plan"]

# (layer, kind) -> (C,) L2 norms of the input columns of that layer's down_proj ("mlp") or
# o_proj ("attn") weight; actprune.core.tensor.checkpoint.ColumnNorms reads them from a checkpoint.
ColumnNormsFn = Callable[[int, str], np.ndarray]


_SENSITIVITY_MAX = 0.9  # allocation.removed_fractions' largest cap


def _tp_ok(k: int, tp: int) -> bool:
    # vLLM shards KV heads across ranks, or replicates them when there are fewer heads than ranks.
    return k % tp == 0 or tp % k == 0


# ---- scoring ------------------------------------------------------------------------------
def _channel_scores(stats: Stats, layer: int, kind: str, request: PlanRequest, norms) -> np.ndarray:
    strat = STRATEGIES[request.strategy]
    col = norms(layer, kind) if strat.needs_weights else None
    s = strat.fn(ScoreInput(stats.figures(layer, kind), request.weights, col))
    return np.nan_to_num(np.asarray(s, dtype=np.float64), nan=0.0, posinf=np.finfo(np.float64).max)


# ---- the entry point ----------------------------------------------------------------------
def make_plan(stats: Stats, config: dict[str, Any], request: PlanRequest,
              column_norms: ColumnNormsFn | None = None) -> Plan:
    """Plan structured pruning of the model ``config`` from ``stats``; PlanError on bad input.
    ``column_norms`` feeds the weight-aware strategies (``wifv``, ``wanda_sp``)."""
    try:
        shape = model_shape(config)
    except (ValueError, KeyError, TypeError) as e:
        raise PlanError(f"model config: {e}") from e
    chash = config_hash(config)
    _check_inputs(stats, shape, chash, request, column_norms)
    check_expert_request(shape, request)
    norms = column_norms

    protected = _protected_layers(shape, request)
    dropped = _dropped_layers(stats, shape, request, protected)
    kept = [i for i in range(shape.num_layers) if i not in dropped]
    free = [i for i in kept if i not in protected]  # the layers every ratio and budget takes from
    whole = [i for i in kept if i in protected]  # every unit kept: the choices below with no ratio
    whole_mlp = _mlp_choice(stats, shape, whole, request, None, norms)
    whole_heads = _HeadChoice(stats, shape, whole, request, norms).choose(None)
    dense = [i for i in kept if shape.layers[i].num_experts is None]
    mlp_ratio = of_free_layers(request.mlp_ratio, "mlp_ratio", "MLP neurons",
                               {i: shape.layers[i].intermediate_size for i in dense}, protected)
    head_ratio = of_free_layers(request.head_ratio, "head_ratio", "attention heads",
                                {i: shape.layers[i].num_attention_heads for i in kept}, protected)
    heads = _HeadChoice(stats, shape, free, request, norms)
    if request.param_ratio is not None and request.head_sensitivity is not None:
        mlp_counts, head_keep = _global_budget(shape, free, dropped, request, heads)
        mlp_keep = _mlp_choice(stats, shape, free, request, None, norms, mlp_counts)
        return _assemble(stats, config, shape, chash, request, dropped, mlp_keep | whole_mlp,
                         head_keep | whole_heads, {})
    if request.param_ratio is not None and not any(s.num_experts for s in shape.layers):  # MoE: experts go
        mlp_ratio, head_ratio = _split_budget(shape, free, dropped, request, heads)
    head_keep = heads.choose(head_ratio) | whole_heads
    mlp_keep = _mlp_choice(stats, shape, free, request, mlp_ratio, norms) | whole_mlp
    experts_keep = expert_choice(stats, shape, config, request, protected)
    return _assemble(stats, config, shape, chash, request, dropped, mlp_keep, head_keep, experts_keep)


def _protected_layers(shape: ModelShape, request: PlanRequest) -> frozenset[int]:
    """``keep_layers`` as layer indices (negative ones count from the end)."""
    n = shape.num_layers
    out = set()
    for i in request.keep_layers or ():
        if not -n <= i < n:
            raise PlanError(f"keep_layers: the model has no layer {i}; it has {n} (0 to {n - 1}, or -1 to -{n})")
        out.add(i % n)
    return frozenset(out)


def _check_inputs(stats: Stats, shape: ModelShape, chash: str, request: PlanRequest,
                  column_norms: ColumnNormsFn | None) -> None:
    if stats.meta.get("config_hash") != chash:
        raise PlanError(
            f"stats were recorded on a different model (config_hash {stats.meta.get('config_hash')} "
            f"of {stats.meta.get('model')!r}, this model is {chash}); record stats on this model"
        )
    if stats.layers != list(range(shape.num_layers)):
        raise PlanError(f"stats cover layers {stats.layers}, the model has {shape.num_layers}; capture every layer")
    if request.strategy not in STRATEGIES:
        raise PlanError(f"strategy: unknown {request.strategy!r}; choose one of {sorted(STRATEGIES)}")
    if request.layer_strategy not in LAYER_STRATEGIES:
        raise PlanError(f"layer_strategy: unknown {request.layer_strategy!r}; choose one of {sorted(LAYER_STRATEGIES)}")
    if STRATEGIES[request.strategy].needs_weights and column_norms is None:
        raise PlanError(f"strategy {request.strategy!r} reads weight norms; give the model directory, "
                        "or choose a strategy from activations alone (importance, magnitude, variance, sparsity)")
    for i, s in enumerate(shape.layers):
        groups = [("attn", "mean", s.num_attention_heads * shape.head_dim),
                  ("mlp", "mean", s.intermediate_size) if s.num_experts is None
                  else (ROUTER_KIND, "topk_count", s.num_experts)]
        for kind, field, width in groups:
            name = key(i, kind, field)
            if name not in stats.tensors:
                raise PlanError(f"stats have no {name}: they were not captured on this model's layer kinds")
            got = stats.tensors[name].shape[0]
            if got != width:
                raise PlanError(f"stats layers.{i}.{kind} have {got} channels, the model has {width}")
    if request.head_sensitivity is not None and len(request.head_sensitivity) != shape.num_layers:
        raise PlanError(f"head_sensitivity has {len(request.head_sensitivity)} values, the model has "
                        f"{shape.num_layers} layers; measure it on this model (actprune sensitivity)")
    if request.layer_sensitivity is not None and len(request.layer_sensitivity) != shape.num_layers:
        raise PlanError(f"layer_sensitivity has {len(request.layer_sensitivity)} values, the model has "
                        f"{shape.num_layers} layers; measure it on this model (actprune sensitivity)")
    if request.tp_size > 1 and any(_tp_ok(s.num_key_value_heads, request.tp_size) is False for s in shape.layers):
        raise PlanError(f"tp_size: the model's KV heads do not fit tensor parallelism {request.tp_size}")


def _dropped_layers(stats: Stats, shape: ModelShape, request: PlanRequest, protected: frozenset[int]) -> list[int]:
    n = shape.num_layers
    k = request.drop_layers if request.drop_layers is not None else round((request.drop_layer_ratio or 0) * n)
    if k >= n:
        raise PlanError(f"drop_layers: cannot drop {k} of {n} layers; keep at least one")
    if k > n - len(protected):
        raise PlanError(f"drop_layers: cannot drop {k} of {n} layers when keep_layers keeps {len(protected)} whole")
    if k == 0:
        return []
    s = layer_scores(stats, list(range(n)), request.layer_strategy)  # (n,) lowest first go
    return sorted([int(i) for i in np.argsort(s, kind="stable") if int(i) not in protected][:k])


def _mlp_choice(stats, shape, kept, request, ratio, norms, counts: list[int] | None = None) -> dict[int, list[int]]:
    full = {i: shape.layers[i].intermediate_size for i in kept}
    sparse = {i: list(range(full[i])) for i in kept if shape.layers[i].num_experts is not None}
    if counts is not None:  # given per kept layer (global budget; refused for MoE): the best-scored units
        scores = {i: _channel_scores(stats, i, "mlp", request, norms) for i in kept}
        return {i: sorted(int(j) for j in np.argsort(-scores[i], kind="stable")[:c])
                for i, c in zip(kept, counts, strict=True)}
    kept = [i for i in kept if i not in sparse]  # experts keep their neurons; dense MLPs below
    if not ratio:
        return {i: list(range(full[i])) for i in kept} | sparse
    q = math.lcm(request.width_multiple, request.tp_size)
    scores = {i: _channel_scores(stats, i, "mlp", request, norms) for i in kept}
    order = {i: np.argsort(-scores[i], kind="stable") for i in kept}
    allowed = [allowed_counts(full[i], q, request.min_mlp_width) for i in kept]
    for i, a in zip(kept, allowed, strict=True):
        if not a:
            raise PlanError(
                f"layer {i}: no MLP width <= {full[i]} is a multiple of {q} (width_multiple × tp_size) "
                f"and >= min_mlp_width {request.min_mlp_width}"
            )
    if request.layer_sensitivity is not None:
        if ratio > _SENSITIVITY_MAX:  # removed_fractions caps every layer there: it could not be met
            raise PlanError(f"mlp_ratio: with layer_sensitivity a layer loses at most {_SENSITIVITY_MAX:.0%} of its "
                            f"neurons; {ratio:.1%} of the layers it may prune cannot be met")
        fractions = removed_fractions([request.layer_sensitivity[i] for i in kept], ratio, [full[i] for i in kept],
                                      exponent=request.sensitivity_exponent)
        want = [(1 - p) * full[i] for i, p in zip(kept, fractions, strict=True)]
        counts = nearest_within(want, allowed, (1 - ratio) * sum(full[i] for i in kept))
    else:
        counts = allocate([scores[i][order[i]] for i in kept], allowed, 1.0 - ratio, request.per_layer)
    return {i: sorted(int(j) for j in order[i][:c]) for i, c in zip(kept, counts, strict=True)} | sparse


class _HeadChoice:
    """Head scores of the kept layers and their conversion to kept heads for a ratio."""

    def __init__(self, stats: Stats, shape: ModelShape, kept: list[int], request: PlanRequest, norms) -> None:
        self.shape, self.kept, self.request = shape, kept, request
        self._stats, self._norms = stats, norms
        self._scores: dict[int, np.ndarray] | None = None

    def scores(self, i: int) -> np.ndarray:
        if self._scores is None:
            self._scores = {
                j: head_scores(_channel_scores(self._stats, j, "attn", self.request, self._norms),
                               self.shape.layers[j].num_attention_heads)
                for j in self.kept
            }
        return self._scores[i]

    def choose(self, ratio: float | None) -> dict[int, tuple[list[int], list[int]]]:
        """Layer -> (kept query heads, kept KV heads)."""
        out = {}
        if not ratio:
            for i in self.kept:
                s = self.shape.layers[i]
                out[i] = (list(range(s.num_attention_heads)), list(range(s.num_key_value_heads)))
            return out
        units, allowed, pick = [], [], []
        for i in self.kept:
            u, a, p = self.units(i)
            units.append(u)
            allowed.append(a)
            pick.append(p)
        counts = allocate(units, allowed, 1.0 - ratio, self.request.per_layer)
        return {i: p(c) for i, p, c in zip(self.kept, pick, counts, strict=True)}

    def units(self, i: int):
        """(unit scores best first, ascending legal kept unit counts, count -> (query heads,
        KV heads)) of layer i; a unit is a KV group or a level of query heads (module doc)."""
        s, r = self.shape.layers[i], self.request
        g = s.num_attention_heads // s.num_key_value_heads
        hs = self.scores(i).reshape(s.num_key_value_heads, g)  # (K, g)
        if r.head_mode == "kv_groups":
            group = hs.sum(axis=1)  # (K,)
            order = np.argsort(-group, kind="stable")
            allowed = allowed_counts(s.num_key_value_heads, 1, r.min_kv_heads,
                                     lambda k: _tp_ok(k, r.tp_size) and (k * g) % r.tp_size == 0)

            def pick(c: int) -> tuple[list[int], list[int]]:
                kv = sorted(int(k) for k in order[:c])
                return [k * g + j for k in kv for j in range(g)], kv
        else:
            within = np.argsort(-hs, axis=1, kind="stable")  # (K, g) best first per group
            group = np.take_along_axis(hs, within, axis=1).sum(axis=0)  # (g,) level scores
            order = np.arange(g)
            allowed = allowed_counts(g, 1, 1, lambda c: (c * s.num_key_value_heads) % r.tp_size == 0)

            def pick(c: int) -> tuple[list[int], list[int]]:
                heads = sorted(int(k * g + j) for k in range(s.num_key_value_heads) for j in within[k, :c])
                return heads, list(range(s.num_key_value_heads))
        if not allowed:
            raise PlanError(f"layer {i}: no head count satisfies tp_size {r.tp_size} and min_kv_heads {r.min_kv_heads}")
        return group[order], allowed, pick


def _global_budget(shape, kept, dropped, request, heads: _HeadChoice):
    """MLP counts and (query, KV) heads per kept layer from the measured sensitivities: one
    pool per layer and kind, the budget taken where the modelled loss per parameter is least
    (:func:`budget.allocate_budget`)."""
    budget = request.param_ratio * shape.params() - sum(shape.layer_params(shape.layers[i]) for i in dropped)
    q = math.lcm(request.width_multiple, request.tp_size)
    at = request.sensitivity_at or {}
    pools, picks = [], []
    for i in kept:
        s = shape.layers[i]
        allowed = allowed_counts(s.intermediate_size, q, request.min_mlp_width)
        if not allowed:
            raise PlanError(f"layer {i}: no MLP width <= {s.intermediate_size} is a multiple of {q} "
                            f"(width_multiple × tp_size) and >= min_mlp_width {request.min_mlp_width}")
        pools.append(Pool(allowed, [shape.layer_params(LayerShape(c, s.num_attention_heads, s.num_key_value_heads))
                                    for c in allowed], [1 - c / s.intermediate_size for c in allowed],
                          request.layer_sensitivity[i], at["mlp"]))
        _, h_allowed, pick = heads.units(i)
        chosen = [pick(c) for c in h_allowed]
        pools.append(Pool(h_allowed, [shape.layer_params(LayerShape(s.intermediate_size, len(hq), len(kv)))
                                      for hq, kv in chosen],
                          [1 - len(hq) / s.num_attention_heads for hq, _ in chosen],
                          request.head_sensitivity[i], at["attn"], request.head_cap))
        picks.append(pick)
    counts = allocate_budget(pools, int(budget), cap=0.9)
    removed = sum(p.params[-1] - p.params[p.allowed.index(c)] for p, c in zip(pools, counts, strict=True))
    step = max((b - a for p in pools for a, b in zip(p.params, p.params[1:], strict=False)), default=0)
    if budget - removed > step:  # short by more than the coarsest step: the pools cannot hold it
        raise PlanError(f"param_ratio: {request.param_ratio} is {budget:,.0f} parameters; the layers it may prune "
                        f"give up at most {removed:,} within their limits (90 % of a layer's units, head_cap)")
    return counts[0::2], {i: p(c) for i, p, c in zip(kept, picks, counts[1::2], strict=True)}


def _split_budget(shape, kept, dropped, request, heads: _HeadChoice) -> tuple[float, float]:
    """Turn `param_ratio` into (mlp_ratio, head_ratio): attention and MLP give up the same share
    of their parameters, then the MLP (fine-grained) absorbs the rounding of the heads."""
    before = shape.params()
    budget = request.param_ratio * before - sum(shape.layer_params(shape.layers[i]) for i in dropped)
    if budget <= 0:
        return 0.0, 0.0
    mlp = sum(3 * shape.hidden_size * shape.layers[i].intermediate_size for i in kept)
    attn = sum(shape.layer_params(shape.layers[i]) for i in kept) - mlp
    r = min(budget / (mlp + attn), 0.99)
    head_keep = heads.choose(r)
    widths = tuple(
        LayerShape(shape.layers[i].intermediate_size, len(head_keep[i][0]), len(head_keep[i][1])) for i in kept
    )
    removed_attn = sum(shape.layer_params(shape.layers[i]) for i in kept) - shape.params(widths) + shape.global_params()
    mlp_ratio = (budget - removed_attn) / mlp
    if mlp_ratio >= 1:
        raise PlanError(f"param_ratio: {request.param_ratio} removes more than the MLPs and heads of the layers "
                        "it may prune hold")
    return max(mlp_ratio, 0.0), r


def _uniform(widths: list[LayerWidths]) -> bool:
    """All dense layers alike and all sparse layers alike (an MoE model has both kinds)."""
    kinds = {w.num_experts is None: set() for w in widths}
    for w in widths:
        kinds[w.num_experts is None].add((w.intermediate_size, w.num_attention_heads, w.num_key_value_heads,
                                          w.num_experts))
    return all(len(v) == 1 for v in kinds.values())


def _assemble(stats, config, shape, chash, request, dropped, mlp_keep, head_keep, experts_keep) -> Plan:
    layers, widths = [], []
    for i in range(shape.num_layers):
        if i in dropped:
            layers.append(LayerPlan(index=i, drop=True))
            continue
        q, kv, ex = *head_keep[i], experts_keep.get(i)
        layers.append(LayerPlan(index=i, mlp_keep=mlp_keep[i], heads_keep=q, kv_heads_keep=kv, experts_keep=ex))
        widths.append(LayerWidths(intermediate_size=len(mlp_keep[i]), num_attention_heads=len(q),
                                  num_key_value_heads=len(kv), num_experts=None if ex is None else len(ex)))
    source_widths = [LayerWidths(**vars(s)) for s in shape.layers]
    after = shape.params(tuple(LayerShape(**w.model_dump()) for w in widths))  # experts counted
    try:
        version = metadata.version("actprune")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    plan = Plan(
        format_version=PLAN_VERSION if experts_keep else DENSE_PLAN_VERSION,
        source=SourceModel(
            architecture=spec_for_config(config).architecture, config_hash=chash,
            num_hidden_layers=shape.num_layers, hidden_size=shape.hidden_size, head_dim=shape.head_dim,
            widths=source_widths,
        ),
        layers=layers,
        dropped_layers=list(dropped),
        widths=widths,
        uniform=_uniform(widths),
        params_before=shape.params(),
        params_after=after,
        bytes_before=shape.params() * shape.dtype_bytes,
        bytes_after=after * shape.dtype_bytes,
        provenance=Provenance(
            strategy=request.strategy, layer_strategy=request.layer_strategy, weights=request.weights,
            request=request.model_dump(mode="json"), stats_tokens=stats.tokens,
            stats_config_hash=str(stats.meta.get("config_hash")),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), actprune_version=version,
        ),
    )
    plan.check(source="planner")
    return plan
