"""`actprune compress`: one command runs uniform plan → sensitivity → candidate plans → refit +
slice + validation of each → the best candidate as OUT; every candidate meets the budget, OUT is
the candidate with the lowest loss on held-out rows of --data (checked by scoring OUT again),
the plans equal the steps run one by one, a rerun or a killed run does not build a finished
candidate again, and mistakes are refused in one line. With --val-data, the choice is the lowest
mean loss above the dense model's over --data's held-out rows and each other text."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil

import pytest
import torch
from actprune.client.cli import main
from actprune.pruning.fixtures.synthetic import build_checkpoint
from pruning_helpers import SHAPE, load, write_calibration_text
from pruning_helpers import record_stats as record_stats_of

torch.set_num_threads(2)
SEQ, TOKENS, VAL = 32, 512, 6  # the fit reads TOKENS // SEQ = 16 rows; validation the next VAL
RATIO = 0.2
# wider MLPs than SHAPE's, so that they alone can give RATIO of the model (the MLP-only candidate)
MODEL = {**SHAPE, "intermediate_size": 256}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compress")
    d = build_checkpoint(tmp / "llama", arch="llama", seed=3, **MODEL)
    record_stats_of(d).save(tmp / "stats.safetensors")
    data = write_calibration_text(tmp / "calib.txt", 60)  # 50 rows of 32 tokens
    argv = ["compress", "--model", str(d), "--stats", str(tmp / "stats.safetensors"), "--data", str(data),
            "--param-ratio", str(RATIO), "--seq-len", str(SEQ), "--tokens", str(TOKENS), "--probe-rows", "2",
            "--val-rows", str(VAL), "-o", str(tmp / "out")]
    return tmp, d, argv


def _ran(tmp, argv) -> None:
    if not (tmp / "out" / "actprune_plan.json").is_file():
        assert main(argv) == 0


def test_compress_builds_every_candidate_at_the_budget_and_out_loads_cleanly(run, capsys, caplog):
    tmp, d, argv = run
    assert main(argv) == 0
    out = capsys.readouterr().out
    for step in ("split: --data packs into 50 rows", "uniform.json: wrote", "sensitivity: wrote", "plan.json: wrote",
                 "plan-mlp.json: wrote", "candidate budget: wrote", "candidate mlp: wrote", "chosen: "):
        assert step in out, out
    assert re.search(r"MLP Δloss per layer .*\(s\.e\. median [0-9.]+; \d+ of 4 layers within 2 s\.e\. of 0\)", out), out
    record = json.loads((tmp / "out.steps" / "candidates.json").read_text())
    cands = record["candidates"]
    assert {"budget", "mlp"} <= set(cands)
    for name, c in cands.items():
        assert RATIO - 0.01 <= 1 - c["params_after"] / c["params_before"] <= RATIO + 1e-9, name
    budget = json.loads((tmp / "out.steps" / "plan.json").read_text())
    assert any(len(lp["heads_keep"]) < SHAPE["num_attention_heads"] for lp in budget["layers"])
    mlp = json.loads((tmp / "out.steps" / "plan-mlp.json").read_text())
    assert all(len(lp["heads_keep"]) == SHAPE["num_attention_heads"] for lp in mlp["layers"])
    assert not list((tmp / "out.steps").glob("candidate-*"))  # the candidates' checkpoints are cleaned up
    plan = json.loads((tmp / "out" / "actprune_plan.json").read_text())
    assert plan["slice"]["mlp_refit_layers"]
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.INFO):
            load(tmp / "out", trust_remote_code=True)
    finally:
        hf_logging.disable_propagation()
    assert "newly initialized" not in caplog.text.lower()


def test_compress_keeps_the_candidate_with_the_lowest_validation_loss(run, capsys):
    tmp, d, argv = run
    _ran(tmp, argv)
    capsys.readouterr()
    record = json.loads((tmp / "out.steps" / "candidates.json").read_text())
    losses = {n: c["loss"] for n, c in record["candidates"].items()}
    assert len(set(losses.values())) == len(losses) >= 2  # distinct candidates: the choice matters
    chosen = json.loads((tmp / "out" / "actprune_plan.json").read_text())
    best = min(losses, key=losses.get)  # the lowest, unless an MLP-only one is within the 0.01 margin
    mlp_only = min((n for n in losses if n in ("mlp", "mlp-ends")), key=losses.get)
    assert chosen["slice"]["candidate"] == (mlp_only if losses[mlp_only] - losses[best] <= 0.01 else best)
    a, b = record["validation"]["rows"]
    assert (a, b) == (TOKENS // SEQ, TOKENS // SEQ + VAL)  # after every row the probe and refit read
    # OUT, loaded as a user would, scores what the record says on those rows
    from actprune.pruning.checkpoint.hf_io import load_tokenizer
    from actprune.pruning.data import packed_rows

    tok = load_tokenizer(tmp / "out")
    rows = packed_rows(tok, argv[argv.index("--data") + 1], None, SEQ)[a:b]
    model = load(tmp / "out", trust_remote_code=True)
    with torch.no_grad():
        loss = float(model(input_ids=rows, labels=rows).loss)
    assert math.isclose(loss, losses[chosen["slice"]["candidate"]], rel_tol=1e-4)


def _steps_with_losses(run, tmp_path, edit):
    """A copy of the shared run's step files whose recorded validation losses ``edit`` (called
    with {name: record}) has set: the choice a rerun makes is then the test's."""
    tmp, _, argv = run
    _ran(tmp, argv)
    work = tmp_path / "steps"
    shutil.copytree(tmp / "out.steps", work)
    record = json.loads((work / "candidates.json").read_text())
    edit(record["candidates"])
    (work / "candidates.json").write_text(json.dumps(record))
    return work


@pytest.mark.parametrize("lead, want", [(0.05, "heads-capped"), (0.005, "mlp")],
                         ids=["heads win by 5 %", "heads within 1 %: mlp kept"])
def test_compress_choice_follows_the_recorded_validation_losses(run, tmp_path, capsys, lead, want):
    """Whichever candidate the data favours, by more than the margin a head-pruning candidate
    must win by (and rebuilt: its checkpoint is gone): the recorded losses are set so."""
    _, _, argv = run

    def edit(cands):
        assert "heads-capped" in cands, list(cands)
        worst = max(c["loss"] for c in cands.values())
        cands["budget"]["loss"] = worst + 1.0
        for twin in ("mlp-even", "mlp-bold"):  # the other MLP-only candidates: behind mlp
            cands[twin]["loss"] = worst + 0.75
        cands["mlp"]["loss"] = worst + 0.5
        cands["heads-capped"]["loss"] = worst + 0.5 - lead

    work = _steps_with_losses(run, tmp_path, edit)
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "out"), "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert f"chosen: {want}: rebuilt" in out and "candidate budget: kept" in out, out
    assert ("mlp kept: heads-capped validates better by 0.50%" in out) == (want == "mlp"), out
    chosen = json.loads((tmp_path / "out" / "actprune_plan.json").read_text())
    plan_file = {"heads-capped": "plan-heads-capped.json", "mlp": "plan-mlp.json"}[want]
    assert chosen["slice"]["candidate"] == want
    assert chosen["layers"] == json.loads((work / plan_file).read_text())["layers"]


def test_compress_candidates_builds_and_chooses_among_those_named_only(run, tmp_path, capsys):
    """--candidates: a subset is chosen among (the others neither built nor in the table), the
    finished ones of an earlier run reused; the losses are set so that the best of all is left out."""
    _, _, argv = run

    def edit(cands):  # every candidate behind budget, mlp-bold the best of the two named
        for name in cands:
            cands[name]["loss"] = 5.0
        cands["budget"]["loss"], cands["mlp"]["loss"], cands["mlp-bold"]["loss"] = 1.0, 3.0, 2.0

    work = _steps_with_losses(run, tmp_path, edit)
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "out"), "--work", str(work), "--candidates", "mlp-bold, mlp"]) == 0
    out = capsys.readouterr().out
    assert "candidate mlp: kept" in out and "candidate mlp-bold: kept" in out and "chosen: mlp-bold: rebuilt" in out
    assert not re.search(r"^\s*\*?\s*(budget|heads-capped|mlp-even) ", out, re.M), out  # not in the table
    assert json.loads((tmp_path / "out" / "actprune_plan.json").read_text())["slice"]["candidate"] == "mlp-bold"


def test_compress_candidates_mistakes_are_one_line(run, tmp_path, capsys):
    tmp, d, argv = run
    for names, why in (("mlp,mlp-end", "unknown candidate 'mlp-end'"), ("mlp,mlp", "named twice"),
                       (",", "no candidate named")):
        assert main([*argv[:-1], str(tmp_path / "o"), "--candidates", names]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0] and "mlp-ends-bold" in err[0], err  # the list of candidates
    # a known candidate that this model (4 layers) does not build: refused, naming those it does
    assert main([*argv[:-1], str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--candidates", "mlp-ends"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of mlp-ends is built" in err[0] and "here: mlp, mlp-even, mlp-bold" in err[0], err
    assert not (tmp_path / "w" / "sensitivity.json").exists()  # the ends layouts do not need it
    # the Python API checks the names too, before measuring anything
    from actprune.pruning.compress import CompressConfig, CompressError, compress

    cfg = CompressConfig(model=d, stats=tmp / "stats.safetensors", data=argv[argv.index("--data") + 1],
                         output=tmp_path / "api", request={"param_ratio": RATIO}, seq_len=SEQ, tokens=TOKENS,
                         probe_rows=2, val_rows=VAL, candidates=("mlp", "mlp-end"), progress=False)
    with pytest.raises(CompressError, match="--candidates: unknown candidate 'mlp-end'"):
        compress(cfg)
    assert not (tmp_path / "api.steps" / "uniform.json").exists()


def test_compress_plans_equal_the_steps_run_one_by_one(run, capsys):
    tmp, d, argv = run
    _ran(tmp, argv)
    steps = tmp / "out.steps"
    base = ["plan", "--stats", str(tmp / "stats.safetensors"), "--model", str(d),
            "--layer-sensitivity", str(steps / "sensitivity.json")]
    assert main([*base, "--param-ratio", str(RATIO), "-o", str(tmp / "by-hand.json")]) == 0
    ours = json.loads((steps / "plan.json").read_text())
    assert json.loads((tmp / "by-hand.json").read_text())["layers"] == ours["layers"]
    uniform = json.loads((steps / "uniform.json").read_text())
    assert ours["layers"] != uniform["layers"]  # the sensitivities moved the budget
    mlp = json.loads((steps / "plan-mlp.json").read_text())
    ratio = mlp["provenance"]["request"]["mlp_ratio"]
    assert main([*base, "--mlp-ratio", repr(ratio), "--per-layer", "-o", str(tmp / "by-hand-mlp.json")]) == 0
    assert json.loads((tmp / "by-hand-mlp.json").read_text())["layers"] == mlp["layers"]
    capsys.readouterr()


def test_compress_rerun_skips_finished_steps_and_redoes_changed_ones(run, capsys):
    tmp, _, argv = run
    _ran(tmp, argv)
    sens = tmp / "out.steps" / "sensitivity.json"
    cands = tmp / "out.steps" / "candidates.json"
    stamps = [p.stat().st_mtime_ns for p in (sens, cands, tmp / "out" / "config.json")]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sensitivity: kept" in out and "candidate budget: kept" in out and "candidate mlp: kept" in out
    assert "chosen: " in out and "wrote" not in out and "refit + slice" not in out, out
    assert [p.stat().st_mtime_ns for p in (sens, cands, tmp / "out" / "config.json")] == stamps
    assert main([*argv, "--ridge", "0.1"]) == 0  # the measurement depends on the ridge: redone
    out = capsys.readouterr().out
    assert "sensitivity: wrote" in out and "candidate mlp: wrote" in out and "uniform.json: kept" in out


def test_compress_rerun_after_the_data_file_was_edited_in_place_measures_again(run, tmp_path, capsys):
    # the records are keyed by the rows read, not by the file's name
    tmp, _, argv = run
    data = tmp_path / "calib.txt"
    shutil.copy(argv[argv.index("--data") + 1], data)
    other = _other_domain(tmp_path / "other.txt")
    mine = [*argv[:-1], str(tmp_path / "out"), "--val-data", str(other)]
    mine[mine.index("--data") + 1] = str(data)
    assert main(mine) == 0
    capsys.readouterr()
    other.write_text(other.read_text().replace("the", "a"))  # a validation text changed: re-validated
    assert main(mine) == 0
    out = capsys.readouterr().out
    assert "sensitivity: kept" in out and "candidate mlp: wrote" in out, out
    data.write_text(data.read_text().replace("river", "lake", 1))  # the fit's text changed: all redone
    assert main(mine) == 0
    out = capsys.readouterr().out
    assert "sensitivity: wrote" in out and "candidate mlp: wrote" in out, out


@pytest.mark.parametrize("edited", [False, True], ids=["as-left", "record-edited"])
def test_compress_killed_midway_resumes_without_rebuilding_finished_candidates(run, tmp_path, capsys, monkeypatch,
                                                                               edited):
    tmp, _, argv = run
    _ran(tmp, argv)
    work = tmp_path / "steps"
    work.mkdir()
    for f in ("uniform.json", "sensitivity.json"):  # reused: their inputs match
        shutil.copy(tmp / "out.steps" / f, work)
    argv = [*argv[:-1], str(tmp_path / "out"), "--work", str(work)]
    from actprune.pruning.compensate import refit_plan

    real, built = refit_plan.refit_for_plan, []

    def refit(model_dir, plan, *a, **kw):
        built.append(plan.layers)
        if kill_at is not None and len(built) == kill_at:
            raise KeyboardInterrupt  # a kill while the second candidate is refitted
        return real(model_dir, plan, *a, **kw)

    monkeypatch.setattr(refit_plan, "refit_for_plan", refit)
    kill_at = 2
    assert main(argv) == 130 and not (tmp_path / "out").exists()
    record = json.loads((work / "candidates.json").read_text())
    assert list(record["candidates"]) == ["budget"]  # the first candidate finished, its figures kept
    first = built[0]
    if edited:  # a finished candidate whose record no longer says what made it: built again, no traceback
        (kept,) = work.glob("candidate-budget*/actprune_plan.json")
        kept.write_text(json.dumps({**json.loads(kept.read_text()), "slice": None}))
    capsys.readouterr()
    built.clear()
    kill_at = None
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "candidate budget: kept" in out, out
    assert (first in built) is edited  # else not refitted again (its checkpoint, if chosen, is moved to OUT)
    n = len(json.loads((work / "candidates.json").read_text())["candidates"])
    assert len(built) == n - 1 + edited and (tmp_path / "out" / "actprune_plan.json").is_file()


def test_compress_mistakes_are_one_line(run, tmp_path, capsys):
    tmp, d, argv = run
    no_ratio = [a for a in argv if a not in ("--param-ratio", str(RATIO))]
    assert main(no_ratio) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--param-ratio" in err[0] and "--mlp-ratio" in err[0]
    too_much = [*argv[:-1], str(tmp_path / "o1")]
    too_much[too_much.index("--param-ratio") + 1] = "1.5"
    assert main(too_much) == 2
    out, err = capsys.readouterr()
    assert "--param-ratio must be in (0, 1)" in err and "split:" not in out  # refused before --data is packed
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("not ours")
    other = [*argv[:-1], str(tmp_path / "taken"), "--work", str(tmp / "out.steps")]
    assert main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0]
    small = write_calibration_text(tmp_path / "small.txt", 4)  # 3 rows: not 2 probe + VAL validation rows
    argv_small = [*argv[:-1], str(tmp_path / "o2"), "--data", str(small)]
    assert main(argv_small) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--val-rows" in err[0] and "rows" in err[0], err


def test_compress_mlp_ratio_removes_that_share_of_the_neurons_and_no_head(run, tmp_path, capsys):
    tmp, d, argv = run
    i = argv.index("--param-ratio")
    argv_m = [*argv[:i], "--mlp-ratio", "0.25", *argv[i + 2:-1], str(tmp_path / "out")]
    assert main(argv_m) == 0
    out = capsys.readouterr().out
    assert "candidates mlp,mlp-even,mlp-bold" in out, out  # 4 layers: no ends layout
    plan = json.loads((tmp_path / "out" / "actprune_plan.json").read_text())
    assert plan["slice"]["candidate"] in ("mlp", "mlp-even", "mlp-bold")
    assert all(len(lp["heads_keep"]) == MODEL["num_attention_heads"] for lp in plan["layers"])
    kept = sum(len(lp["mlp_keep"]) for lp in plan["layers"])
    assert kept == round(0.75 * MODEL["intermediate_size"] * MODEL["num_hidden_layers"]), kept
    for extra, message in ((["--param-ratio", "0.1"], "one of them"),
                           (["--candidates", "mlp,heads-capped"], "heads-capped: they take attention heads"),
                           (["--head-cap", "0.5"], "--head-cap is for --param-ratio")):
        assert main([*argv_m[:-1], str(tmp_path / "o3"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    argv_bad = [*argv_m[:-1], str(tmp_path / "o3")]
    argv_bad[argv_bad.index("--mlp-ratio") + 1] = "1.5"
    assert main(argv_bad) == 2
    assert "--mlp-ratio must be in (0, 1)" in capsys.readouterr().err


def test_compress_head_cap_zero_spends_the_budget_on_mlp_neurons_only(run, tmp_path, capsys):
    tmp, _, argv = run
    _ran(tmp, argv)
    capsys.readouterr()  # the shared run's output, when this test is the first to need it
    (tmp_path / "steps").mkdir()
    shutil.copy(tmp / "out.steps" / "sensitivity.json", tmp_path / "steps")  # reused if its inputs match
    assert main([*argv[:-1], str(tmp_path / "out"), "--work", str(tmp_path / "steps"), "--head-cap", "0"]) == 0
    out = capsys.readouterr().out
    assert "plan-heads-capped.json" not in out  # the request's own cap: no second capped candidate
    plan = json.loads((tmp_path / "out" / "actprune_plan.json").read_text())
    assert all(len(lp["heads_keep"]) == SHAPE["num_attention_heads"] for lp in plan["layers"])
    assert RATIO - 0.01 <= 1 - plan["params_after"] / plan["params_before"] <= RATIO + 1e-9


def _other_domain(path):
    """A text of another 'domain' for --val-data: other words than write_calibration_text's."""
    from pruning_helpers import SENTENCES

    path.write_text("\n\n".join(f"{SENTENCES[k % len(SENTENCES)]} Item {k}." for k in range(40)))
    return path


def test_compress_val_data_scores_every_set_and_chooses_by_the_mean_excess(run, tmp_path, capsys):
    tmp, _, argv = run
    _ran(tmp, argv)
    other = _other_domain(tmp_path / "other.txt")
    work = tmp_path / "steps"
    work.mkdir()
    for f in ("uniform.json", "sensitivity.json"):  # reused: their inputs match
        shutil.copy(tmp / "out.steps" / f, work)
    argv_v = [*argv[:-1], str(tmp_path / "out"), "--work", str(work), "--val-data", str(other)]
    capsys.readouterr()
    assert main(argv_v) == 0
    out = capsys.readouterr().out
    assert f"split: --val-data {other}: validation on its first {VAL} rows" in out, out
    assert "mean × dense" in out and f"[1] {other}" in out, out
    record = json.loads((work / "candidates.json").read_text())
    assert set(record["validation"]["sets"]) == {"--data", str(other)}
    dense = {"--data": record["dense"]["loss"], **record["dense"]["extra"]}
    assert set(dense) == {"--data", str(other)}
    from actprune.pruning.candidates import MLP_ONLY, choose, excess_loss

    scores = {n: excess_loss({"--data": c["loss"], **c["extra"]}, dense) for n, c in record["candidates"].items()}
    chosen = json.loads((tmp_path / "out" / "actprune_plan.json").read_text())["slice"]["candidate"]
    assert chosen == choose(scores, prefer=MLP_ONLY)  # the lowest mean excess, MLP-only within the margin
    # OUT, loaded as a user would, scores the recorded losses: --data's held-out rows, the other
    # text's first VAL rows
    from actprune.pruning.checkpoint.hf_io import load_tokenizer
    from actprune.pruning.data import packed_rows

    tok = load_tokenizer(tmp_path / "out")
    a, b = record["validation"]["rows"]
    data = argv[argv.index("--data") + 1]
    model = load(tmp_path / "out", trust_remote_code=True)
    for source, sl, want in ((data, slice(a, b), record["candidates"][chosen]["loss"]),
                             (str(other), slice(0, VAL), record["candidates"][chosen]["extra"][str(other)])):
        rows = packed_rows(tok, source, None, SEQ)[sl]
        with torch.no_grad():
            loss = float(model(input_ids=rows, labels=rows).loss)
        assert math.isclose(loss, want, rel_tol=1e-4), source

    # the other text decides when it disagrees with --data: make --data's best the worst out of domain
    best_in = min(record["candidates"], key=lambda n: record["candidates"][n]["loss"])
    for n, c in record["candidates"].items():
        c["extra"][str(other)] = dense[str(other)] + (10.0 if n == best_in else 0.01)
    (work / "candidates.json").write_text(json.dumps(record))
    assert main([*argv_v[:-5], str(tmp_path / "out2"), *argv_v[-4:]]) == 0
    out = capsys.readouterr().out
    chosen2 = json.loads((tmp_path / "out2" / "actprune_plan.json").read_text())["slice"]["candidate"]
    assert chosen2 != best_in, out
    assert not re.search(r"candidate \S+: wrote", out), out  # the recorded figures decided, none re-measured


def test_compress_val_data_mistakes_are_one_line(run, tmp_path, capsys):
    tmp, _, argv = run
    data = argv[argv.index("--data") + 1]
    (tmp_path / "short.txt").write_text("Too short.")
    for extra, words in (([data], "--data"), ([str(tmp_path / "missing.txt")], "no such file"),
                         ([str(tmp_path / "short.txt")], "not enough for one block"),
                         ([str(_other_domain(tmp_path / "o.txt"))] * 2, "twice")):
        bad = [*argv[:-1], str(tmp_path / "o"), *[a for x in extra for a in ("--val-data", x)]]
        assert main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--val-data" in err[0] and words in err[0], err


def test_compress_measures_heads_at_a_budget_too_small_to_take_a_kv_group_uniformly(run, tmp_path, capsys):
    # at 5 % the uniform split takes no KV group from any layer (4 a layer); the heads are then
    # measured at one group a layer (uniform-heads.json), so the budget allocation can weigh them
    tmp, _, argv = run
    small = [*argv[:-1], str(tmp_path / "out")]
    small[small.index("--param-ratio") + 1] = "0.05"
    assert main(small) == 0
    out = capsys.readouterr().out
    work = tmp_path / "out.steps"
    uniform = json.loads((work / "uniform.json").read_text())
    assert all(len(lp["kv_heads_keep"]) == SHAPE["num_key_value_heads"] for lp in uniform["layers"])
    probe = json.loads((work / "uniform-heads.json").read_text())
    assert all(len(lp["kv_heads_keep"]) == SHAPE["num_key_value_heads"] - 1 for lp in probe["layers"]), out
    sens = json.loads((work / "sensitivity.json").read_text())
    assert sens["attn_removed"] == [0.25] * SHAPE["num_hidden_layers"]
    assert sens["attn_deltas"] and all(d != 0 for d in sens["attn_deltas"])
    assert sens["mlp_removed"] == [1 - len(lp["mlp_keep"]) / MODEL["intermediate_size"] for lp in uniform["layers"]]
    assert "heads are measured at uniform-heads.json" in out


def test_compress_of_a_checkpoint_with_layers_of_different_group_counts_probes_one_group_a_layer(run, tmp_path,
                                                                                                  capsys):
    # a checkpoint compressed before (the budget candidate: per-layer KV groups) compressed again
    # at a budget too small for the uniform split to take a group: each layer's heads are
    # measured at one group fewer than *it* has, one probe plan per group count
    tmp, _, argv = run
    _ran(tmp, argv)
    mixed = tmp_path / "mixed"
    assert main(["prune", "--model", str(tmp / "llama"), "--plan", str(tmp / "out.steps" / "plan.json"),
                 "-o", str(mixed)]) == 0
    kv = [len(lp["kv_heads_keep"]) for lp in json.loads((tmp / "out.steps" / "plan.json").read_text())["layers"]]
    assert len({k for k in kv if k >= 2}) >= 2, kv  # the premise: layers of at least two group counts
    record_stats_of(mixed).save(tmp_path / "stats.safetensors")
    again = [*argv[:-1], str(tmp_path / "out")]
    again[again.index("--model") + 1] = str(mixed)
    again[again.index("--stats") + 1] = str(tmp_path / "stats.safetensors")
    again[again.index("--param-ratio") + 1] = "0.03"
    assert main(again) == 0
    out = capsys.readouterr().out
    work = tmp_path / "out.steps"
    sens = json.loads((work / "sensitivity.json").read_text())
    assert sens["attn_removed"] == [pytest.approx(1 / k) if k >= 2 else 0.0 for k in kv], (kv, sens["attn_removed"])
    assert sorted(p.name for p in work.glob("uniform-heads-*.json")) == sorted(
        f"uniform-heads-{k}.json" for k in set(kv) if k >= 2), out


def test_compress_keep_layers_leaves_them_whole_in_every_candidate_at_the_same_budget(run, tmp_path, capsys):
    tmp, _, argv = run
    assert main([*argv[:-1], str(tmp_path / "out"), "--keep-layers=-1"]) == 0
    capsys.readouterr()
    last = MODEL["num_hidden_layers"] - 1
    for name in ("plan.json", "plan-heads-capped.json", "plan-mlp.json"):
        path = tmp_path / "out.steps" / name
        if path.is_file():  # a candidate the budget allows
            plan = json.loads(path.read_text())
            lp = plan["layers"][last]
            assert len(lp["mlp_keep"]) == MODEL["intermediate_size"], name
            assert len(lp["heads_keep"]) == MODEL["num_attention_heads"], name
            assert RATIO - 0.01 <= 1 - plan["params_after"] / plan["params_before"] <= RATIO + 1e-9, name
    assert (tmp_path / "out.steps" / "plan-mlp.json").is_file()
    out = json.loads((tmp_path / "out" / "actprune_plan.json").read_text())
    assert out["provenance"]["request"]["keep_layers"] == [-1]
    assert main([*argv[:-1], str(tmp_path / "bad"), "--keep-layers", "3-1"]) == 2
    err = capsys.readouterr().err
    assert "--keep-layers: '3-1'" in err and len(err.strip().splitlines()) == 1, err


def test_compress_of_a_deep_model_builds_the_ends_candidate_and_keeps_the_lowest(tmp_path, capsys):
    """16 layers or more: a fourth candidate, MLP only with the first and last layers whole."""
    d = build_checkpoint(tmp_path / "deep", arch="llama", seed=5, **{**MODEL, "num_hidden_layers": 16})
    record_stats_of(d).save(tmp_path / "stats.safetensors")
    data = write_calibration_text(tmp_path / "calib.txt", 60)
    assert main(["compress", "--model", str(d), "--stats", str(tmp_path / "stats.safetensors"), "--data", str(data),
                 "--param-ratio", "0.1", "--seq-len", str(SEQ), "--tokens", str(TOKENS), "--probe-rows", "2",
                 "--val-rows", str(VAL), "--head-cap", "0", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "sensitivity: no heads measured (none to probe at this budget and --head-cap): MLP neurons only" in out
    ends = json.loads((tmp_path / "out.steps" / "plan-mlp-ends.json").read_text())
    assert ends["provenance"]["request"]["keep_layers"] == [0, 1, 15]
    assert all(len(ends["layers"][i]["mlp_keep"]) == MODEL["intermediate_size"] for i in (0, 1, 15))
    # its widths come from the Δ measured on its own uniform layout (the other layers losing more)
    own = json.loads((tmp_path / "out.steps" / "sensitivity-ends.json").read_text())
    assert ends["provenance"]["request"]["layer_sensitivity"] == pytest.approx(own["deltas"])
    assert own["deltas"] != json.loads((tmp_path / "out.steps" / "sensitivity.json").read_text())["deltas"]
    assert abs(1 - ends["params_after"] / ends["params_before"] - 0.1) < 0.005  # within a neuron a layer
    record = json.loads((tmp_path / "out.steps" / "candidates.json").read_text())
    loss = {n: r["loss"] for n, r in record["candidates"].items()}
    twins = ("mlp-ends-even", "mlp-ends-bold")
    assert {"mlp", "mlp-ends", *twins} <= set(loss) and re.search(r"mlp-ends\s+\d", out)
    # the twins: the same layout and Δ, the cut spread by Δ^-1/2 and by Δ^-2
    for twin, exponent in zip(twins, (0.5, 2.0), strict=True):
        req = json.loads((tmp_path / "out.steps" / f"plan-{twin}.json").read_text())["provenance"]["request"]
        assert req == {**ends["provenance"]["request"], "sensitivity_exponent": exponent}, twin
    chosen = json.loads((tmp_path / "out" / "actprune_plan.json").read_text())
    mlp_only = min(("mlp", "mlp-ends", *twins), key=loss.__getitem__)
    assert chosen["layers"] == json.loads((tmp_path / "out.steps" / f"plan-{mlp_only}.json").read_text())["layers"]
    # --candidates of the ends layouts alone: no whole-model sensitivity pass; the same plans and losses
    capsys.readouterr()
    assert main(["compress", "--model", str(d), "--stats", str(tmp_path / "stats.safetensors"), "--data", str(data),
                 "--param-ratio", "0.1", "--seq-len", str(SEQ), "--tokens", str(TOKENS), "--probe-rows", "2",
                 "--val-rows", str(VAL), "--head-cap", "0", "--candidates", "mlp-ends-bold,mlp-ends",
                 "-o", str(tmp_path / "sub")]) == 0
    assert "whole-model pass is skipped" in capsys.readouterr().out
    steps = tmp_path / "sub.steps"
    assert not (steps / "sensitivity.json").exists() and not (steps / "uniform.json").exists()
    sub = json.loads((steps / "candidates.json").read_text())["candidates"]
    assert list(sub) == ["mlp-ends", "mlp-ends-bold"]  # CANDIDATES order, the others not built
    for name in sub:
        assert sub[name]["loss"] == pytest.approx(loss[name], rel=1e-6), name
        ours = json.loads((steps / f"plan-{name}.json").read_text())["layers"]
        assert ours == json.loads((tmp_path / "out.steps" / f"plan-{name}.json").read_text())["layers"], name
    chosen = json.loads((tmp_path / "sub" / "actprune_plan.json").read_text())["slice"]["candidate"]
    assert chosen == min(sub, key=loss.__getitem__)


def test_compress_reconstruct_trains_the_kept_mlps_and_is_part_of_what_a_rerun_checks(run, tmp_path, capsys):
    tmp, _, argv = run
    out = tmp_path / "out"
    argv_r = [*argv[:-1], str(out), "--candidates", "mlp", "--reconstruct", "2"]
    assert main(argv_r) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "actprune_plan.json").read_text())["slice"]
    assert record["mlp_reconstructed_layers"] == record["mlp_refit_layers"] and record["mlp_refit_layers"]
    assert f"reconstruct: {len(record['mlp_refit_layers'])} MLPs, held-out error" in printed, printed
    assert record["compress"]["reconstruct"] == 2
    assert main([*argv_r[:-2], "--overwrite"]) == 0  # without --reconstruct: built again, plainly refitted
    assert "refit + slice (mlp): wrote" in capsys.readouterr().out
    assert "mlp_reconstructed_layers" not in json.loads((out / "actprune_plan.json").read_text())["slice"]
    assert main([*argv_r[:-1], "-1"]) == 2
    assert "--reconstruct >= 0" in capsys.readouterr().err
