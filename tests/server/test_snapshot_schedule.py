"""The background writer's schedule, on a virtual clock: snapshots start one interval apart
however long collecting and writing one takes (the engine answers RPCs between steps; under
load at a 1 s interval the old schedule, interval *after* each write, left files 4.7 s old)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from actprune.server.api import service
from actprune.server.api.service import METRICS_REFRESH_S, CaptureService

_real_sleep = asyncio.sleep


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await _real_sleep(0)  # let others run, as a real sleep would


def _run_loop(monkeypatch, *, interval: float, write_s: float, until: float) -> tuple[list[float], list[float]]:
    """Start times of snapshot writes and of status refreshes over ``until`` virtual seconds."""
    clock = Clock()
    monkeypatch.setattr(service.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(service.asyncio, "sleep", clock.sleep)
    writes: list[float] = []
    refreshes: list[float] = []

    async def write_snapshot() -> None:
        writes.append(clock.now)
        clock.now += write_s  # the RPC waits for a step, then the file is written
        if clock.now >= until:
            raise asyncio.CancelledError

    async def status() -> None:
        refreshes.append(clock.now)
        clock.now += 0.01
        if clock.now >= until:
            raise asyncio.CancelledError

    fake = SimpleNamespace(settings=SimpleNamespace(snapshot_interval=interval), persisting=interval > 0,
                           write_snapshot=write_snapshot, status=status)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(CaptureService._loop(fake))
    return writes, refreshes


@pytest.mark.parametrize("write_s", [0.05, 0.6, 0.95])
def test_snapshots_start_one_interval_apart_however_long_a_write_takes(monkeypatch, write_s):
    writes, refreshes = _run_loop(monkeypatch, interval=1.0, write_s=write_s, until=30.0)
    gaps = [b - a for a, b in zip(writes, writes[1:], strict=False)]
    assert len(writes) >= 28 and max(gaps) < 1.0 + 0.05, gaps  # the status refresh is the 0.01 s slack
    # the data on disk is never older than one interval plus one write
    assert writes[0] == pytest.approx(1.0)
    assert max(b - a for a, b in zip(refreshes, refreshes[1:], strict=False)) <= METRICS_REFRESH_S + 1.0


def test_a_write_longer_than_the_interval_is_followed_by_the_next_not_a_burst(monkeypatch):
    writes, _ = _run_loop(monkeypatch, interval=1.0, write_s=2.5, until=30.0)
    gaps = [b - a for a, b in zip(writes, writes[1:], strict=False)]
    assert all(2.5 <= g < 2.6 for g in gaps), gaps


def test_without_persistence_only_the_gauges_are_refreshed(monkeypatch):
    writes, refreshes = _run_loop(monkeypatch, interval=0, write_s=0.1, until=60.0)
    assert writes == [] and len(refreshes) >= 10
