"""Sensitivities shrunk towards their neighbours (bench/smooth_sensitivity.py), checked against an
independent computation: the same random-walk model written as a proper joint Gaussian (the
level given a very wide prior), whose log density and conditional mean are computed directly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from smooth_sensitivity import log_evidence, main, smooth_by_depth, smooth_sensitivity  # noqa: E402

Y = np.array([0.0132, 0.0193, 0.0077, 0.0063, 0.0096, 0.0035, 0.0038, 0.0026, -0.0002, 0.0006, 0.0047, 0.0084])
S = np.array([0.0054, 0.0028, 0.0045, 0.0026, 0.0027, 0.0034, 0.0032, 0.0022, 0.0029, 0.0025, 0.0014, 0.0022])


def _joint(s: np.ndarray, lam: float, level_var: float) -> np.ndarray:
    """Cov(θ) of θ = L η: η_0 the level ~ N(0, level_var), η_k the k-th step ~ N(0, 1/λ)."""
    n = len(s)
    lower = np.tril(np.ones((n, n)))
    return lower @ np.diag([level_var] + [1.0 / lam] * (n - 1)) @ lower.T


def _log_normal(y: np.ndarray, cov: np.ndarray) -> float:
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, y)
    return float(-0.5 * z @ z - np.log(np.diag(chol)).sum() - 0.5 * len(y) * math.log(2 * math.pi))


def test_log_evidence_moves_with_lambda_as_the_proper_model():
    level_var = 1e2  # ~1e6 times the data's scale²: the level's prior is flat where the data are
    lams = [1e3, 1e5, 1e6, 1e7, 1e9]
    ours = [log_evidence(Y, S, lam) for lam in lams]
    ref = [_log_normal(Y, _joint(S, lam, level_var) + np.diag(S**2)) for lam in lams]
    for k in range(1, len(lams)):
        assert ours[k] - ours[0] == pytest.approx(ref[k] - ref[0], rel=1e-5, abs=1e-5)


def test_posterior_mean_is_the_conditional_mean_of_the_proper_model():
    smoothed, step = smooth_by_depth(list(Y), list(S))
    lam = 1.0 / step**2
    cov_theta = _joint(S, lam, 1e2)
    cond = cov_theta @ np.linalg.solve(cov_theta + np.diag(S**2), Y)  # E[θ | y]
    assert np.allclose(smoothed, cond, rtol=1e-5, atol=1e-8)
    # λ is the grid's best: the evidence is no higher a grid step either side
    assert log_evidence(Y, S, lam) >= max(log_evidence(Y, S, lam * 1.6), log_evidence(Y, S, lam / 1.6))


def test_precise_values_stay_noisy_ones_move():
    s = S.copy()
    s[1] = 1e-7  # layer 1 measured (almost) exactly
    smoothed, _ = smooth_by_depth(list(Y), list(s))
    assert smoothed[1] == pytest.approx(Y[1], abs=1e-9)
    assert abs(smoothed[8] - Y[8]) > 1e-3  # −0.0002 ± 0.0029 between 0.0026 and 0.0006: pulled up
    assert smoothed[8] > Y[8]


def test_shrinking_lowers_the_error_on_a_smooth_curve():
    """A U-shaped truth over 30 layers, measured with errors like the probe's: over many draws the
    smoothed values are closer to the truth than the measurements."""
    rng = np.random.default_rng(0)
    depth = np.linspace(-1, 1, 30)
    truth = 0.002 + 0.01 * depth**2
    s = rng.uniform(0.001, 0.004, size=30)
    raw_err, eb_err = 0.0, 0.0
    for _ in range(200):
        y = truth + rng.normal(0, s)
        smoothed, _ = smooth_by_depth(list(y), list(s))
        raw_err += float(((y - truth) ** 2).sum())
        eb_err += float(((np.asarray(smoothed) - truth) ** 2).sum())
    assert eb_err < 0.5 * raw_err


def test_layers_that_differ_beyond_their_errors_keep_their_values():
    y = [0.001, 0.02, 0.001, 0.02, 0.001, 0.02]  # alternating far beyond errors of 1e-5
    smoothed, _ = smooth_by_depth(y, [1e-5] * 6)
    assert np.allclose(smoothed, y, atol=1e-6)


def test_unmeasured_layers_pass_through_and_are_skipped_in_the_chain():
    deltas = [0.0, 0.0, *Y, 0.0]
    errors = [None, None, *S, None]
    out = smooth_sensitivity(deltas, errors)
    assert out[:2] == [0.0, 0.0] and out[-1] == 0.0
    assert out[2:-1] == pytest.approx(smooth_by_depth(list(Y), list(S))[0])
    assert smooth_sensitivity(list(Y), None) == list(Y)  # a file from before errors were recorded
    assert smooth_sensitivity([0.1, 0.2], [0.01, 0.01]) == [0.1, 0.2]  # too few layers to say anything
    nan_errors = [math.nan] * len(Y)  # one probe row: no error
    assert smooth_sensitivity(list(Y), nan_errors) == list(Y)


def test_cli_writes_a_step_directory_compress_plans_from(tmp_path, capsys):
    src = tmp_path / "out.steps"
    src.mkdir()
    record = {"format": "actprune.layer_sensitivity/1", "deltas": [0.0, *Y, 0.0], "delta_se": [None, *S, None],
              "attn_deltas": list(Y[::-1]), "attn_delta_se": list(S), "inputs": {"plan": "abc"}}
    (src / "sensitivity.json").write_text(json.dumps(record))
    (src / "uniform.json").write_text("{}")
    (src / "plan.json").write_text("{}")
    main([str(src), str(tmp_path / "a")])
    out = json.loads((tmp_path / "a" / "sensitivity.json").read_text())
    assert out["deltas"] == pytest.approx([0.0, *smooth_by_depth(list(Y), list(S))[0], 0.0])
    assert out["attn_deltas"] == record["attn_deltas"]  # heads as measured unless asked
    assert {k: v for k, v in out.items() if k != "deltas"} == {k: v for k, v in record.items() if k != "deltas"}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["sensitivity.json", "uniform.json"]  # no plans
    assert "sensitivity.json: MLP Δ shrunk (largest move " in capsys.readouterr().out
    main([str(src), str(tmp_path / "b"), "--heads"])
    both = json.loads((tmp_path / "b" / "sensitivity.json").read_text())
    assert both["attn_deltas"] == pytest.approx(smooth_sensitivity(record["attn_deltas"], list(S)))
