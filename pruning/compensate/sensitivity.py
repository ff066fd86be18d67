"""Measured layer sensitivity, for per-layer MLP widths (``actprune sensitivity``).

For each layer ``i`` of a plan (normally a *uniform* plan at the target ratio: every layer keeps
its best-scored units), prune that layer alone, refit its kept ``down_proj`` columns
(:func:`compensate.refit`), and measure how much the model's loss on probe rows rises::

    Δ_i = loss(model with only layer i pruned and refitted) − loss(dense model)

with its standard error across the probe rows (each row's Δ paired with the dense loss of the
same row; ``delta_se`` in the file): with few rows many Δ are within noise of zero, which
``noise_note`` tells the user.

One pass, layer by layer, over calibration rows on the dense trajectory (the hidden states
``(N, T, H)`` are held, as in :func:`calibrate.layerwise_refit`): at layer ``i`` the kept units'
moments give the refit, and the probe rows' hidden states at layer ``i`` are run through the
pruned layer and the dense rest of the model. Cost: one layer forward per layer over the
calibration rows plus ``(L − i)`` layer forwards over the probe rows, i.e. about ``L / 2`` full
forwards of the probe rows (8 × 512 tokens by default), and one (K+1)³ solve per layer. Memory as
``layerwise_refit``.

:func:`actprune.core.planning.planner` turns Δ into widths (``PlanRequest.layer_sensitivity``): a
layer's removed fraction ``p_i ∝ Δ_i^-e`` (``sensitivity_exponent``), capped at twice the mean ratio
so that no layer is gutted on the strength of one noisy measurement
(:func:`allocation.removed_fractions`). ``e = 1`` (the default, ``1 / Δ_i``) is the optimum if each
layer's loss grew as ``p²``; ``e = 1/2`` spreads the cut more evenly and validated better where the
cuts are deep, ``e = 2`` less evenly and better where they are shallow (``actprune compress``
builds all three and keeps the best; docs/plan.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from actprune.core.tensor.hf_model import HfModel
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.plan import Plan
from actprune.pruning.compensate.calibrate import HOOK_GROUP, InputTap, embed_rows, run_layer
from actprune.pruning.compensate.layers import apply_attention, apply_mlp, head_channels
from actprune.pruning.compensate.maths import DEFAULT_RIDGE, refit, update_moments
from tqdm.auto import tqdm

__all__ = ["SENSITIVITY_FORMAT", "delta_and_error", "layer_sensitivity", "noise_note", "request_fields",
           "sensitivity_for_plan"]

SENSITIVITY_FORMAT = "actprune.layer_sensitivity/1"


def _row_losses(view: HfModel, head: Any, layers: Any, h: torch.Tensor, ids: torch.Tensor, pe: Any,
                pos: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean next-token loss of each row of ids (P, T), from hidden states h (P, T, H) entering
    ``layers``: (P,) float64. Rows have equal length, so their mean is the probe's loss."""
    for layer in layers:
        h = run_layer(layer, h, pe, pos, batch)
    out = []
    for hb, ib in zip(h.split(batch), ids.split(batch), strict=True):  # (B, T, V) logits at a time
        logits = head(view.final_norm(hb)).float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ib[:, 1:].flatten(), reduction="none")
        out.append(nll.view(ib.shape[0], -1).double().mean(1))  # (B,)
    return torch.cat(out)


def delta_and_error(pruned: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """Δ = mean over probe rows of (pruned − dense) loss, and its standard error from the rows'
    paired differences (P,): std / √P, NaN with a single row. The pairing removes what the rows
    differ by on the dense model, so the error is the pruning's own spread across text."""
    d = pruned - dense  # (P,)
    se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else float("nan")
    return float(d.mean()), se


@torch.no_grad()
def layer_sensitivity(model: torch.nn.Module, rows: torch.Tensor, keep: dict[int, list[int]], *,
                      heads: dict[int, tuple[list[int], list[int]]] | None = None,
                      attn_out: dict[int, float] | None = None,
                      ridge: float = DEFAULT_RIDGE, probe_rows: int = 8, batch: int = 4,
                      errors: dict[str, dict[int, float]] | None = None,
                      progress: bool = True) -> dict[int, float]:
    """Δ loss per layer of ``keep`` (see the module doc). rows: (N, T) packed calibration token
    ids, the first ``probe_rows`` of them also the probe; ``model`` is left unchanged. With
    ``heads`` (layer -> kept query heads, kept KV heads), the layer's attention alone is pruned
    too, in a separate measurement, its ``o_proj`` refitted over the kept heads' channels;
    those Δ go into ``attn_out``. ``errors``, if given, receives each Δ's standard error
    across the probe rows (:func:`delta_and_error`) under ``"mlp"`` and ``"attn"``."""
    view = HfModel.of(model)
    head = model.get_output_embeddings()
    dev = next(model.parameters()).device
    heads = heads or {}
    probe = rows[:probe_rows].to(dev)  # (P, T)
    h, pe, pos = embed_rows(view, rows)  # h (N, T, H) on the dense trajectory
    layers = list(view.layers)
    dense = _row_losses(view, head, layers, h[:probe_rows], probe, pe, pos, batch)  # (P,)
    hooks, out = HookRegistry(), {}
    errors = errors if errors is not None else {}
    errors.setdefault("mlp", {})
    errors.setdefault("attn", {})

    def probe_delta(i: int, kind: str) -> float:
        d, errors[kind][i] = delta_and_error(
            _row_losses(view, head, layers[i:], h[:probe_rows], probe, pe, pos, batch), dense)
        return d

    for i, layer in enumerate(tqdm(layers, desc="sensitivity", unit="layer", disable=not progress)):
        if i not in keep and i not in heads:
            h = run_layer(layer, h, pe, pos, batch)
            continue
        gate, up, down = view.mlp(layer)
        attn, o = view.attention(layer)[0], view.o_proj(layer)
        mlp_m = _Moments(down.weight.detach(), keep[i], dev) if i in keep else None
        ch = head_channels(heads[i][0], attn.head_dim) if i in heads else []
        attn_m = _Moments(o.weight.detach(), ch, dev) if i in heads else None
        for m, lin in ((mlp_m, down), (attn_m, o)):
            if m is not None:
                tap = InputTap()
                tap.sink = m.add
                hooks.pre_hook(HOOK_GROUP, lin, tap)
        try:
            h_next = run_layer(layer, h, pe, pos, batch)
        finally:
            hooks.remove(HOOK_GROUP)
        if mlp_m is not None:
            apply_mlp(view, layer, keep[i], *mlp_m.solve(ridge))
            try:
                out[i] = probe_delta(i, "mlp")
            finally:
                view.set_mlp(layer, gate, up, down)  # the dense layer again
        if attn_m is not None:
            undo = apply_attention(view, layer, heads[i][0], heads[i][1], attn.head_dim, *attn_m.solve(ridge))
            try:
                if attn_out is not None:
                    attn_out[i] = probe_delta(i, "attn")
            finally:
                undo()
        h = h_next
    return out


class _Moments:
    """Refit moments of one output projection w (H, C) over kept input channels."""

    def __init__(self, w: torch.Tensor, kept: list[int], dev: torch.device) -> None:
        self.w, self.k = w, torch.as_tensor(kept, dtype=torch.long, device=dev)
        self.a = torch.zeros(len(kept) + 1, len(kept) + 1, dtype=torch.float64, device=dev)  # (K+1, K+1)
        self.b = torch.zeros(len(kept) + 1, w.shape[0], dtype=torch.float64, device=dev)  # (K+1, H)

    def add(self, x: torch.Tensor) -> None:
        update_moments(self.a, self.b, x.index_select(1, self.k), x @ self.w.T)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        return refit(self.a.cpu(), self.b.cpu(), self.w.index_select(1, self.k).cpu(), ridge)


def sensitivity_for_plan(model_dir: str | Path, plan: Plan, data: str, output: str | Path, *,
                         tokens: int = 32768, seq_len: int = 512, ridge: float = DEFAULT_RIDGE,
                         probe_rows: int = 8, text_field: str | None = None, progress: bool = True,
                         trust_remote_code: bool = False, extra: dict[str, Any] | None = None,
                         device: str | None = None) -> Path:
    """Measure Δ for the MLP keep lists of ``plan`` (and, where the plan removes heads, for its
    head lists: ``attn_deltas``) over ``tokens`` tokens of ``data`` and write ``{"format",
    "deltas": [per layer], "attn_deltas", "mlp_removed" / "attn_removed" (the fraction of
    neurons / query heads each layer lost in the measurement), ...}`` to ``output`` (JSON).
    ``trust_remote_code``: run code the checkpoint's ``auto_map`` names (see
    :mod:`actprune.pruning.checkpoint.trust`); ``extra``: more keys for the record; ``device``:
    where the float32 model runs (:func:`~actprune.pruning.checkpoint.hf_io.compute_device`;
    None: a GPU when one is visible)."""
    from actprune.core.files import atomic_write
    from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
    from actprune.pruning.data import packed_rows

    plan.refuse_experts("actprune sensitivity")
    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    rows = packed_rows(tok, data, text_field, seq_len)
    rows = rows[: max(tokens // seq_len, probe_rows)]  # (N, T)
    model = load_causal_lm(model_dir, torch.float32, trust_remote_code=trust_remote_code,
                           device=device or "auto")
    src = plan.source.widths
    mlp_removed = [1 - len(lp.mlp_keep) / src[lp.index].intermediate_size for lp in plan.layers]
    attn_removed = [1 - len(lp.heads_keep) / src[lp.index].num_attention_heads for lp in plan.layers]
    keep = {lp.index: lp.mlp_keep for lp in plan.layers if mlp_removed[lp.index] > 0}
    heads = {lp.index: (lp.heads_keep, lp.kv_heads_keep) for lp in plan.layers if attn_removed[lp.index] > 0}
    attn: dict[int, float] = {}
    errors: dict[str, dict[int, float]] = {}
    deltas = layer_sensitivity(model, rows, keep, heads=heads, attn_out=attn, ridge=ridge, probe_rows=probe_rows,
                               errors=errors, progress=progress)
    n = len(HfModel.of(model).layers)
    record = {
        "format": SENSITIVITY_FORMAT,
        "deltas": [deltas.get(i, 0.0) for i in range(n)],
        "attn_deltas": [attn.get(i, 0.0) for i in range(n)] if heads else None,
        # standard errors across probe rows (null: layer not measured, or one probe row)
        "delta_se": [_finite(errors["mlp"].get(i)) for i in range(n)],
        "attn_delta_se": [_finite(errors["attn"].get(i)) for i in range(n)] if heads else None,
        "mlp_removed": mlp_removed, "attn_removed": attn_removed,
        "plan_mlp_ratio": plan.provenance.request.get("mlp_ratio"),
        "plan_head_ratio": plan.provenance.request.get("head_ratio"),
        "head_mode": plan.provenance.request.get("head_mode"),
        "strategy": plan.provenance.strategy,
        "data": data, "tokens": int(rows.numel()), "probe_tokens": int(rows[:probe_rows].numel()),
        "ridge": ridge, **(extra or {}),
    }
    return atomic_write(output, json.dumps(record, indent=2) + "\n")


def _finite(x: float | None) -> float | None:
    return x if x is not None and x == x else None  # JSON has no NaN


def noise_note(deltas: list[float], errors: list[float | None] | None) -> str:
    """A line on how far Δ can be trusted: the median standard error, and how many measured
    layers' Δ lie within two of them of zero (their order, hence the widths, is then partly
    the probe's noise: more ``--probe-rows`` steady it). Empty without errors."""
    pairs = [(d, e) for d, e in zip(deltas, errors or [], strict=False) if e is not None]
    if not pairs:
        return ""
    se = sorted(e for _, e in pairs)
    within = sum(abs(d) <= 2 * e for d, e in pairs)
    return f"s.e. median {se[len(se) // 2]:.4f}; {within} of {len(pairs)} layers within 2 s.e. of 0"


def request_fields(record: dict[str, Any]) -> dict[str, Any]:
    """PlanRequest fields from a sensitivity record: ``layer_sensitivity`` (MLP Δ per layer) and,
    when heads were measured too, ``head_sensitivity`` and ``sensitivity_at`` (the mean removed
    fractions of the measured layers, the ``p0`` of the cost model in
    :mod:`actprune.core.planning.budget`)."""
    out: dict[str, Any] = {"layer_sensitivity": [float(d) for d in record["deltas"]]}
    if record.get("attn_deltas"):
        def mean_removed(name: str) -> float:
            vals = [float(v) for v in record.get(name) or [] if float(v) > 0]
            return sum(vals) / len(vals) if vals else 1.0

        out["head_sensitivity"] = [float(d) for d in record["attn_deltas"]]
        out["sensitivity_at"] = {"mlp": mean_removed("mlp_removed"), "attn": mean_removed("attn_removed")}
    return out
