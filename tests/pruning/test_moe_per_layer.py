"""Per-layer expert counts: ``actprune plan --expert-ratio R --per-layer`` removes R of all routed
experts by one threshold on the expert score across sparse layers (within each layer's legal
counts), and ``actprune prune`` writes the actprune architecture with each sparse layer's own
``num_experts``; that checkpoint loads in transformers (actprune's classes, no checkpoint code
run) and equals the original with the removed experts masked out of routing, in float64."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from actprune.client.cli import main
from actprune.core.archs import model_shape
from actprune.core.config import read_config
from actprune.core.planning.experts import global_expert_counts
from actprune.core.wire.plan import Plan
from actprune.core.wire.stats import Stats
from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from actprune.pruning.data import tokenize
from actprune.pruning.record import budget, record
from moe_helpers import SPARSE, assert_sliced_equals_masked, load_f64, tiny_moe
from pruning_helpers import SENTENCES


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_moe(tmp_path_factory.mktemp("moe"))


def _plan(moe, tmp_path: Path, *flags: str) -> Plan:
    ckpt, stats = moe
    out = tmp_path / "plan.json"
    assert main(["plan", "--stats", str(stats), "--model", str(ckpt), *flags, "-o", str(out)]) == 0
    return Plan.load(out)


def test_global_counts_remove_the_least_scored_experts_across_layers():
    scores = {0: np.array([0.5, 0.1, 0.3, 0.1]), 2: np.array([0.05, 0.02, 0.9, 0.03])}
    allowed = {0: [2, 3, 4], 2: [2, 3, 4]}
    assert global_expert_counts(scores, allowed, 2) == {0: 4, 2: 2}  # 0.02, 0.03 go
    assert global_expert_counts(scores, allowed, 3) == {0: 3, 2: 2}  # then a 0.1 of layer 0
    assert global_expert_counts(scores, allowed, 9) == {0: 2, 2: 2}  # never below the minimum
    # steps of two (expert parallelism): the step of least mean score first, no overshoot
    assert global_expert_counts(scores, {0: [2, 4], 2: [2, 4]}, 2) == {0: 4, 2: 2}
    assert global_expert_counts(scores, {0: [2, 4], 2: [2, 4]}, 1) == {0: 4, 2: 4}  # ties keep more


def test_per_layer_plan_thresholds_the_expert_score_across_sparse_layers(moe, tmp_path, capsys):
    ckpt, stats_file = moe
    stats = Stats.load(stats_file)
    plan = _plan(moe, tmp_path, "--expert-ratio", "0.25", "--per-layer", "--strategy", "magnitude")
    counts = [w.num_experts for w in plan.widths]
    assert counts[1] is None and counts[0] + counts[2] == 12 and counts[0] != counts[2] and not plan.uniform
    assert "experts kept per sparse layer: " in capsys.readouterr().out
    scores = {i: stats.router(i)["weight_sum"] / float(stats.router(i)["count"]) for i in SPARSE}
    kept = np.concatenate([scores[i][plan.layers[i].experts_keep] for i in SPARSE])
    gone = np.concatenate([np.delete(scores[i], plan.layers[i].experts_keep) for i in SPARSE])
    assert gone.max() <= kept.min()  # one threshold across layers
    floor = _plan(moe, tmp_path, "--expert-ratio", "0.25", "--per-layer", "--strategy", "magnitude",
                  "--min-experts", "7")
    assert [w.num_experts for w in floor.widths] == [7, None, 7]  # only 2 of 4 can go
    even = _plan(moe, tmp_path, "--expert-ratio", "0.25", "--per-layer", "--strategy", "magnitude",
                 "--expert-multiple", "2")
    assert all(w.num_experts % 2 == 0 for w in even.widths if w.num_experts is not None)


def test_per_layer_experts_slice_to_the_masked_original(moe, tmp_path):
    ckpt, _ = moe
    plan = _plan(moe, tmp_path, "--expert-ratio", "0.25", "--per-layer", "--mlp-ratio", "0.25",
                 "--strategy", "magnitude")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(ckpt), "--plan", str(tmp_path / "plan.json"), "-o", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["ActpruneForCausalLM"] and cfg["actprune_base_model_type"] == "qwen3_moe"
    assert [w.get("num_experts") for w in cfg["actprune_layer_widths"]] == [w.num_experts for w in plan.widths]
    shape = model_shape(cfg)
    assert [s.num_experts for s in shape.layers] == [w.num_experts for w in plan.widths]
    assert shape.params() == plan.params_after

    pruned = load_f64(out)
    assert type(pruned).__module__.startswith("actprune.")  # our class, not the checkpoint's copy
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    for i in SPARSE:
        assert pruned.model.layers[i].mlp.gate.weight.shape[0] == plan.widths[i].num_experts
    assert_sliced_equals_masked(ckpt, pruned, plan)


def test_a_per_layer_moe_checkpoint_is_recorded_planned_and_sliced_again(moe, tmp_path):
    ckpt, _ = moe
    plan = _plan(moe, tmp_path, "--expert-ratio", "0.25", "--per-layer", "--strategy", "magnitude")
    first = slice_checkpoint(ckpt, plan, tmp_path / "first", progress=False)
    tok = load_tokenizer(first)
    again = record(load_causal_lm(first), budget(tokenize(tok, SENTENCES), 64, None), model_name="first",
                   config=read_config(first), progress=False)
    for i in SPARSE:  # each router group has its layer's own expert count, REAP included
        assert again.router(i)["topk_count"].shape == again.router(i)["reap_sum"].shape == (plan.widths[i].num_experts,)
    again.save(tmp_path / "again.safetensors")
    out = tmp_path / "plan2.json"
    assert main(["plan", "--stats", str(tmp_path / "again.safetensors"), "--model", str(first), "--expert-ratio",
                 "0.4", "--expert-strategy", "reap", "--strategy", "magnitude", "-o", str(out)]) == 0
    second = Plan.load(out)
    # no per_layer: each sparse layer keeps the legal count nearest 60 % of its own experts
    assert [w.num_experts for w in second.widths] == [round(0.6 * w.num_experts) if w.num_experts else None
                                                      for w in plan.widths]
    twice = slice_checkpoint(first, second, tmp_path / "second", progress=False)
    model = load_f64(twice)
    assert sum(p.numel() for p in model.parameters()) == second.params_after


def test_param_ratio_on_a_moe_model_removes_experts_worth_that_share_of_parameters(moe, tmp_path, capsys):
    per_expert = 3 * 128 * 64 + 128  # gate, up, down of width 64, and a router row
    for flags in ([], ["--per-layer"]):
        plan = _plan(moe, tmp_path, "--param-ratio", "0.12", "--strategy", "magnitude", *flags)
        removed = plan.params_before - plan.params_after
        assert abs(removed - 0.12 * plan.params_before) <= per_expert  # as close as whole experts allow
        assert plan.widths[1].intermediate_size == 384  # attention and the dense layer keep their widths
        assert all(w.num_attention_heads == 4 for w in plan.widths)
    assert [w.num_experts for w in plan.widths] == [7, None, 5]  # per layer: one threshold, as expert_ratio
    ckpt, stats = moe
    for flags, message in ((["--param-ratio", "0.6"], "more than the routed experts it may remove hold"),
                           (["--param-ratio", "0.1", "--expert-ratio", "0.1"], "not both")):
        capsys.readouterr()
        rc = main(["plan", "--stats", str(stats), "--model", str(ckpt), "--strategy", "magnitude", *flags,
                   "-o", str(tmp_path / "p.json")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "param_ratio" in err and len(err.strip().splitlines()) == 1, err


def test_kept_layers_keep_every_expert_and_the_ratio_comes_from_the_other_sparse_layers(moe, tmp_path, capsys):
    for per_layer in ((), ("--per-layer",)):
        plan = _plan(moe, tmp_path, "--expert-ratio", "0.25", "--keep-layers", "0", *per_layer)
        assert [w.num_experts for w in plan.widths] == [8, None, 4]  # 0.25 of 16 experts, all from layer 2
        assert plan.layers[0].experts_keep == list(range(8))
    ckpt, stats = moe
    capsys.readouterr()
    rc = main(["plan", "--stats", str(stats), "--model", str(ckpt), "--expert-ratio", "0.5", "--keep-layers=-1",
               "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "outside keep_layers hold 8" in err and len(err.strip().splitlines()) == 1, err
