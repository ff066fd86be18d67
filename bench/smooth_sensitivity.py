"""Does shrinking each measured Δ towards its neighbours by its error help? (issue 13; tried)

``actprune sensitivity`` measures each layer's Δ (loss increase when that layer alone is pruned)
on a few probe rows, with its standard error across the rows. At compress's defaults (8 rows)
two thirds of SmolLM2-135M's layers have a Δ within two errors of zero, and the allocation, which
cuts a layer in proportion to 1/Δ, reads part of that noise as structure. Neighbouring layers'
sensitivities are alike (high in the first and last layers, low in the middle), so this shrinks
each Δ towards its neighbours as far as its own error says it should:

    y_i = θ_i + ε_i,         ε_i ~ N(0, s_i²)      measured Δ and its standard error
    θ_{i+1} − θ_i ~ N(0, 1/λ)                      a random walk over depth (first-order GMRF)

The posterior mean is ``θ̂ = (S⁻¹ + λ DᵀD)⁻¹ S⁻¹ y`` (S = diag(s²), D the first-difference matrix:
an error-weighted Whittaker smoother), and λ is the one that maximises the marginal likelihood of
the measurements (empirical Bayes) over a log grid. A precise Δ keeps its value; a noisy one moves
towards its neighbours; when the layers differ by more than their errors explain, λ comes out
small and little changes. Layers without an error (kept whole, not measured) pass through and
are left out of the chain: their neighbours in it are the nearest measured layers.

Result (BENCHMARKS.md, issue 13, twenty-first session): validation level at 10 %, better at
20 % for the candidate compress keeps; held out within ±3 % either way on four texts at both
budgets, so compress plans from the measured Δ and this stays a bench. To rerun it, copy a
finished compress run's sensitivity files with their Δ shrunk, and run the same command on them
(compress keeps a sensitivity file whose inputs match, and plans from its Δ):

    .venv/bin/python bench/smooth_sensitivity.py /tmp/cq19/f20.steps /tmp/cq19/g20.steps [--heads]
    .venv/bin/actprune compress ... -o /tmp/cq19/g20       # the f20 command, OUT g20
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np

__all__ = ["log_evidence", "smooth_by_depth", "smooth_file", "smooth_sensitivity"]

# prior step sizes 1/√λ tried, as multiples of the typical step between neighbouring measurements
_GRID = np.logspace(-3, 3, 61)
_MIN_LAYERS = 3  # below, neighbours say too little to estimate λ


def _posterior(y: np.ndarray, s: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(posterior precision A (n, n), S⁻¹y (n,), posterior mean θ̂ = A⁻¹S⁻¹y (n,)). y, s: (n,)."""
    s_inv = np.diag(1.0 / s**2)  # (n, n)
    d = np.diff(np.eye(len(y)), axis=0)  # (n-1, n): (D θ)_i = θ_{i+1} − θ_i
    a = s_inv + lam * d.T @ d
    b = s_inv @ y
    return a, b, np.linalg.solve(a, b)


def log_evidence(y: np.ndarray, s: np.ndarray, lam: float) -> float:
    """log p(y | λ) up to a constant that does not depend on λ, with the random walk's level
    integrated out under a flat prior (the random walk prior is improper in the level; its
    pseudo-determinant ``λⁿ⁻¹ · |DᵀD|₊`` keeps the terms that move with λ). y, s: (n,)."""
    a, b, theta = _posterior(y, s, lam)
    return float(0.5 * (len(y) - 1) * math.log(lam) - 0.5 * np.linalg.slogdet(a)[1]
                 - 0.5 * (y @ (y / s**2) - b @ theta))


def smooth_by_depth(y: list[float], s: list[float]) -> tuple[list[float], float]:
    """Posterior means of the measured Δ ``y`` (in depth order) with standard errors ``s``, and
    the chosen prior step size ``1/√λ`` (module doc). Zero errors are exact measurements: they
    keep their value."""
    y_arr, s_arr = np.asarray(y, dtype=np.float64), np.asarray(s, dtype=np.float64)
    if len(y_arr) < _MIN_LAYERS:
        return [float(v) for v in y_arr], math.inf
    positive = s_arr[s_arr > 0]
    if not len(positive):
        return [float(v) for v in y_arr], math.inf
    s_arr = np.maximum(s_arr, positive.min() * 1e-6)  # an exact Δ: a tiny error, not a division by 0
    scale = float(np.median(np.abs(np.diff(y_arr)))) or float(np.median(positive))
    best_ll, best_step = -math.inf, math.inf
    for step in _GRID * scale:
        ll = log_evidence(y_arr, s_arr, 1.0 / step**2)
        if ll > best_ll:
            best_ll, best_step = ll, float(step)
    theta = _posterior(y_arr, s_arr, 1.0 / best_step**2)[2]
    return [float(v) for v in theta], best_step


def smooth_sensitivity(deltas: list[float], errors: list[float | None] | None) -> list[float]:
    """``deltas`` (one per layer) with each measured one (finite error) replaced by its posterior
    mean along the chain of measured layers; the others unchanged. Without errors (a file from
    before they were recorded, or a probe of one row) the deltas are returned as they are."""
    if not errors or len(errors) != len(deltas):
        return list(deltas)
    idx = [i for i, e in enumerate(errors) if e is not None and math.isfinite(e) and math.isfinite(deltas[i])]
    smoothed, _ = smooth_by_depth([deltas[i] for i in idx], [float(errors[i]) for i in idx])  # type: ignore[arg-type]
    out = list(deltas)
    for i, v in zip(idx, smoothed, strict=True):
        out[i] = v
    return out


def smooth_file(record: dict, heads: bool = False) -> dict:
    """A sensitivity record with its MLP Δ (and with ``heads`` its head Δ) shrunk; the errors
    and everything else as measured."""
    out = dict(record)
    for key, se_key in (("deltas", "delta_se"), *((("attn_deltas", "attn_delta_se"),) if heads else ())):
        if out.get(key):
            out[key] = smooth_sensitivity([float(d) for d in out[key]], out.get(se_key))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="a compress run's step directory (OUT.steps)")
    p.add_argument("dst", type=Path, help="new step directory: its uniform plans and shrunk sensitivity files")
    p.add_argument("--heads", action="store_true", help="shrink the head Δ too (validated worse)")
    args = p.parse_args(argv)
    args.dst.mkdir(parents=True, exist_ok=False)
    for f in sorted(args.src.glob("uniform*.json")):
        shutil.copy(f, args.dst / f.name)
    for f in sorted(args.src.glob("sensitivity*.json")):
        record = json.loads(f.read_text())
        shrunk = smooth_file(record, args.heads)
        (args.dst / f.name).write_text(json.dumps(shrunk))
        moved = max(abs(a - b) for a, b in zip(shrunk["deltas"], record["deltas"], strict=True))
        print(f"{f.name}: MLP Δ shrunk (largest move {moved:.4f})" + (", head Δ too" if args.heads else ""))


if __name__ == "__main__":
    main()
