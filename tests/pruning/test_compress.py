"""`actprune compress`: one command runs uniform plan → sensitivity → budget plan → refit +
slice, meets the budget, equals the same steps run one by one, resumes without redoing
finished steps, and refuses mistakes in one line."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from actprune.client.cli import main
from actprune.pruning.fixtures.synthetic import build_checkpoint
from pruning_helpers import SHAPE, load, logits, record_stats, write_calibration_text

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compress")
    d = build_checkpoint(tmp / "llama", arch="llama", seed=3, **SHAPE)
    record_stats(d).save(tmp / "stats.safetensors")
    data = write_calibration_text(tmp / "calib.txt", 60)
    argv = ["compress", "--model", str(d), "--stats", str(tmp / "stats.safetensors"), "--data", str(data),
            "--param-ratio", "0.2", "--seq-len", "32", "--tokens", "512", "--probe-rows", "2",
            "-o", str(tmp / "out")]
    return tmp, d, argv


def test_compress_meets_the_budget_with_heads_and_mlp_refitted(run, capsys, caplog):
    tmp, d, argv = run
    assert main(argv) == 0
    out = capsys.readouterr().out
    for step in ("uniform.json: wrote", "sensitivity: wrote", "plan.json: wrote", "refit + slice: wrote"):
        assert step in out, out
    plan = json.loads((tmp / "out" / "actprune_plan.json").read_text())
    removed = 1 - plan["params_after"] / plan["params_before"]
    assert 0.18 <= removed <= 0.2 + 1e-9
    assert any(len(lp["heads_keep"]) < SHAPE["num_attention_heads"] for lp in plan["layers"])
    assert plan["slice"]["attn_refit_layers"] and plan["slice"]["mlp_refit_layers"]
    cfg = json.loads((tmp / "out" / "config.json").read_text())
    assert cfg["actprune_bias"] == {"down_proj": True, "o_proj": True}
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.INFO):
            model = load(tmp / "out", trust_remote_code=True)
    finally:
        hf_logging.disable_propagation()
    assert "newly initialized" not in caplog.text.lower()
    assert torch.isfinite(logits(model, torch.arange(3, 40)[None])).all()


def test_compress_plan_equals_the_steps_run_one_by_one(run, capsys):
    tmp, d, argv = run
    steps = tmp / "out.steps"
    if not (steps / "plan.json").is_file():
        assert main(argv) == 0
    rc = main(["plan", "--stats", str(tmp / "stats.safetensors"), "--model", str(d), "--param-ratio", "0.2",
               "--layer-sensitivity", str(steps / "sensitivity.json"), "-o", str(tmp / "by-hand.json")])
    assert rc == 0
    by_hand = json.loads((tmp / "by-hand.json").read_text())
    ours = json.loads((steps / "plan.json").read_text())
    assert by_hand["layers"] == ours["layers"]
    uniform = json.loads((steps / "uniform.json").read_text())
    assert ours["layers"] != uniform["layers"]  # the sensitivities moved the budget
    capsys.readouterr()


def test_compress_rerun_skips_finished_steps_and_redoes_changed_ones(run, capsys):
    tmp, _, argv = run
    if not (tmp / "out" / "actprune_plan.json").is_file():
        assert main(argv) == 0
    sens = tmp / "out.steps" / "sensitivity.json"
    stamps = sens.stat().st_mtime_ns, (tmp / "out" / "config.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sensitivity: kept" in out and "refit + slice: kept" in out and "wrote" not in out, out
    assert (sens.stat().st_mtime_ns, (tmp / "out" / "config.json").stat().st_mtime_ns) == stamps
    assert main([*argv, "--ridge", "0.1"]) == 0  # the measurement depends on the ridge: redone
    out = capsys.readouterr().out
    assert "sensitivity: wrote" in out and "refit + slice: wrote" in out and "uniform.json: kept" in out


def test_compress_mistakes_are_one_line(run, tmp_path, capsys):
    tmp, d, argv = run
    no_ratio = [a for a in argv if a not in ("--param-ratio", "0.2")]
    assert main(no_ratio) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--param-ratio" in err[0]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("not ours")
    other = [*argv[:-1], str(tmp_path / "taken"), "--work", str(tmp / "out.steps")]
    assert main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0]


def test_compress_head_cap_zero_spends_the_budget_on_mlp_neurons_only(run, tmp_path, capsys):
    tmp, _, argv = run
    if not (tmp / "out.steps" / "sensitivity.json").is_file():
        assert main(argv) == 0
    (tmp_path / "steps").mkdir()
    shutil.copy(tmp / "out.steps" / "sensitivity.json", tmp_path / "steps")  # reused if its inputs match
    assert main([*argv[:-1], str(tmp_path / "out"), "--work", str(tmp_path / "steps"), "--head-cap", "0"]) == 0
    capsys.readouterr()
    plan = json.loads((tmp_path / "out" / "actprune_plan.json").read_text())
    assert all(len(lp["heads_keep"]) == SHAPE["num_attention_heads"] for lp in plan["layers"])
    assert 0.18 <= 1 - plan["params_after"] / plan["params_before"] <= 0.2 + 1e-9
