"""Bookkeeping of ``tokens_cached`` (server/api/prefix.py) over resets, pauses and a resumed
snapshot, against a counter that only grows, as vLLM's does. The counter is a plain function
here; tests/server/test_prefix_caching.py checks the whole path on a real server."""

from __future__ import annotations

from actprune.server.api.prefix import CachedTokens, read_counter


class Counter:
    def __init__(self) -> None:
        self.v: float | None = 0.0

    def __call__(self) -> float | None:
        return self.v


def test_counts_growth_while_capturing_only():
    c = Counter()
    c.v = 100.0  # served before this server's capture window
    t = CachedTokens(True, c)
    assert t.value() == 0
    c.v = 164.0
    assert t.value() == 64
    t.pause()
    t.pause()  # a second pause changes nothing
    c.v = 300.0
    assert t.value() == 64
    t.resume()
    c.v = 316.0
    assert t.value() == 80
    t.resume()  # not paused: nothing
    assert t.value() == 80
    t.reset(paused=False)
    assert t.value() == 0
    c.v = 332.0
    assert t.value() == 16
    t.reset(paused=True)  # a reset while paused stays paused
    c.v = 400.0
    assert t.value() == 0
    t.resume()
    c.v = 410.0
    assert t.value() == 10


def test_carried_from_a_resumed_snapshot_and_unknown_without_a_counter():
    c = Counter()
    t = CachedTokens(True, c)
    t.carry(1000)
    c.v = 5.0
    assert t.value() == 1005
    t.reset(paused=False)
    assert t.value() == 0
    c.v = None  # vLLM keeps no statistics: unknown, never a made-up 0
    assert t.value() is None
    off = CachedTokens(False, c)  # prefix caching off: nothing can be cached
    assert off.value() == 0


def test_reads_a_prometheus_counter_summed_over_engines():
    from prometheus_client import REGISTRY
    from prometheus_client import Counter as PromCounter

    name = "actprune_test:cached_tokens"
    assert read_counter(name) is None
    counter = PromCounter(name, "test", ["engine"])
    try:
        counter.labels("0").inc(7)
        counter.labels("1").inc(5)
        assert read_counter(name) == 12.0
    finally:
        REGISTRY.unregister(counter)
