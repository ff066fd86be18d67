"""``actprune serve`` on pruned checkpoints: greedy
tokens equal transformers' and logprobs agree to 1e-3 in fp32, for the stock architecture
(uniform widths) and the actprune architecture (per-layer MLP widths, per-layer query and KV
heads, a dropped layer, FLAP biases; Qwen3, Qwen2 and Llama bases), and capture works on a
pruned model.

One server per checkpoint (each start costs 30-90 s on a shared CPU), reused across tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from actprune.client.http import Client
from actprune.core.planning.planner import make_plan
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import config_hash
from actprune.server.process import ServerProcess
from serving import PROMPTS, complete, hf_greedy, load_hf, serve, tokenize

pytestmark = pytest.mark.slow

LOGPROB_TOL = 1e-3
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server_for(pruned, tmp_path_factory) -> Iterator[Callable[..., ServerProcess]]:
    """``server_for(variant, compiled=False)``: a started server on that pruned checkpoint.
    Tests of one variant are adjacent, so only the latest server is kept running."""
    current: dict[str, ServerProcess] = {}

    def get(name: str, compiled: bool = False) -> ServerProcess:
        if name not in current:
            for srv in current.values():
                srv.stop()
            current.clear()
            log = tmp_path_factory.mktemp(f"srv-{name}") / "server.log"
            current[name] = serve(pruned[name][0], log, compiled=compiled).start()
        return current[name]

    yield get
    for srv in current.values():
        srv.stop()


def assert_matches_transformers(srv: ServerProcess, ckpt: Path) -> None:
    hf = load_hf(ckpt)
    for prompt in tokenize(ckpt, PROMPTS):
        got_ids, got_lp = complete(srv, prompt, MAX_TOKENS)
        want_ids, want_lp = hf_greedy(hf, prompt, MAX_TOKENS)
        assert got_ids == want_ids, f"prompt {prompt}: server {got_ids}, transformers {want_ids}"
        worst = max(abs(a - b) for a, b in zip(got_lp, want_lp, strict=True))
        assert worst <= LOGPROB_TOL, f"prompt {prompt}: max |Δlogprob| {worst:.2e}"


def architecture(ckpt: Path) -> str:
    return json.loads((ckpt / "config.json").read_text())["architectures"][0]


def test_uniform_pruned_stock_checkpoint_serves_transformers_greedy_tokens(pruned, server_for):
    ckpt, plan = pruned["uniform"]
    assert plan.uniform and architecture(ckpt) == "Qwen3ForCausalLM"
    assert_matches_transformers(server_for("uniform"), ckpt)


def test_per_layer_widths_and_kv_heads_serve_transformers_greedy_tokens(pruned, server_for):
    ckpt, plan = pruned["per_layer"]
    assert architecture(ckpt) == "ActpruneForCausalLM"
    assert len({w.intermediate_size for w in plan.widths}) > 1
    assert len({w.num_key_value_heads for w in plan.widths}) > 1  # per-layer KV cache shapes
    assert plan.dropped_layers
    assert_matches_transformers(server_for("per_layer"), ckpt)


def test_capture_on_pruned_model_reports_the_plan_widths_and_replans(pruned, server_for):
    ckpt, plan = pruned["per_layer"]
    srv = server_for("per_layer")
    for prompt in tokenize(ckpt, PROMPTS):
        complete(srv, prompt, 4)
    with Client(srv.base_url) as client:
        stats = client.stats()  # GET /activations/stats?format=safetensors, validated
    d = plan.source.head_dim
    assert stats.layers == list(range(len(plan.widths)))
    for i, w in enumerate(plan.widths):
        assert stats.tensors[f"layers.{i}.mlp.mean"].shape == (w.intermediate_size,)
        assert stats.tensors[f"layers.{i}.attn.mean"].shape == (w.num_attention_heads * d,)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert stats.meta["config_hash"] == config_hash(cfg)
    # The loop closes: stats captured on the pruned model plan its next pruning step.
    again = make_plan(stats, cfg, PlanRequest(mlp_ratio=0.25, per_layer=True), ColumnNorms.of(ckpt))
    assert again.params_after < again.params_before


def test_bias_compensated_checkpoint_compiled_serves_transformers_greedy_tokens(pruned, server_for):
    ckpt, plan = pruned["per_layer_bias"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["actprune_bias"] == {"down_proj": True, "o_proj": True}
    assert len({w.num_attention_heads for w in plan.widths}) > 1
    assert_matches_transformers(server_for("per_layer_bias", compiled=True), ckpt)


@pytest.mark.parametrize("variant", ["qwen2_per_layer_bias", "llama_per_layer_bias"])
def test_qwen2_and_llama_bases_with_per_layer_heads_and_biases_serve_transformers_greedy_tokens(
    pruned, server_for, variant
):
    ckpt, plan = pruned[variant]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["ActpruneForCausalLM"] and cfg["actprune_bias"]["o_proj"]
    assert len({w.num_key_value_heads for w in plan.widths}) > 1
    assert_matches_transformers(server_for(variant), ckpt)
