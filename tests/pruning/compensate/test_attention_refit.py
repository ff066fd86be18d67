"""Attention compensation: the o_proj refit over kept heads is the float64 least-squares fit of
the dense attention output (both GQA modes), a checkpoint written with it equals the in-memory
compensated model, and a compensated checkpoint loads in transformers without a word about
"newly initialized" weights."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from actprune.core.planning.planner import make_plan
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.plan_request import PlanRequest
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from actprune.pruning.compensate import calibrate
from actprune.pruning.compensate.layers import head_channels
from actprune.pruning.fixtures.synthetic import build_checkpoint
from pruning_helpers import SHAPE, VIEW, load, logits, record_stats

torch.set_num_threads(2)


def _rows(vocab: int, n: int, seed: int, t: int = 48) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))  # (N, T)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = build_checkpoint(tmp_path_factory.mktemp("attn") / "llama", arch="llama", **SHAPE)
    return d, record_stats(d), json.loads((d / "config.json").read_text())


def _plan(llama, **request):
    d, stats, cfg = llama
    return make_plan(stats, cfg, PlanRequest(strategy="magnitude", **request), d)


def _o_inputs(model: torch.nn.Module, rows: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's o_proj input over ``rows``: (N*T, heads·D) per layer."""
    hooks, xs = HookRegistry(), {}
    for i, ly in enumerate(model.model.layers):
        hooks.pre_hook("t", VIEW.o_proj(ly),
                       lambda _m, a, i=i: xs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
    logits(model, rows)
    hooks.remove_all()
    return [torch.cat(xs[i]) for i in range(len(xs))]


@pytest.mark.parametrize("head_mode", ["kv_groups", "query_heads"])
def test_attention_refit_is_the_float64_least_squares_fit_of_the_dense_output(llama, head_mode):
    d = llama[0]
    plan = _plan(llama, head_ratio=0.5, head_mode=head_mode)
    model = load(d)
    rows = _rows(model.config.vocab_size, 8, 0)  # 384 tokens > 4 kept heads x 32 channels + 1
    xs = _o_inputs(model, rows)
    heads = {lp.index: (lp.heads_keep, lp.kv_heads_keep) for lp in plan.layers}
    got: dict = {}
    mlp = calibrate.layerwise_refit(load(d), rows, {}, attention=heads, attn_out=got, ridge=0.0, progress=False)
    assert mlp == {} and sorted(got) == [0, 1, 2, 3]
    for i, (w_new, bias) in got.items():
        w = VIEW.o_proj(model.model.layers[i]).weight.detach().double()  # (H, heads·D)
        ch = head_channels(heads[i][0], plan.source.head_dim)
        x = xs[i].double()
        xb = torch.cat([x[:, ch], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)  # (T, K+1)
        theta = torch.linalg.lstsq(xb, x @ w.T).solution  # (K+1, H)
        torch.testing.assert_close(w_new.double(), theta[:-1].T, atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(bias.double(), theta[-1], atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize(("head_mode", "sequential"), [("kv_groups", False), ("query_heads", "local")])
def test_checkpoint_with_attention_and_mlp_refit_equals_the_in_memory_compensated_model(
        llama, tmp_path, head_mode, sequential):
    d = llama[0]
    plan = _plan(llama, head_ratio=0.5, mlp_ratio=0.25, head_mode=head_mode)
    model = load(d, attn_implementation="eager")  # eager reads num_key_value_groups (sdpa infers it)
    rows = _rows(model.config.vocab_size, 4, 1)
    attn: dict = {}
    mlp = calibrate.layerwise_refit(model, rows, {lp.index: lp.mlp_keep for lp in plan.layers},
                                    attention={lp.index: (lp.heads_keep, lp.kv_heads_keep) for lp in plan.layers},
                                    attn_out=attn, sequential=sequential, progress=False)
    out = slice_checkpoint(d, plan, tmp_path / "refit", mlp_refit=mlp, attn_refit=attn, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["actprune_bias"] == {"down_proj": True, "o_proj": True}
    record = json.loads((out / "actprune_plan.json").read_text())["slice"]
    assert record["attn_refit_layers"] == record["mlp_refit_layers"] == [0, 1, 2, 3]
    ids = _rows(model.config.vocab_size, 2, 4)
    sliced = logits(load(out, trust_remote_code=True), ids)
    dense = logits(load(d), ids)
    assert (sliced - logits(model, ids)).abs().max().item() <= 1e-5
    assert (sliced - dense).abs().max().item() > 1e-3  # pruning did change the model


def test_refitted_checkpoint_loads_without_newly_initialized_weights(llama, tmp_path, caplog):
    d = llama[0]
    plan = _plan(llama, head_ratio=0.5, mlp_ratio=0.25)
    model = load(d)
    rows = _rows(model.config.vocab_size, 4, 2)
    # Only layers 1 and 2 are refitted: layers 0 and 3 have no bias of their own to write.
    attn: dict = {}
    mlp = calibrate.layerwise_refit(model, rows, {1: plan.layers[1].mlp_keep}, attn_out=attn, progress=False,
                                    attention={2: (plan.layers[2].heads_keep, plan.layers[2].kv_heads_keep)})
    out = slice_checkpoint(d, plan, tmp_path / "part", mlp_refit=mlp, attn_refit=attn, progress=False)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.INFO):
            sliced = load(out, trust_remote_code=True)
    finally:
        hf_logging.disable_propagation()
    text = caplog.text.lower()
    assert "newly initialized" not in text and "missing" not in text, caplog.text
    for ly in sliced.model.layers:  # the filler biases are zeros, not random initialisation
        assert ly.mlp.down_proj.bias is not None and ly.self_attn.o_proj.bias is not None
    assert float(sliced.model.layers[0].mlp.down_proj.bias.detach().abs().max()) == 0.0
    assert float(sliced.model.layers[3].self_attn.o_proj.bias.detach().abs().max()) == 0.0
