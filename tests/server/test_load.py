"""Consistency under load: 64 concurrent streaming chat requests while another client polls
the stats and resets mid-way; then exact token accounting over a second wave."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from .test_api import AUTH

pytestmark = pytest.mark.slow
N_REQUESTS = 64
TOPICS = ["the castle", "the harbour", "the museum", "the cathedral", "pruning", "the river",
          "Paris", "the market square"]


async def _stream_chat(client: httpx.AsyncClient, model: str, i: int) -> tuple[int, int]:
    """One streaming chat request; returns (prompt_tokens, completion_tokens) from usage."""
    rng = random.Random(i)
    words = " ".join(rng.choice(TOPICS) for _ in range(1 + i % 9))
    body = {
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Tell me about {words}."}],
        "max_tokens": 2 + i % 11, "temperature": 0.0, "ignore_eos": True,
    }
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
    assert usage is not None
    return usage["prompt_tokens"], usage["completion_tokens"]


async def _wave(base: str, poll_and_reset: bool) -> tuple[list[tuple[int, int]], list[int]]:
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        tasks = [asyncio.create_task(_stream_chat(client, model, i)) for i in range(N_REQUESTS)]
        if poll_and_reset:
            # The reset goes out as the N/2-th stream completes (a done-callback, not a check
            # between polls: on a loaded machine the other half can finish within one sleep).
            half, done = asyncio.Event(), [0]

            def count(_task: asyncio.Task) -> None:
                done[0] += 1
                if done[0] == N_REQUESTS // 2:
                    half.set()

            for t in tasks:
                t.add_done_callback(count)

            async def reset_at_half() -> None:
                await half.wait()
                statuses.append((await client.post("/activations/reset", json={})).status_code)

            resetter = asyncio.create_task(reset_at_half())
            while not all(t.done() for t in tasks):
                for path in ("/activations/status", "/activations/stats"):
                    r = await client.get(path, params={"format": "safetensors"} if "stats" in path else None)
                    statuses.append(r.status_code)
                await asyncio.sleep(0.05)
            await asyncio.wait_for(resetter, timeout=600)
        results = await asyncio.gather(*tasks)
    return results, statuses


def test_concurrent_streams_with_polling_and_reset_give_no_errors_and_exact_counts(keyed):
    base = keyed.base_url
    _, statuses = asyncio.run(_wave(base, poll_and_reset=True))
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))

    httpx.post(f"{base}/activations/reset", json={}, headers=AUTH, timeout=30).raise_for_status()
    results, _ = asyncio.run(_wave(base, poll_and_reset=False))
    st = httpx.get(f"{base}/activations/status", headers=AUTH, timeout=30).json()
    # every prompt token, plus every generated token but the last (never fed back);
    # prefix caching is off under capture, so nothing was served from a cache
    assert st["tokens_prefill"] == sum(p for p, _ in results)
    assert st["tokens_decode"] == sum(c - 1 for _, c in results)
    raw = httpx.get(f"{base}/activations/stats", params={"format": "safetensors"}, headers=AUTH, timeout=60)
    from actprune.core.wire.stats import Stats

    stats = Stats.from_bytes(raw.content)
    want = sum(p + c - 1 for p, c in results)
    for i in stats.layers:
        assert float(stats.group(i, "mlp")["count"]) == want
        assert float(stats.tensors[f"layers.{i}.block.count"]) == want
