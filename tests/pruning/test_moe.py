"""Qwen3-MoE offline: the recorder routes as the model does, the registry's sparse-layer rule is
transformers', and what expert pruning does not do yet is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from actprune.client.cli import main
from actprune.core.archs import REGISTRY, model_shape
from actprune.core.config import read_config
from actprune.core.tensor.hf_model import HfModel
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.stats import Stats, config_hash
from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
from actprune.pruning.data import tokenize
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.pruning.record import budget, record
from actprune.pruning.workflow import analyze, pruning_candidates
from pruning_helpers import SENTENCES

SPEC = REGISTRY["Qwen3MoeForCausalLM"]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three layers: sparse, dense (``mlp_only_layers``), sparse; 8 experts, top-2."""
    return build_checkpoint(tmp_path_factory.mktemp("moe") / "qwen3_moe", arch="qwen3_moe",
                            num_hidden_layers=3, mlp_only_layers=[1])


def _routing(logits: np.ndarray, top_k: int, renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(top-k counts, weight sums) per expert of (N, E) logits, as Qwen3MoeTopKRouter routes."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]  # (N, k)
    w = np.take_along_axis(p, top, 1)
    if renormalize:
        w /= w.sum(1, keepdims=True)
    e = logits.shape[1]
    return np.bincount(top.ravel(), minlength=e), np.bincount(top.ravel(), w.ravel(), minlength=e)


def test_recorder_routes_as_the_model_does_with_padding_masked(tiny_moe):
    tok = load_tokenizer(tiny_moe)
    token_lists = budget(tokenize(tok, SENTENCES), 64, None)
    assert len({len(t) for t in token_lists}) > 1  # batches of 4 really are padded
    model, cfg = load_causal_lm(tiny_moe), read_config(tiny_moe)
    stats = record(model, token_lists, model_name="moe", config=cfg, batch_size=4,
                   pad_id=tok.pad_token_id, progress=False)
    view, logits, reg = HfModel.of(model), {}, HookRegistry()
    for i, layer in enumerate(view.layers):  # the router's own logits, one unpadded text at a time
        if (router := view.router(layer)) is not None:
            reg.post_hook("test", router, lambda m, a, out, i=i: logits.setdefault(i, []).append(out[0].double()))
    with torch.no_grad():
        for ids in token_lists:
            model(input_ids=torch.tensor([ids]), use_cache=False)
    reg.remove_all()

    n = sum(len(t) for t in token_lists)
    assert sorted(logits) == [0, 2] and stats.router(1) is None and stats.router(0) is not None
    for i, chunks in logits.items():
        counts, weights = _routing(torch.cat(chunks).numpy(), cfg["num_experts_per_tok"], cfg["norm_topk_prob"])
        got = stats.router(i)
        assert float(got["count"]) == n
        np.testing.assert_array_equal(got["topk_count"], counts)
        np.testing.assert_allclose(got["weight_sum"], weights, rtol=1e-5)
    assert Stats.from_bytes(stats.to_bytes()).router(0)["topk_count"].dtype == np.float64
    assert [a.mlp is None for a in analyze(stats)] == [True, False, True]


def test_the_registry_names_the_sparse_layers_transformers_builds(tiny_moe):
    model, cfg = load_causal_lm(tiny_moe), read_config(tiny_moe)
    view = HfModel.of(model)
    assert [view.router(ly) is not None for ly in view.layers] == SPEC.moe.sparse_layers(cfg) == [True, False, True]
    # transformers 5 writes num_local_experts; a released checkpoint and vLLM say num_experts
    assert "num_local_experts" in cfg and SPEC.moe.routing(cfg) == (8, 2, True)
    released = {("num_experts" if k == "num_local_experts" else k): v for k, v in cfg.items()}
    assert config_hash(released) == config_hash(cfg) == config_hash(model.config.to_dict())
    assert config_hash(dict(cfg, num_local_experts=16)) != config_hash(cfg)
    assert SPEC.moe.sparse_layers(dict(cfg, mlp_only_layers=[], decoder_sparse_step=2)) == [False, True, False]


def test_what_moe_pruning_does_not_do_yet_is_refused_in_one_line(tiny_moe, tiny, tmp_path, capsys):
    """Expert plans and slices are tests/pruning/test_moe_prune.py; here what stays refused: the
    dense-model workflows (candidates, refit) and a dense model's plan applied to an MoE model."""
    tok = load_tokenizer(tiny_moe)
    stats = record(load_causal_lm(tiny_moe), budget(tokenize(tok, SENTENCES[:2]), 16, None), model_name="moe",
                   config=read_config(tiny_moe), progress=False)
    assert model_shape(read_config(tiny_moe)).layers[0].num_experts == 8
    with pytest.raises(ValueError, match="mixture-of-experts"):
        pruning_candidates(stats, 0.25, "magnitude")

    dense_stats = record(load_causal_lm(tiny), budget(tokenize(load_tokenizer(tiny), SENTENCES[:2]), 16, None),
                         model_name="dense", config=read_config(tiny), progress=False).save(tmp_path / "d.st")
    assert main(["plan", "--stats", str(dense_stats), "--model", str(tiny), "--mlp-ratio", "0.25",
                 "-o", str(tmp_path / "plan.json")]) == 0
    capsys.readouterr()
    rc = main(["prune", "--model", str(tiny_moe), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "make a plan for this model" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()

    stats_file = stats.save(tmp_path / "moe.safetensors")
    assert main(["plan", "--stats", str(stats_file), "--model", str(tiny_moe), "--expert-ratio", "0.5",
                 "-o", str(tmp_path / "moe-plan.json")]) == 0
    capsys.readouterr()
    rc = main(["prune", "--model", str(tiny_moe), "--plan", str(tmp_path / "moe-plan.json"), "-o",
               str(tmp_path / "out"), "--refit", "wiki:calibration"])
    err = capsys.readouterr().err
    assert rc == 2 and "mixture-of-experts" in err and len(err.strip().splitlines()) == 1, err
