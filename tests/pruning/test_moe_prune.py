"""Qwen3-MoE expert pruning offline: `actprune plan --expert-ratio` keeps the best-scored experts
of every sparse layer, `actprune prune` drops the others and the router's rows, and the result —
a stock `Qwen3MoeForCausalLM` — equals the original model with those experts masked out of
routing (their router logits set to -inf), in float64."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from actprune.client.cli import main
from actprune.core.wire.plan import Plan
from actprune.core.wire.stats import Stats
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from moe_helpers import SPARSE, assert_sliced_equals_masked, load_f64, tiny_moe
from pruning_helpers import TEXTS
from transformers import AutoTokenizer


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "no_norm_topk"])
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_moe(tmp_path_factory.mktemp("moe"), request.param)


def _plan(moe, tmp_path: Path, *flags: str) -> Plan:
    ckpt, stats = moe
    out = tmp_path / "plan.json"
    assert main(["plan", "--stats", str(stats), "--model", str(ckpt), *flags, "-o", str(out)]) == 0
    return Plan.load(out)


def test_expert_plan_keeps_the_best_router_weighted_experts_of_every_sparse_layer(moe, tmp_path):
    ckpt, stats_file = moe
    stats = Stats.load(stats_file)
    plan = _plan(moe, tmp_path, "--expert-ratio", "0.25", "--mlp-ratio", "0.25", "--strategy", "magnitude")
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert raw["format_version"] == 2 and "experts_keep" not in raw["layers"][1]
    for i in SPARSE:
        g = stats.router(i)
        want = sorted(np.argsort(-g["weight_sum"], kind="stable")[:6].tolist())  # 8 · (1 - 0.25)
        assert plan.layers[i].experts_keep == want
        assert plan.widths[i].num_experts == 6 and plan.widths[i].intermediate_size == 64
    assert plan.layers[1].experts_keep is None and plan.widths[1].intermediate_size == 288  # 384 · 0.75
    assert plan.uniform
    # the parameter count holds the experts: 2 sparse layers lose 2 experts of 3·128·64 + a router row
    assert plan.params_before - plan.params_after == 2 * 2 * (3 * 128 * 64 + 128) + 3 * 128 * 96

    freq = _plan(moe, tmp_path, "--expert-ratio", "0.5", "--expert-strategy", "frequency")
    for i in SPARSE:
        topk = stats.router(i)["topk_count"]
        assert freq.layers[i].experts_keep == sorted(np.argsort(-topk, kind="stable")[:4].tolist())


def test_expert_counts_keep_top_k_and_the_expert_multiple(moe, tmp_path, capsys):
    capsys.readouterr()
    assert _plan(moe, tmp_path, "--expert-ratio", "0.5").widths[0].num_experts == 4
    assert "4 of 8 experts kept per sparse layer" in capsys.readouterr().out
    assert _plan(moe, tmp_path, "--expert-ratio", "0.95").widths[0].num_experts == 2  # top-k
    assert _plan(moe, tmp_path, "--expert-ratio", "0.25", "--expert-multiple", "4").widths[0].num_experts == 8
    assert _plan(moe, tmp_path, "--expert-ratio", "0.6", "--expert-multiple", "4").widths[0].num_experts == 4
    assert _plan(moe, tmp_path, "--expert-ratio", "0.95", "--tp-size", "4").widths[0].num_experts == 4


@pytest.mark.parametrize("flags", [["--head-ratio", "0.5"], ["--drop-layers", "1"], ["--expert-strategy", "nope"]])
def test_what_moe_planning_does_not_do_is_refused_in_one_line(moe, tmp_path, capsys, flags):
    ckpt, stats = moe
    capsys.readouterr()
    rc = main(["plan", "--stats", str(stats), "--model", str(ckpt), "--expert-ratio", "0.25", *flags,
               "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert flags[0].removeprefix("--").replace("-", "_") in err


def test_sliced_moe_equals_the_original_with_removed_experts_masked_from_routing(moe, tmp_path, capsys):
    ckpt, _ = moe
    plan = _plan(moe, tmp_path, "--expert-ratio", "0.5", "--mlp-ratio", "0.25", "--strategy", "magnitude")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(ckpt), "--plan", str(tmp_path / "plan.json"), "-o", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and "auto_map" not in cfg
    assert cfg["num_experts"] == cfg["num_local_experts"] == 4 and cfg["intermediate_size"] == 288

    pruned = load_f64(out)  # stock transformers
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    assert_sliced_equals_masked(ckpt, pruned, plan)


def test_edited_expert_plans_are_refused_in_one_line(moe, tmp_path, capsys):
    ckpt, _ = moe
    plan = _plan(moe, tmp_path, "--expert-ratio", "0.5")

    def edit(fn) -> str:
        raw = json.loads(plan.to_json())
        fn(raw)
        path = tmp_path / "edited.json"
        path.write_text(json.dumps(raw))
        return str(path)

    cases = {
        "format_version 2": lambda r: r.update(format_version=1),  # older readers must not take it
        "fewer than the model routes": lambda r: (r["layers"][0].update(experts_keep=[0]),
                                                  r["layers"][2].update(experts_keep=[0]),
                                                  [w.update(num_experts=1) for w in r["widths"] if "num_experts" in w]),
        "without routed experts": lambda r: r["layers"][1].update(experts_keep=[0]),
        "neurons inside experts": lambda r: (r["layers"][0].update(mlp_keep=list(range(32))),
                                             r["widths"][0].update(intermediate_size=32)),
        "needs experts_keep": lambda r: r["layers"][0].pop("experts_keep"),
    }
    for message, fn in cases.items():
        capsys.readouterr()
        rc = main(["prune", "--model", str(ckpt), "--plan", edit(fn), "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (message, err)
        assert not (tmp_path / "out").exists()


def test_norm_topk_prob_decides_whether_untouched_tokens_keep_their_original_weights(moe, tmp_path):
    """docs/moe.md: with ``norm_topk_prob``, a token whose top-k experts are all kept is routed
    with the original weights; without it, its weights grow by Σ_all / Σ_kept probabilities."""
    ckpt, _ = moe
    plan = _plan(moe, tmp_path, "--expert-ratio", "0.5")
    out = slice_checkpoint(ckpt, plan, tmp_path / "pruned", progress=False)
    keep = plan.layers[0].experts_keep
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = tok(TEXTS[:1], return_tensors="pt")["input_ids"]  # (1, T)
    routed = []
    for model in (load_f64(ckpt), load_f64(out)):
        got = {}
        model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o, got=got: got.update(out=o))
        with torch.no_grad():
            model(input_ids=ids)
        routed.append(got["out"])  # (logits (T, E), weights (T, k), experts (T, k))
    (_, w0, e0), (_, w1, e1) = routed
    untouched = torch.isin(e0, torch.tensor(keep)).all(dim=1)  # (T,) top-k all kept
    assert untouched.sum() >= 3
    renamed = torch.tensor(keep)[e1[untouched]]  # pruned expert ids in source numbering
    assert torch.equal(renamed.sort(dim=1).values, e0[untouched].sort(dim=1).values)
    a = w0[untouched].sort(dim=1).values
    b = w1[untouched].sort(dim=1).values
    if json.loads((ckpt / "config.json").read_text())["norm_topk_prob"]:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    else:
        assert bool((b > a * 1.01).all())


def test_checkpoints_config_json_misdescribes_are_refused_in_one_line(moe, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt, _ = moe
    plan = _plan(moe, tmp_path, "--expert-ratio", "0.5")
    broken = Path(shutil.copytree(ckpt, tmp_path / "broken"))
    kept = plan.layers[2].experts_keep[-1]
    missing = f"model.layers.2.mlp.experts.{kept}.up_proj.weight"
    original = load_file(ckpt / "model.safetensors")
    router = "model.layers.0.mlp.gate.weight"
    for edit, message in ((lambda t: t.pop(missing), missing),  # a kept expert's tensor is missing
                          (lambda t: t.update({"model.layers.1.mlp.gate.weight": t[router].clone()}),
                           "a router on a layer config.json describes as dense")):
        tensors = dict(original)
        edit(tensors)
        save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
        capsys.readouterr()
        rc = main(["prune", "--model", str(broken), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
