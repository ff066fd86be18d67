"""Slicer fidelity in fp32: the sliced checkpoint equals the original model with the same units
masked to zero, for neurons, heads and layers, with and without bias compensation, for every
supported architecture. Plus the file-level promises (atomic output, no pickles, index)."""

from __future__ import annotations

import json

import pytest
import torch
from actprune.core.planning.planner import make_plan
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.wire.plan import Plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.pruning.checkpoint import slicer
from actprune.pruning.checkpoint.slicer import PLAN_RECORD, SliceError, slice_checkpoint
from pruning_helpers import input_ids, load, logits, masked_reference, max_diff
from safetensors import safe_open

TOL = 1e-5


def make(checkpoints, stats_for, arch, **fields) -> Plan:
    d = checkpoints[arch]
    cfg = json.loads((d / "config.json").read_text())
    return make_plan(stats_for[arch], cfg, PlanRequest(**fields), ColumnNorms.of(d))


def check_matches_masked(checkpoints, stats_for, arch, tmp_path, plan, *, compensate=False, stock=True):
    src = checkpoints[arch]
    stats = stats_for[arch] if compensate else None
    out = slice_checkpoint(src, plan, tmp_path / "out", stats=stats, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"] == ["ActpruneForCausalLM"]) is not stock
    pruned = load(out, trust_remote_code=not stock)
    ids = input_ids(src)
    got = logits(pruned, ids)
    assert max_diff(got, logits(masked_reference(src, plan, stats), ids)) <= TOL
    return got, out


def test_keep_everything_plan_reproduces_original_logits_exactly(checkpoints, stats_for, arch, tmp_path):
    plan = make(checkpoints, stats_for, arch)
    assert plan.is_identity
    out = slice_checkpoint(checkpoints[arch], plan, tmp_path / "out", progress=False)
    ids = input_ids(checkpoints[arch])
    assert torch.equal(logits(load(out), ids), logits(load(checkpoints[arch]), ids))


def test_neuron_pruning_equals_masked_model(checkpoints, stats_for, arch, tmp_path):
    plan = make(checkpoints, stats_for, arch, strategy="wanda_sp", mlp_ratio=0.3)
    got, _ = check_matches_masked(checkpoints, stats_for, arch, tmp_path, plan)
    ids = input_ids(checkpoints[arch])
    assert max_diff(got, logits(load(checkpoints[arch]), ids)) > 1e-3  # pruning did change the model


@pytest.mark.parametrize("mode", ["kv_groups", "query_heads"])
def test_head_pruning_equals_masked_model(checkpoints, stats_for, arch, tmp_path, mode):
    plan = make(checkpoints, stats_for, arch, strategy="wifv", head_ratio=0.5, head_mode=mode)
    _, out = check_matches_masked(checkpoints, stats_for, arch, tmp_path, plan)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == ((4, 2) if mode == "kv_groups" else (4, 4))
    assert cfg["head_dim"] == 32


def test_layer_dropping_renumbers_layers_and_equals_masked_model(checkpoints, stats_for, arch, tmp_path):
    plan = make(checkpoints, stats_for, arch, drop_layers=2)
    _, out = check_matches_masked(checkpoints, stats_for, arch, tmp_path, plan)
    with safe_open(out / "model-00001-of-00001.safetensors", framework="pt") as f:
        layers = {int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers.")}
    assert layers == {0, 1}


def test_per_layer_widths_load_with_remote_code_and_equal_masked_model(checkpoints, stats_for, arch, tmp_path):
    plan = make(checkpoints, stats_for, arch, strategy="magnitude", mlp_ratio=0.4, head_ratio=0.25,
                head_mode="query_heads", drop_layers=1, per_layer=True, width_multiple=4)
    assert not plan.uniform
    _, out = check_matches_masked(checkpoints, stats_for, arch, tmp_path, plan, stock=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["actprune_layer_widths"] == [w.model_dump(exclude_none=True) for w in plan.widths]
    assert (out / "modeling_actprune.py").is_file() and "auto_map" in cfg


def test_bias_compensation_equals_masked_model_plus_mean_contribution(checkpoints, stats_for, arch, tmp_path):
    plan = make(checkpoints, stats_for, arch, mlp_ratio=0.5, head_ratio=0.5)
    got, _ = check_matches_masked(checkpoints, stats_for, arch, tmp_path, plan, compensate=True, stock=False)
    ids = input_ids(checkpoints[arch])
    assert max_diff(got, logits(masked_reference(checkpoints[arch], plan), ids)) > 1e-4  # the bias matters


def test_qwen3_q_norm_and_k_norm_survive_head_pruning_unchanged(checkpoints, stats_for, tmp_path):
    plan = make(checkpoints, stats_for, "qwen3", head_ratio=0.5)
    out = slice_checkpoint(checkpoints["qwen3"], plan, tmp_path / "out", progress=False)
    src = slicer.ShardIndex(checkpoints["qwen3"])
    dst = slicer.ShardIndex(out)
    for name in ("model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"):
        assert dst.read(name).shape == (32,) and torch.equal(dst.read(name), src.read(name))


def test_output_records_plan_copies_tokenizer_and_never_pickles(checkpoints, stats_for, tmp_path):
    src = tmp_path / "src"
    import shutil

    shutil.copytree(checkpoints["llama"], src)
    (src / "training_args.bin").write_bytes(b"\x80\x04pickle")
    plan = make(checkpoints, stats_for, "llama", mlp_ratio=0.25)
    out = slice_checkpoint(src, plan, tmp_path / "out", progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "generation_config.json", PLAN_RECORD, "model.safetensors.index.json"} <= names
    assert "training_args.bin" not in names
    record = json.loads((out / PLAN_RECORD).read_text())
    assert record["provenance"]["strategy"] == "wifv" and record["slice"]["bias_compensation"] is False
    assert Plan.model_validate({k: v for k, v in record.items() if k != "slice"}) == plan


def test_sharded_input_gives_sharded_output_with_complete_index(checkpoints, stats_for, tmp_path):
    src = tmp_path / "sharded"
    load(checkpoints["qwen2"]).save_pretrained(src, max_shard_size="400KB")
    for f in checkpoints["qwen2"].glob("tokenizer*"):
        (src / f.name).write_bytes(f.read_bytes())
    assert len(list(src.glob("*.safetensors"))) > 1
    plan = make(checkpoints, stats_for, "qwen2", mlp_ratio=0.5, drop_layers=1)
    out = slice_checkpoint(src, plan, tmp_path / "out", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    ids = input_ids(checkpoints["qwen2"])
    assert max_diff(logits(load(out), ids), logits(masked_reference(checkpoints["qwen2"], plan), ids)) <= TOL


def test_refuses_to_overwrite_input_or_existing_output(checkpoints, stats_for, tmp_path):
    plan = make(checkpoints, stats_for, "qwen3", mlp_ratio=0.25)
    with pytest.raises(SliceError, match="overwrite the input"):
        slice_checkpoint(checkpoints["qwen3"], plan, checkpoints["qwen3"], overwrite=True, progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(SliceError, match="exists"):
        slice_checkpoint(checkpoints["qwen3"], plan, tmp_path / "out", progress=False)


def test_interrupted_run_leaves_no_output_and_no_partial_directory(checkpoints, stats_for, tmp_path, monkeypatch):
    plan = make(checkpoints, stats_for, "qwen3", mlp_ratio=0.25)
    calls = {"n": 0}
    real = slicer.slice_array

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(slicer, "slice_array", dying)
    with pytest.raises(KeyboardInterrupt):
        slice_checkpoint(checkpoints["qwen3"], plan, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_plan_for_another_model_is_refused(checkpoints, stats_for, tmp_path):
    plan = make(checkpoints, stats_for, "qwen3", mlp_ratio=0.25)
    with pytest.raises(ValueError, match="plan is for Qwen3ForCausalLM"):
        slice_checkpoint(checkpoints["llama"], plan, tmp_path / "out", progress=False)
