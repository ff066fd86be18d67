"""Layer sensitivity: the one-pass measurement equals pruning each layer alone in a copy of the
model, the width rule spends the budget where it costs least, and the CLI chain plan →
sensitivity → plan --layer-sensitivity gives those widths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from actprune.client.cli import main as cli
from actprune.core.planning.allocation import removed_fractions
from actprune.core.planning.planner import make_plan
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.wire.plan_request import PlanRequest
from actprune.pruning.compensate import calibrate
from actprune.pruning.compensate.sensitivity import delta_and_error, layer_sensitivity, noise_note
from actprune.pruning.fixtures.synthetic import build_checkpoint
from pruning_helpers import SHAPE, load, record_stats, write_calibration_text

torch.set_num_threads(2)


def test_removed_fractions_spend_the_budget_where_it_costs_least():
    p = removed_fractions([4.0, 2.0, 1.0, 1.0], 0.2)
    assert np.mean(p) == pytest.approx(0.2)
    assert p[0] * 4 == pytest.approx(p[1] * 2) == pytest.approx(p[2])  # ∝ 1/Δ below the cap
    capped = removed_fractions([1.0, 1.0, 1.0, 0.0], 0.2)  # Δ = 0 (noise) goes to the cap, 2 × ratio
    assert capped[3] == pytest.approx(0.4) and np.mean(capped) == pytest.approx(0.2)
    sized = removed_fractions([1.0, 2.0], 0.3, sizes=[100, 300])
    assert np.dot(sized, [100, 300]) == pytest.approx(0.3 * 400)
    assert removed_fractions([1.0, 2.0], 0.0) == [0.0, 0.0]
    root = removed_fractions([4.0, 1.0, 1.0, 1.0], 0.2, exponent=0.5)  # ∝ Δ^-1/2: flatter than 1/Δ
    assert np.mean(root) == pytest.approx(0.2) and root[0] * 2 == pytest.approx(root[1])
    assert removed_fractions([4.0, 1.0], 0.2, exponent=0.0) == pytest.approx([0.2, 0.2])  # uniform
    with pytest.raises(ValueError, match="exponent"):
        removed_fractions([1.0], 0.2, exponent=-1.0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = build_checkpoint(tmp_path_factory.mktemp("sens") / "llama", arch="llama", seed=5, **SHAPE)
    stats = record_stats(d)
    plan = make_plan(stats, json.loads((d / "config.json").read_text()),
                     PlanRequest(strategy="wifv", mlp_ratio=0.25), ColumnNorms.of(d))
    return d, stats, plan


def _loss(model, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))


def _row_losses(model, ids: torch.Tensor) -> np.ndarray:
    return np.array([_loss(model, ids[r:r + 1]) for r in range(ids.shape[0])])


@torch.no_grad()
def test_one_pass_equals_pruning_each_layer_alone(llama):
    d, _, plan = llama
    model = load(d)
    rows = torch.randint(3, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(1))
    keep = {lp.index: lp.mlp_keep for lp in plan.layers}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    errors: dict[str, dict[int, float]] = {}
    got = layer_sensitivity(model, rows, keep, ridge=0.1, probe_rows=3, batch=2, errors=errors, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # left dense
    dense = _loss(model, rows[:3])
    dense_rows = _row_losses(model, rows[:3])
    assert sorted(errors["mlp"]) == sorted(keep) and errors["attn"] == {}
    for i in keep:
        alone = load(d)
        calibrate.layerwise_refit(alone, rows, {i: keep[i]}, ridge=0.1, batch=2, progress=False)
        assert got[i] == pytest.approx(_loss(alone, rows[:3]) - dense, abs=2e-5)
        paired = _row_losses(alone, rows[:3]) - dense_rows  # (3,) the rows' own Δ
        assert errors["mlp"][i] == pytest.approx(paired.std(ddof=1) / np.sqrt(3), rel=1e-3, abs=1e-6)
        assert errors["mlp"][i] > 0


def test_noise_note_counts_layers_whose_delta_is_within_two_errors_of_zero():
    assert noise_note([0.5, 0.01, -0.02, 0.0], [0.01, 0.02, 0.005, None]) == \
        "s.e. median 0.0100; 1 of 3 layers within 2 s.e. of 0"
    assert noise_note([0.5, 0.2], None) == ""  # a record of before the errors, or one probe row
    assert delta_and_error(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 1.0])) == (1.5, 0.5)
    d, se = delta_and_error(torch.tensor([2.0]), torch.tensor([1.0]))
    assert d == 1.0 and se != se  # NaN: one row says nothing of the spread


@torch.no_grad()
def test_one_pass_head_sensitivity_equals_pruning_each_layers_heads_alone(llama):
    d, stats, _ = llama
    plan = make_plan(stats, json.loads((d / "config.json").read_text()),
                     PlanRequest(strategy="magnitude", head_ratio=0.25, mlp_ratio=0.25), ColumnNorms.of(d))
    model = load(d)
    rows = torch.randint(3, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(2))
    heads = {lp.index: (lp.heads_keep, lp.kv_heads_keep) for lp in plan.layers}
    attn: dict[int, float] = {}
    mlp = layer_sensitivity(model, rows, {1: plan.layers[1].mlp_keep}, heads=heads, attn_out=attn,
                            ridge=0.1, probe_rows=3, batch=2, progress=False)
    assert sorted(mlp) == [1] and sorted(attn) == [0, 1, 2, 3]
    dense = _loss(model, rows[:3])
    for i in heads:
        alone = load(d)
        calibrate.layerwise_refit(alone, rows, {}, attention={i: heads[i]}, ridge=0.1, batch=2, progress=False)
        assert attn[i] == pytest.approx(_loss(alone, rows[:3]) - dense, abs=2e-5)
        assert attn[i] != pytest.approx(mlp[1], abs=1e-6)


def test_cli_plan_sensitivity_plan_chain(llama, tmp_path, capsys):
    d, stats, _ = llama
    stats.save(tmp_path / "stats.safetensors")
    text = write_calibration_text(tmp_path / "calib.txt", 60)
    base = ["plan", "--stats", str(tmp_path / "stats.safetensors"), "--model", str(d), "--mlp-ratio", "0.25"]
    assert cli([*base, "-o", str(tmp_path / "uniform.json")]) == 0
    assert cli(["sensitivity", "--model", str(d), "--plan", str(tmp_path / "uniform.json"), "--data", str(text),
                "--seq-len", "32", "--probe-rows", "2", "-o", str(tmp_path / "sens.json")]) == 0
    assert "(MLP Δ: s.e. median " in capsys.readouterr().out
    record = json.loads((tmp_path / "sens.json").read_text())
    assert len(record["deltas"]) == SHAPE["num_hidden_layers"]
    assert len(record["delta_se"]) == len(record["deltas"]) and all(e > 0 for e in record["delta_se"])
    assert cli([*base, "--per-layer", "--layer-sensitivity", str(tmp_path / "sens.json"),
                "-o", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    want = [round((1 - p) * 96) for p in removed_fractions(record["deltas"], 0.25)]  # ∝ 1/Δ: the default
    assert [len(lp["mlp_keep"]) for lp in plan["layers"]] == want
    assert cli([*base, "--per-layer", "--layer-sensitivity", str(tmp_path / "sens.json"), "--sensitivity-exponent",
                "0.5", "-o", str(tmp_path / "even.json")]) == 0
    even = json.loads((tmp_path / "even.json").read_text())
    want_even = [round((1 - p) * 96) for p in removed_fractions(record["deltas"], 0.25, exponent=0.5)]
    assert [len(lp["mlp_keep"]) for lp in even["layers"]] == want_even != want
    capsys.readouterr()
    assert cli([*base, "--layer-sensitivity", str(tmp_path / "sens.json"), "-o", str(tmp_path / "x.json")]) == 2
    assert "needs per_layer" in capsys.readouterr().err
    (tmp_path / "short.json").write_text(json.dumps({**record, "deltas": record["deltas"][:2]}))
    assert cli([*base, "--per-layer", "--layer-sensitivity", str(tmp_path / "short.json"),
                "-o", str(tmp_path / "x.json")]) == 2
    assert "has 2 values" in capsys.readouterr().err
