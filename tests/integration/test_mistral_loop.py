"""Mistral end to end — the family added through the architecture registry alone
(``core/archs/mistral.py``): capture on a real ``actprune serve`` whose statistics equal the
offline recorder's on the same tokens, a plan from those statistics, a per-layer slice with
biases (the actprune architecture on a Mistral base) that the server reloads with
transformers' greedy tokens, and capture again on the pruned model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from actprune.client.http import Client
from actprune.core.planning.planner import make_plan
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.wire.plan_request import PlanRequest
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.pruning.record import record
from serving import PROMPTS, SOURCE_SHAPE, complete, hf_greedy, load_hf, serve, tokenize

pytestmark = pytest.mark.slow


def test_mistral_capture_plan_slice_and_reload(tmp_path):
    src = build_checkpoint(tmp_path / "mistral", arch="mistral", seed=11, **SOURCE_SHAPE)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"]
    prompts = tokenize(src, PROMPTS)

    with serve(src, tmp_path / "src.log") as srv:
        with Client(srv.base_url) as client:
            client.reset()
            for p in prompts:
                complete(srv, p, 1)  # one token: the prompt is all prefill, as the recorder sees it
            served = client.stats()
    # max_tokens=1 still runs one decode-free step per prompt: the server saw exactly the prompts.
    offline = record(load_hf(src), prompts, model_name=str(src), config=cfg, batch_size=1, progress=False)
    assert served.tokens == offline.tokens == sum(map(len, prompts))
    for i in offline.layers:
        for kind in ("mlp", "attn"):
            got, want = served.figures(i, kind), offline.figures(i, kind)
            np.testing.assert_allclose(got.mean, want.mean, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got.var, want.var, rtol=1e-3, atol=1e-5)

    request = PlanRequest(strategy="wifv", mlp_ratio=0.4, head_ratio=0.5, per_layer=True, width_multiple=8)
    plan = make_plan(served, cfg, request, ColumnNorms.of(src))
    ckpt = slice_checkpoint(src, plan, tmp_path / "pruned", stats=served, progress=False)
    out_cfg = json.loads((ckpt / "config.json").read_text())
    assert out_cfg["architectures"] == ["ActpruneForCausalLM"]
    assert out_cfg["actprune_base_architecture"] == "MistralForCausalLM"
    assert len({w.intermediate_size for w in plan.widths}) > 1  # per-layer widths
    assert sum(w.num_key_value_heads for w in plan.widths) < sum(w.num_key_value_heads for w in plan.source.widths)

    hf = load_hf(ckpt)
    with serve(ckpt, tmp_path / "pruned.log") as srv:
        for p in tokenize(ckpt, PROMPTS):
            got_ids, _ = complete(srv, p, 8)
            want_ids, _ = hf_greedy(hf, p, 8)
            assert got_ids == want_ids, f"prompt {p}: server {got_ids}, transformers {want_ids}"
        with Client(srv.base_url) as client:
            again = client.stats()
    assert [again.figures(i, "mlp").mean.shape[0] for i in again.layers] == [w.intermediate_size for w in plan.widths]
