"""The candidates ``actprune compress`` builds at one parameter budget, the held-out rows it
scores them on, and its choice: the candidate with the lowest validation loss (pure: the
record of those losses, ``candidates.json``, is read and tabulated here; compress measures).

Why candidates: the budget allocation (:mod:`actprune.core.planning.budget`) spends the budget
where the *modelled* loss per parameter is least, but the model extrapolates one measured Δ per
layer and kind, and on SmolLM2-135M at 20 % of the non-embedding parameters it lost to spending
the same parameters on MLP neurons alone (BENCHMARKS.md, issue 13). So compress builds each of

- ``budget``: heads, KV groups and MLP neurons by the budget allocation, as requested;
- ``heads-capped``: the same with each layer's heads held to the share their Δ was measured at
  (``head_cap``; only when the request sets no ``head_cap`` of its own);
- ``mlp``: MLP neurons only, per-layer widths from the measured MLP Δ (``plan --mlp-ratio
  --per-layer --layer-sensitivity``, the best MLP-only path of issue 7) removing the same number
  of parameters (within the rounding of one neuron per layer and the width multiple),
- ``mlp-ends``: the same with the first eighth and the last sixteenth of the layers kept whole
  (``keep_layers``; LLM-Pruner's default layout, its 4 and 2 of LLaMA-7B's 32) — only for models
  of :data:`ENDS_MIN_LAYERS` layers or more, when the request keeps no layers of its own. On
  SmolLM2-135M it validated better in domain and out of it, and held out it was 4–8 % better on
  every text at 10 % of the non-embedding parameters (BENCHMARKS.md, issue 13; ``heads-capped``
  with the same layers whole was tried too and never chosen: worse out of domain at 20 and 30 %),
- ``mlp-ends-even`` and ``mlp-ends-bold`` (``mlp-even`` / ``mlp-bold`` where there is no
  ``mlp-ends``): that layout again with the cut spread more evenly across its layers, or less
  (``sensitivity_exponent`` of :data:`TWINS`: a layer's removed fraction ∝ Δ^-1/2 or Δ^-2
  instead of 1/Δ). No exponent is right at every budget: on SmolLM2-135M at 30 % of the
  non-embedding parameters 1/Δ cut three layers to a tenth of their neurons and validated 8 %
  worse than Δ^-1/2, while at 10 % Δ^-2 validated best and Δ^-1/2 worst (BENCHMARKS.md,
  issue 13, "Spreading the cut": the shallower the cut, the bolder the widths that validate
  best) — so validation chooses,

refits each, and keeps the one whose loss on validation rows is lowest — on ``--data``'s held-out
rows alone, or, with ``--val-data`` (text of other domains that the result must keep serving),
by the mean over the validation sets of its loss above the dense model's (:func:`excess_loss`).

Rows: ``--data`` is packed once (documents joined by EOS, cut into ``seq_len`` rows). Rows
``[0, fit)`` feed the sensitivity pass (its probe: the first ``probe_rows``) and the refits;
rows ``[fit, fit + val)`` only the validation. A document may straddle the boundary row; no
token is in both. When ``--data`` is shorter than ``fit + val`` rows, the fit gives up rows
(never the probe) and the split says so; below ``probe_rows + val`` rows it is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from actprune.core.archs import ModelShape

__all__ = ["CANDIDATES", "DATA", "ENDS_MIN_LAYERS", "MLP_ONLY", "OWN_DELTA", "TWINS", "HeadProbe", "Split",
           "candidate_requests", "choose", "check_names", "end_layers", "ends_offered", "excess_loss", "figures",
           "head_probe_requests", "mlp_share", "needs_model_delta", "scores", "select", "set_losses", "split_rows",
           "table"]

_MLP_LAYOUTS = ("mlp", "mlp-ends")  # the MLP-only layouts, shallowest cut first
# the twins of the deepest MLP-only layout: suffix -> sensitivity_exponent (1/Δ is the layout itself)
TWINS = {"even": 0.5, "bold": 2.0}
# they prune no head: preferred (PREFER_MARGIN); mlp, mlp-ends, mlp-even, mlp-ends-even, mlp-bold, ...
MLP_ONLY = (*_MLP_LAYOUTS, *(f"{layout}-{suffix}" for suffix in TWINS for layout in _MLP_LAYOUTS))
CANDIDATES = ("budget", "heads-capped", *MLP_ONLY)  # the table's order; ties go to the earlier one
# the ends layout and its twins: they measure their own Δ (sensitivity-ends.json), not the whole model's
OWN_DELTA = tuple(n for n in MLP_ONLY if n.startswith("mlp-ends"))
ENDS_MIN_LAYERS = 16  # below, an eighth and a sixteenth of the layers are too coarse a share to keep whole
DATA = "--data"  # a validation record's name for --data's held-out rows; --val-data sets by their source

# request fields the MLP-only candidate keeps (the budget's constraints on MLP widths)
_MLP_FIELDS = ("strategy", "weights", "width_multiple", "tp_size", "min_mlp_width", "keep_layers")
_MLP_MAX = 0.9  # removed_fractions caps a layer at 0.9: MLP neurons alone cannot hold more


@dataclass(frozen=True)
class Split:
    fit: int  # rows [0, fit): sensitivity (probe = the first probe_rows) and refit
    val: tuple[int, int]  # rows [start, stop): validation only
    note: str | None = None  # what was adapted to fit the data, or None


def split_rows(n_rows: int, fit_rows: int, probe_rows: int, val_rows: int) -> Split:
    """Split ``n_rows`` packed rows into fit and validation rows (module doc). ValueError, with
    the numbers, when fewer than ``probe_rows + val_rows`` rows exist."""
    fit_rows = max(fit_rows, probe_rows)
    if n_rows >= fit_rows + val_rows:
        return Split(fit_rows, (fit_rows, fit_rows + val_rows))
    fit = n_rows - val_rows
    if fit < max(probe_rows, 1):
        raise ValueError(f"{n_rows} rows, and compress needs at least {max(probe_rows, 1)} for the sensitivity "
                         f"probe (--probe-rows) plus {val_rows} held out for validation (--val-rows)")
    return Split(fit, (fit, n_rows), f"only {n_rows} rows: sensitivity and refit read {fit} rows (not "
                                     f"{fit_rows}), validation the last {val_rows}")


def end_layers(num_layers: int) -> list[int]:
    """LLM-Pruner's layout: the first eighth (at least one) and the last sixteenth (at least one)
    of the layers, as ``keep_layers`` (30 layers: 0-3, 28, 29)."""
    first, last = max(1, int(num_layers / 8 + 0.5)), max(1, int(num_layers / 16 + 0.5))
    return [*range(first), *range(num_layers - last, num_layers)]


def mlp_params(shape: ModelShape, keep_layers: list[int] | None = None) -> int:
    """Parameters in the dense MLPs the MLP-only candidate can take from (not those of
    ``keep_layers``, which stay whole; negative indices count from the end)."""
    whole = {i % shape.num_layers for i in keep_layers or ()}
    return sum(3 * shape.hidden_size * ly.intermediate_size for i, ly in enumerate(shape.layers)
               if ly.num_experts is None and i not in whole)


def ends_offered(shape: ModelShape, keep_layers: Any) -> bool:
    """Whether ``mlp-ends`` (and its twins) apply: a model of :data:`ENDS_MIN_LAYERS` layers or
    more, and a request that keeps no layers of its own (the budget may still rule it out)."""
    return keep_layers is None and shape.num_layers >= ENDS_MIN_LAYERS


def mlp_share(shape: ModelShape, mlp_ratio: float) -> float:
    """The ``param_ratio`` that ``mlp_ratio`` of every dense MLP neuron holds (``compress
    --mlp-ratio``): gate, up and down are 3 × hidden parameters a neuron. ValueError for a model
    with no dense MLP (an MoE model's MLPs are experts)."""
    mlp = mlp_params(shape)
    if not mlp:
        raise ValueError("this model has no dense MLP neurons (its MLPs are experts): use --param-ratio")
    return mlp_ratio * mlp / shape.params()


def candidate_requests(base: dict[str, Any], sens: dict[str, Any], shape: ModelShape) -> dict[str, dict[str, Any]]:
    """PlanRequest fields of each candidate, in :data:`CANDIDATES` order. ``base``: the compress
    request (``param_ratio`` and constraints); ``sens``: :func:`sensitivity.request_fields` of
    the measurement (``layer_sensitivity``, and ``head_sensitivity`` / ``sensitivity_at`` when
    heads were measured). A candidate that cannot meet the budget is left out."""
    out: dict[str, dict[str, Any]] = {}
    if sens.get("head_sensitivity") is not None:
        budget = {**base, **sens}
        out["budget"] = budget
        if base.get("head_cap") is None:
            out["heads-capped"] = {**budget, "head_cap": sens["sensitivity_at"]["attn"]}
    removed = base["param_ratio"] * shape.params()
    mlp = {**{k: base[k] for k in _MLP_FIELDS if k in base}, "per_layer": True,
           "mlp_ratio": removed / max(mlp_params(shape), 1),  # of all neurons (keep_layers: the planner's)
           "layer_sensitivity": sens["layer_sensitivity"]}
    if removed <= _MLP_MAX * mlp_params(shape, base.get("keep_layers")):  # the layers it may prune can hold it
        out["mlp"] = mlp
    ends = end_layers(shape.num_layers)
    if ends_offered(shape, base.get("keep_layers")) and removed <= _MLP_MAX * mlp_params(shape, ends):
        out["mlp-ends"] = {**mlp, "keep_layers": ends}
    last = next((n for n in reversed(_MLP_LAYOUTS) if n in out), None)  # the deepest-cut MLP-only layout
    if last is not None:
        for suffix, exponent in TWINS.items():
            out[f"{last}-{suffix}"] = {**out[last], "sensitivity_exponent": exponent}
    return out


def check_names(wanted: tuple[str, ...]) -> tuple[str, ...]:
    """``wanted`` (``compress --candidates``) checked: ValueError naming an unknown or repeated
    name, or an empty choice."""
    unknown = [n for n in wanted if n not in CANDIDATES]
    if unknown or not wanted or len(set(wanted)) < len(wanted):
        what = f"unknown candidate {', '.join(map(repr, unknown))}" if unknown else (
            "a candidate named twice" if wanted else "no candidate named")
        raise ValueError(f"{what}; the candidates: {', '.join(CANDIDATES)}")
    return wanted


def needs_model_delta(wanted: tuple[str, ...] | None) -> bool:
    """Whether the candidates ``wanted`` (None: all) need the whole-model sensitivity pass: every
    one but the :data:`OWN_DELTA` layouts, which measure their own (``sensitivity-ends.json``) — so
    ``--candidates mlp-ends,mlp-ends-even`` skips a sensitivity pass. ValueError for names
    :func:`check_names` refuses."""
    return wanted is None or any(n not in OWN_DELTA for n in check_names(wanted))


def select(requests: dict[str, dict[str, Any]], wanted: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """``requests`` (:func:`candidate_requests`) restricted to the names ``wanted`` (None: all),
    in :data:`CANDIDATES` order. ValueError naming what this model and budget offer when none of
    ``wanted`` is among them."""
    if wanted is None:
        return requests
    out = {n: r for n, r in requests.items() if n in wanted}
    if not out:
        raise ValueError(f"none of {', '.join(wanted)} is built for this model and budget (here: "
                         f"{', '.join(requests) or 'none'}; docs/plan.md says when each candidate is built)")
    return out


@dataclass(frozen=True)
class HeadProbe:
    units: int  # a layer's head units (KV groups, or query heads per group): this probe's layers have that many
    layers: tuple[int, ...]  # the layers (indices) whose heads are measured in this probe's plan
    fields: dict[str, Any]  # PlanRequest fields of the plan


def head_probe_requests(base: dict[str, Any], uniform: Any) -> list[HeadProbe]:
    """The plans the heads are measured at when the uniform plan (a
    :class:`~actprune.core.wire.plan.Plan`) removes no head anywhere — a small budget's share of
    a layer is less than one unit (SmolLM2: 3 KV groups a layer, so not at 10 %) — else []:
    every layer losing its smallest legal step, one KV group (``head_mode`` kv_groups) or one
    query head of each group, with the compress request's constraints. One plan per distinct
    unit count u (a checkpoint compressed before may have layers of 2 and of 3 KV groups): a
    ``head_ratio`` of just over 1 / u takes one unit from each layer of u units (the uniform
    split keeps the legal count nearest to (1 - ratio) · u). Layers of a single unit are left
    whole (losing it would remove their attention)."""
    widths = uniform.source.widths
    if base.get("head_cap") == 0:  # the request prunes no head: nothing to measure
        return []
    if any(len(lp.heads_keep) < widths[lp.index].num_attention_heads for lp in uniform.layers):
        return []
    groups = base.get("head_mode", "kv_groups") == "kv_groups"
    by_units: dict[int, list[int]] = {}
    for lp in uniform.layers:
        w = widths[lp.index]
        u = w.num_key_value_heads if groups else w.num_attention_heads // w.num_key_value_heads
        if u >= 2:
            by_units.setdefault(u, []).append(lp.index)
    # keep_layers left out: one unit from every layer (kept layers' Δ go unused), not a whole-model
    # share of heads from the others, which could be more than one unit each; head_cap is the
    # budget's (a plan by head_ratio refuses it)
    rest = {k: v for k, v in base.items() if k not in ("param_ratio", "keep_layers", "head_cap")}
    # 1 % over one unit: a ratio of exactly 1 / u may round down to no unit
    return [HeadProbe(u, tuple(layers), rest | {"head_ratio": min(1.01 / u, 0.99)})
            for u, layers in sorted(by_units.items(), reverse=True)]


# How much better (in loss: 0.01 = 1 % perplexity) a candidate that prunes heads must validate
# than the best MLP-only one (MLP_ONLY) to be chosen. Validation is a few thousand tokens, which
# cannot resolve a smaller difference, and on SmolLM2-135M MLP-only was ahead out of domain wherever the two
# were that close in domain (BENCHMARKS.md, issue 13: at 10 % heads-capped 1.170× vs mlp 1.174×
# on held-out calibration rows, 1.52 / 2.28× vs 1.36 / 1.83× on two other domains' validation
# texts; at 20 % mlp ahead by 1 % in domain, 27–36 % out of it). At 30 %, where heads-capped
# led by 10 % in domain, it is still chosen.
PREFER_MARGIN = 0.01


def choose(losses: dict[str, float], prefer: str | tuple[str, ...] = (), margin: float = PREFER_MARGIN) -> str:
    """The candidate with the lowest validation loss (ties: the earlier in ``losses``); with
    ``prefer`` (compress: :data:`MLP_ONLY`), the lowest of those unless the best is lower by more
    than ``margin``."""
    if not losses:
        raise ValueError("no candidate to choose from")
    best = min(losses, key=losses.__getitem__)
    preferred = [n for n in losses if n in ((prefer,) if isinstance(prefer, str) else prefer)]
    if preferred:
        mine = min(preferred, key=losses.__getitem__)
        if losses[mine] - losses[best] <= margin:
            return mine
    return best


def excess_loss(losses: dict[str, float], dense: dict[str, float]) -> float:
    """A candidate's validation score over several sets: the mean over ``dense``'s sets of its
    mean next-token loss minus the dense model's on the same set, i.e. the log of the geometric
    mean of its × dense perplexities. Each set weighs the same whatever its length, so a drift
    to another domain counts as much as the calibration domain; with one set it orders
    candidates as their loss does. KeyError when a set is missing from ``losses``."""
    if not dense:
        raise ValueError("no validation set")
    return sum(losses[s] - dense[s] for s in dense) / len(dense)


# ---- the validation record (compress's candidates.json) -----------------------------------------
# A model's figures: {"loss": --data's mean next-token loss, "perplexity", "extra": {SOURCE: loss}
# of each --val-data set}; the record: {"validation": {"rows": [start, stop], ...}, "dense":
# figures, "candidates": {NAME: figures + "params_before", "params_after", ...}}.
def figures(losses: dict[str, float]) -> dict[str, Any]:
    """The record of one model's validation from its loss on each set (:data:`DATA` required)."""
    return {"loss": losses[DATA], "perplexity": math.exp(losses[DATA]),
            "extra": {k: v for k, v in losses.items() if k != DATA}}


def set_losses(record: dict[str, Any]) -> dict[str, float]:
    """Inverse of :func:`figures`: the loss on each validation set."""
    return {DATA: record["loss"], **record.get("extra", {})}


def scores(record: dict[str, Any], names: Any) -> dict[str, float]:
    """Each named candidate's :func:`excess_loss` over the record's validation sets."""
    dense = set_losses(record["dense"])
    return {n: excess_loss(set_losses(record["candidates"][n]), dense) for n in names}


def table(record: dict[str, Any], names: list[str], best: str, plan_files: dict[str, Any] | None = None) -> list[str]:
    """The lines compress prints: each candidate's parameters removed, validation perplexity and
    × dense on every set (their geometric mean with --val-data), ``best`` starred, why it was
    kept when it is not the lowest (within :data:`PREFER_MARGIN`), and, with --val-data, when
    another candidate validates better on --data alone by more than that margin: the mean weighs
    every set alike, so a user whose traffic is --data's domain above all may want that one
    (its plan: ``plan_files[name]``). On SmolLM2-135M at 30 % the choice turned on this: 14 %
    worse on held-out Wikipedia, 7–13 % better on three other texts (BENCHMARKS.md, issue 13)."""
    dense = set_losses(record["dense"])
    extra = [k for k in dense if k != DATA]
    a, b = record["validation"]["rows"]
    lines = [f"candidates, validation perplexity on rows {a}–{b - 1} of --data (dense {math.exp(dense[DATA]):.3f})"
             + "".join(f"; × dense on [{i + 1}] {k}" for i, k in enumerate(extra)) + ":",
             f"  {'candidate':<14} {'params removed':>24} {'val ppl':>9} {'× dense':>8}"
             + "".join(f" {f'[{i + 1}]':>6}" for i in range(len(extra))) + (f" {'mean × dense':>12}" if extra else "")]
    score = scores(record, names)
    for name in names:
        r = record["candidates"][name]
        mine = set_losses(r)
        removed = r["params_before"] - r["params_after"]
        lines.append(f"{'*' if name == best else ' '} {name:<14} {removed:>15,} ({removed / r['params_before']:5.1%})"
                     f" {r['perplexity']:>9.3f} {math.exp(mine[DATA] - dense[DATA]):>8.3f}"
                     + "".join(f" {math.exp(mine[k] - dense[k]):>6.3f}" for k in extra)
                     + (f" {math.exp(score[name]):>12.3f}" if extra else ""))
    lowest = min(score, key=score.__getitem__)
    if best != lowest:
        lines.append(f"  {best} kept: {lowest} validates better by {math.expm1(score[best] - score[lowest]):.2%}, "
                     f"within the {math.expm1(PREFER_MARGIN):.0%} a candidate that prunes heads must win by")
    if extra:
        on_data = {n: set_losses(record["candidates"][n])[DATA] for n in names}
        top = min(on_data, key=on_data.__getitem__)
        if on_data[best] - on_data[top] > PREFER_MARGIN:
            where = f" (its plan: {plan_files[top]}; build it with `actprune prune --plan`)" if plan_files else ""
            lines.append(f"  {best} chosen on all the validation sets together; on --data alone {top} validates "
                         f"{math.expm1(on_data[best] - on_data[top]):.1%} better{where}")
    return lines
