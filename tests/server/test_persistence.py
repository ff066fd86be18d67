"""Snapshots on disk: written every interval and on shutdown, resumed at start-up on the same
model, never mixed with another model's; a kill -9 loses at most one interval, a reset is never
undone, and Ctrl-C (SIGINT to the whole process group) loses nothing. Each start gets a new
port, so the tests name the server's identity (ACTPRUNE_INSTANCE_ID) to restart "the same"
server. The same behaviours in-process, fault by fault: ``test_snapshot_files.py``."""

from __future__ import annotations

import os
import signal
import threading
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


def _gone(pgid: int, timeout: float = 120.0) -> None:
    """Wait until every process of the group has exited (the engine may outlive the API server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise TimeoutError(f"process group {pgid} still alive after {timeout:.0f}s")


def test_snapshots_survive_kill_9_and_restart_and_never_mix_models(tiny_qwen3: Path, tmp_path: Path):
    env = {"ACTPRUNE_SNAPSHOT_INTERVAL": "1", "ACTPRUNE_INSTANCE_ID": "persist-test"}
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

    # 2. restart on the same model and directory: resumes from the last snapshot. (A kill -9
    # that lands during a snapshot write leaves its temporary file; the restart removes it.)
    srv = start_server(tiny_qwen3, "eager", tmp_path, env=env)
    try:
        resumed = _tokens(srv.base_url)
        assert first <= resumed <= first + second  # lost at most one interval
        third = _computed(*complete(srv.base_url, "A tour guide explains", 4))
        assert _tokens(srv.base_url) == resumed + third
    finally:
        srv.stop()  # SIGTERM: the final snapshot is written during shutdown
    assert not list(snap_dir.glob(".stats-*"))  # no half-written temporary file left behind
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


def test_stop_loses_nothing_a_reset_survives_kill_9_and_ctrl_c_loses_nothing(tiny_qwen3: Path, tmp_path: Path):
    # No periodic snapshot within the test: only the writes at start, stop, reset and the
    # workers' own shards can carry a token from one start to the next.
    env = {"ACTPRUNE_SNAPSHOT_INTERVAL": "600", "ACTPRUNE_INSTANCE_ID": "ctrl-c-test"}
    log = tmp_path / "server-eager.log"

    # 1. traffic, then a graceful stop (SIGTERM to the API server).
    srv = start_server(tiny_qwen3, "eager", tmp_path, env=env)
    try:
        first = _computed(*complete(srv.base_url, "The old harbour town lies", 6))
    finally:
        srv.stop()

    # 2. all of it is back; a reset (on disk before it answers), more traffic, kill -9.
    srv = start_server(tiny_qwen3, "eager", tmp_path, env=env)
    try:
        assert _tokens(srv.base_url) == first
        r = httpx.post(f"{srv.base_url}/activations/reset", json={}, timeout=60)
        assert r.status_code == 200 and _tokens(srv.base_url) == 0
        complete(srv.base_url, "Visitors walk along the stone walls", 5)  # lost to the kill -9
        srv.kill()
    finally:
        srv.stop()

    # 3. the pre-reset tokens do not come back; traffic, then Ctrl-C with a request in flight.
    srv = start_server(tiny_qwen3, "eager", tmp_path, env=env)
    try:
        assert _tokens(srv.base_url) == 0
        counted, before, most = _ctrl_c_during_traffic(srv)
    finally:
        srv.stop()
    ctrl_c_log = log.read_text(errors="replace")[-6000:]  # the next start writes over the file

    # 4. every token counted before the signal is back, from the workers' own shards.
    srv = start_server(tiny_qwen3, "eager", tmp_path, env=env)
    try:
        resumed = _tokens(srv.base_url)
        assert counted <= before <= resumed <= most, ctrl_c_log
        text = log.read_text(errors="replace")
        assert "from shard-" in text, text[-3000:]
        # folded in once, then removed (a graceful stop, below, lets this run's workers write
        # shards of their own: step 1 -> 2 shows a stop's snapshot and shards are not both counted)
        assert not list((tmp_path / "snapshots").glob("shard-*"))
    finally:
        srv.stop()


def test_ctrl_c_with_two_tensor_parallel_workers_during_traffic_loses_nothing(tiny_qwen3: Path, tmp_path: Path):
    # Worker processes of their own: vLLM raises SystemExit in them wherever they are; the
    # signal waits for the end of the step, so both ranks save the same step boundary.
    env = {"ACTPRUNE_SNAPSHOT_INTERVAL": "600", "ACTPRUNE_INSTANCE_ID": "ctrl-c-tp2"}
    srv = start_server(tiny_qwen3, "compiled-tp2", tmp_path, extra=["--enforce-eager"], env=env)
    try:
        counted, before, most = _ctrl_c_during_traffic(srv)
    finally:
        srv.stop()
    shards = list((tmp_path / "snapshots").glob("shard-*-pp0-tp*.safetensors"))
    assert len(shards) == 2, (tmp_path / "server-compiled-tp2.log").read_text(errors="replace")[-6000:]
    srv = start_server(tiny_qwen3, "compiled-tp2", tmp_path, extra=["--enforce-eager"], env=env)
    try:
        assert counted <= before <= _tokens(srv.base_url) <= most
    finally:
        srv.stop()


def _ctrl_c_during_traffic(srv) -> tuple[int, int, int]:
    """Complete two requests, start a long one, Ctrl-C the whole process group while it runs and
    wait until every process is gone. Returns (tokens of the completed requests, tokens counted
    just before the signal, the most there can be: those plus all of the long request's, which
    may finish — the API server drains requests in flight, and worker processes of their own
    hold the signal until the engine stops)."""
    counted = _computed(*complete(srv.base_url, "A tour guide explains", 4))
    prompt, one = complete(srv.base_url, "Once upon a time", 1)  # the long request's prompt
    counted += _computed(prompt, one) + _computed(*complete(srv.base_url, "The museum opens at nine", 7))
    busy = threading.Thread(target=_quietly, args=(complete, srv.base_url, "Once upon a time", 200))
    busy.start()
    time.sleep(1.0)
    before = _tokens(srv.base_url)
    srv.kill(signal.SIGINT)  # Ctrl-C in a terminal: the API server, the engine and its workers
    _gone(srv.proc.pid)
    busy.join(timeout=60)
    return counted, before, counted + _computed(prompt, [0] * 200)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except httpx.HTTPError:  # the server went away mid-request: expected here
        pass
