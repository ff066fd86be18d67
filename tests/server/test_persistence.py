"""Snapshots on disk: written every interval and on shutdown, resumed at start-up on the same
model, never mixed with another model's; a kill -9 loses at most one interval."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from actprune.core.wire.stats import Stats
from actprune.pruning.fixtures.synthetic import build_checkpoint

from .conftest import start_server
from .test_capture_fidelity import complete

pytestmark = pytest.mark.slow


def _tokens(base: str) -> int:
    st = httpx.get(f"{base}/activations/status", timeout=30).json()
    return st["tokens_prefill"] + st["tokens_decode"]


def _computed(p: list[int], g: list[int]) -> int:
    return len(p) + len(g) - 1


def test_snapshots_survive_kill_9_and_restart_and_never_mix_models(tiny_qwen3: Path, tmp_path: Path):
    env = {"ACTPRUNE_SNAPSHOT_INTERVAL": "1"}
    snap_dir = tmp_path / "snapshots"

    # 1. traffic, let a snapshot land, more traffic, then kill -9 the whole server.
    srv = start_server(tiny_qwen3, "eager", tmp_path, env=env)
    try:
        first = _computed(*complete(srv.base_url, "The old harbour town lies", 6))
        time.sleep(3.5)  # > 2 intervals
        files = list(snap_dir.glob("stats-*.safetensors"))
        assert len(files) == 1
        assert Stats.load(files[0]).tokens == first
        second = _computed(*complete(srv.base_url, "Visitors walk along the stone walls", 5))
        srv.kill()  # SIGKILL: no shutdown hook runs
    finally:
        srv.stop()
    assert not list(snap_dir.glob(".stats-*"))  # no half-written temporary file left behind

    # 2. restart on the same model and directory: resumes from the last snapshot.
    srv = start_server(tiny_qwen3, "eager", tmp_path, env=env)
    try:
        resumed = _tokens(srv.base_url)
        assert first <= resumed <= first + second  # lost at most one interval
        third = _computed(*complete(srv.base_url, "A tour guide explains", 4))
        assert _tokens(srv.base_url) == resumed + third
    finally:
        srv.stop()  # SIGTERM: the final snapshot is written during shutdown
    (path,) = snap_dir.glob("stats-*.safetensors")
    assert Stats.load(path).tokens == resumed + third

    # 3. another model on the same directory: refuses to mix, starts from zero, says so.
    other = build_checkpoint(tmp_path / "other", arch="qwen3", intermediate_size=256)
    srv = start_server(other, "eager", tmp_path, env=env)
    try:
        assert _tokens(srv.base_url) == 0
    finally:
        srv.stop()
    log = (tmp_path / "server-eager.log").read_text(errors="replace")
    assert "not mixing" in log
    assert Stats.load(path).tokens == resumed + third  # the first model's file is untouched
    assert len(list(snap_dir.glob("stats-*.safetensors"))) == 2
