"""Snapshots on disk, in-process: the real service, worker RPCs, capture and files over the fake
engine (:mod:`fake_engine`), so every fault is placed exactly where it hurts.

A "server" here is a fake engine (fresh accumulators, like a new process) plus a service with
persistence on. A kill -9 is the service dropped without any shutdown (its lock released, as the
kernel does); an engine stop (Ctrl-C: SIGINT to the process group) is every worker's
``shutdown``, as vLLM calls it, without the API server's final snapshot. The same behaviours on
a real vLLM server: ``test_persistence.py`` (slow).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from actprune.core.wire.stats import Stats, StatsFormatError, config_hash
from actprune.server import ops
from actprune.server import worker as worker_mod
from actprune.server.api.service import CaptureService
from actprune.server.settings import Settings
from actprune.server.store import SnapshotInUse, check_fits
from fake_engine import FakeEngineClient, actprune_app, config_for
from fastapi import FastAPI
from raw_samples import RawLayer, assert_stats_match, concat, random_raw, stats_from_raw


@pytest.fixture(autouse=True)
def _own_signal_handlers() -> Iterator[None]:
    """The worker RPCs wrap this process's SIGINT/SIGTERM handlers (and set a SIGALRM one), as
    in a vLLM worker: undo."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class Server:
    """One start of a server: a fresh engine, the service, and its routes."""

    def __init__(self, raw: list[RawLayer], directory: Path, instance: str = "pod-a", tp: int = 1,
                 stash_mib: int = 256) -> None:
        self.engine = FakeEngineClient(config_for(raw), tp_size=tp, stash_mib=stash_mib)
        settings = Settings(snapshot_dir=directory, snapshot_interval=60, instance_id=instance)
        self.app: FastAPI = actprune_app(self.engine, snapshot_dir=directory, settings=settings)
        self.svc: CaptureService = self.app.state.actprune

    def start(self) -> Server:
        asyncio.run(self.svc.resume_from_disk())
        return self

    def post(self, action: str) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://vllm") as c:
                return await c.post(f"/activations/{action}", json={})

        return asyncio.run(go())

    def tokens(self) -> int:
        return asyncio.run(self.svc.status()).tokens

    def stats(self) -> Stats:
        return asyncio.run(self.svc.snapshot())

    def snapshot(self) -> None:  # the periodic writer's turn
        asyncio.run(self.svc.write_snapshot())

    def kill_9(self) -> None:
        self.svc.close()

    def engine_stops(self) -> None:
        """Ctrl-C: the engine stops first, every worker shuts down; the API's last RPC never lands."""
        for rank in self.engine.ranks:
            rank.worker.shutdown()
        self.svc.close()


def _reference(engine: FakeEngineClient, raw: list[RawLayer]) -> Stats:
    return stats_from_raw(raw, model=engine.served_model_name, config_hash=config_hash(engine.config))


def _on_disk(server: Server) -> Stats:
    return Stats.load(server.svc.snapshot_path)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---- finding 3: stopping, resets and pauses ---------------------------------------------------
def test_reset_is_on_disk_before_the_route_answers_and_survives_kill_9(raw_a, raw_b, tmp_path):
    a = Server(raw_a, tmp_path).start()
    a.engine.feed(raw_a)
    a.snapshot()
    assert _on_disk(a).tokens == 300
    assert a.post("reset").status_code == 200
    assert _on_disk(a).tokens == 0  # read right after the answer: the reset is durable
    a.engine.feed(raw_b)  # after the last snapshot: may be lost by a kill -9
    a.kill_9()
    b = Server(raw_a, tmp_path).start()
    assert b.tokens() == 0  # the 300 pre-reset tokens never come back


def test_pause_is_durable_and_outlives_a_restart(raw_a, raw_b, tmp_path):
    a = Server(raw_a, tmp_path).start()
    a.engine.feed(raw_a)
    assert a.post("pause").json()["status"]["paused"]
    assert _on_disk(a).meta["paused"] is True and _on_disk(a).tokens == 300
    a.kill_9()
    b = Server(raw_a, tmp_path).start()
    assert asyncio.run(b.svc.status()).paused and b.tokens() == 300
    b.engine.feed(raw_b)  # paused: not counted
    assert b.tokens() == 300
    assert b.post("resume").status_code == 200 and _on_disk(b).meta["paused"] is False
    b.kill_9()
    assert not asyncio.run(Server(raw_a, tmp_path).start().svc.status()).paused


@pytest.mark.parametrize("tp", [1, 2])
def test_workers_save_their_shards_when_the_engine_stops_and_nothing_is_lost(raw_a, raw_b, tmp_path, tp):
    a = Server(raw_a, tmp_path, tp=tp).start()
    a.engine.feed(raw_a)
    a.snapshot()
    a.engine.feed(raw_b)  # in no snapshot: only the workers' own shards hold it
    a.engine_stops()
    shards = sorted(p.name for p in tmp_path.glob("shard-*"))
    assert len(shards) == tp
    b = Server(raw_a, tmp_path, tp=tp).start()
    want = _reference(b.engine, concat(raw_a, raw_b))
    assert_stats_match(b.stats(), want)
    assert b.tokens() == 470
    assert not list(tmp_path.glob("shard-*"))  # spent: the snapshot holds them now
    assert_stats_match(_on_disk(b), want)


def test_shards_are_folded_in_exactly_once_however_start_up_is_interrupted(raw_a, raw_b, tmp_path):
    a = Server(raw_a, tmp_path, tp=2).start()
    a.engine.feed(raw_a)
    a.engine.feed(raw_b)
    a.engine_stops()
    shards = {p: p.read_bytes() for p in tmp_path.glob("shard-*")}
    b = Server(raw_a, tmp_path, tp=2).start()
    b.engine.feed(raw_a)
    b.snapshot()
    b.kill_9()
    for p, data in shards.items():  # as if b had been killed before it removed them
        p.write_bytes(data)
    c = Server(raw_a, tmp_path, tp=2).start()
    assert c.tokens() == 770  # b's newer snapshot wins over the old shards; nothing is added twice
    assert_stats_match(c.stats(), _reference(c.engine, concat(raw_a, raw_b, raw_a)))
    assert not list(tmp_path.glob("shard-*"))


class _PeerGone(RuntimeError):  # a collective failing because the other rank has exited
    pass


def _next_step_alone(server: Server, rank: int, raw: list[RawLayer]) -> None:
    """Rank ``rank`` runs the next step alone and it fails: the other rank stopped between
    steps (a second signal, or a worker whose first signal was not held) and this rank's next
    collective raises (torch.distributed's backends do when a peer is gone; vLLM's CPU
    all-reduce would spin instead, which is why workers hold the first signal)."""
    everyone = server.engine.ranks
    server.engine.ranks = [everyone[rank]]
    try:
        with pytest.raises(_PeerGone):
            server.engine.feed(raw)
    finally:
        server.engine.ranks = everyone


def _peer_gone(*args: Any, **kwargs: Any) -> Any:
    raise _PeerGone("connection closed by peer")


@pytest.mark.parametrize("torn", [0, 1])
def test_a_step_cut_short_before_its_fold_is_taken_back_so_every_rank_saves_the_same_boundary(
        raw_a, raw_b, tmp_path, torn):
    a = Server(raw_a, tmp_path, tp=2).start()
    a.engine.feed(raw_a)  # in no snapshot: only the shards can bring it back
    # layer 0 stashed the step's rows, layer 1's row-parallel all-reduce fails
    a.engine.ranks[torn].model.model.layers[1].mlp.down_proj.forward = _peer_gone
    _next_step_alone(a, torn, raw_b)
    a.engine_stops()
    assert len(list(tmp_path.glob("shard-*"))) == 2
    b = Server(raw_a, tmp_path, tp=2).start()
    assert b.tokens() == 300  # the cut step's tokens taken back on the rank that ran it
    assert_stats_match(b.stats(), _reference(b.engine, raw_a))


@pytest.mark.parametrize("where", ["long step", "end-of-step fold"])
def test_a_step_cut_short_while_folding_saves_nothing_and_the_last_snapshot_stands(
        raw_a, raw_b, tmp_path, monkeypatch, where):
    a = Server(raw_a, tmp_path, tp=2, stash_mib=256 if where == "end-of-step fold" else 0).start()
    a.engine.feed(raw_a)
    a.snapshot()
    if where == "long step":  # no step buffers: layer 0 folded its taps, layer 1 fails
        a.engine.ranks[0].model.model.layers[1].mlp.down_proj.forward = _peer_gone
    else:  # the fold of the step's rows stops after its first chunk
        fold = ops._fold_rows

        def first_chunk_only(n: int, *args: Any) -> None:
            fold(min(n, ops.FOLD_ROWS), *args)
            raise _PeerGone("stopped while folding")

        monkeypatch.setattr(ops, "_fold_rows", first_chunk_only)
    _next_step_alone(a, 0, raw_b)
    monkeypatch.undo()
    a.engine_stops()
    assert [p.name.rsplit("-", 1)[1] for p in tmp_path.glob("shard-*")] == ["tp1.safetensors"]  # not rank 0
    b = Server(raw_a, tmp_path, tp=2).start()  # an incomplete set of shards: set aside
    assert_stats_match(b.stats(), _reference(b.engine, raw_a))


class Stopped(BaseException):  # what a vLLM process's handler raises (SystemExit)
    pass


def _stop(signum: int, frame: Any) -> None:
    raise Stopped


def _signal_in_first_step(server: Server) -> None:
    """Ctrl-C lands in the middle of the next step (in layer 1)."""
    layer = server.engine.ranks[0].model.model.layers[1]
    forward, fired = layer.forward, []

    def signalled(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return forward(*args, **kwargs)

    layer.forward = signalled


def test_a_signal_inside_a_step_stops_the_worker_when_the_step_ends_so_its_shard_is_whole(raw_a, tmp_path):
    signal.signal(signal.SIGINT, _stop)  # the engine process's handler (TP = 1: the worker runs there)
    a = Server(raw_a, tmp_path).start()  # the worker wraps the handler it finds
    _signal_in_first_step(a)
    with pytest.raises(Stopped):
        a.engine.feed(raw_a)
    a.engine_stops()
    assert len(list(tmp_path.glob("shard-*"))) == 1  # the step finished, then the worker stopped
    b = Server(raw_a, tmp_path).start()
    counts = {float(t) for n, t in b.stats().tensors.items() if n.endswith(".count")}
    assert len(counts) == 1 and 0 < b.tokens() == counts.pop() < 300  # one whole step, every layer


def _vllm_worker_process_handler(signum: int, frame: Any) -> None:
    raise Stopped


# the name vLLM's multiprocessing executor gives the handler of a worker process of its own
_vllm_worker_process_handler.__qualname__ = "WorkerProc.worker_main.<locals>.signal_handler"


def test_a_worker_process_of_its_own_holds_ctrl_c_until_the_engine_stops_it_between_steps(raw_a, raw_b, tmp_path):
    signal.signal(signal.SIGINT, _vllm_worker_process_handler)
    a = Server(raw_a, tmp_path).start()
    _signal_in_first_step(a)
    a.engine.feed(raw_a)  # held: no step, and no rank, stops on its own
    a.engine.feed(raw_b)  # (the engine keeps sending work until it stops)
    a.engine_stops()  # the engine closes its queues: the worker leaves between steps, saving
    b = Server(raw_a, tmp_path).start()
    assert b.tokens() == 470
    assert_stats_match(b.stats(), _reference(b.engine, concat(raw_a, raw_b)))


def test_a_held_signal_gives_way_to_a_second_one_or_to_time(raw_a, tmp_path, monkeypatch):
    signal.signal(signal.SIGINT, _vllm_worker_process_handler)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # pytest-timeout's: a worker leaves others' timers alone
    Server(raw_a, tmp_path).start()  # the worker wraps the handler it finds
    os.kill(os.getpid(), signal.SIGINT)  # held
    with pytest.raises(Stopped):
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C (or the engine's SIGTERM): at once
    monkeypatch.setattr(worker_mod, "HOLD_S", 0.2)
    os.kill(os.getpid(), signal.SIGINT)  # held again, and no engine comes to stop the worker
    with pytest.raises(Stopped):
        time.sleep(5)


# ---- finding 2: instance identity -------------------------------------------------------------
def test_two_servers_of_one_model_in_one_directory_keep_their_own_counts(raw_a, raw_b, tmp_path):
    a, b = Server(raw_a, tmp_path, "pod-a").start(), Server(raw_a, tmp_path, "pod-b").start()
    a.engine.feed(raw_a)
    b.engine.feed(raw_b)
    a.snapshot()
    b.snapshot()
    assert a.svc.snapshot_path != b.svc.snapshot_path
    assert (_on_disk(a).meta["instance_id"], _on_disk(b).meta["instance_id"]) == ("pod-a", "pod-b")
    window = asyncio.run(a.svc.status()).window_start
    a.kill_9()
    b.kill_9()
    a, b = Server(raw_a, tmp_path, "pod-a").start(), Server(raw_a, tmp_path, "pod-b").start()
    assert (a.tokens(), b.tokens()) == (300, 170)  # each resumes its own, never the other's
    assert asyncio.run(a.svc.status()).window_start == window  # the counts reach back that far
    assert asyncio.run(a.svc.status()).instance_id == "pod-a"


def test_a_second_live_server_with_the_same_identity_is_refused_before_touching_anything(raw_a, tmp_path):
    a = Server(raw_a, tmp_path).start()
    a.engine.feed(raw_a)
    a.snapshot()
    b = Server(raw_a, tmp_path)
    with pytest.raises(SnapshotInUse, match="--instance-id") as e:
        b.start()
    assert "pod-a" in str(e.value) and "pid" in str(e.value)
    assert "actprune_load" not in b.engine.methods and _on_disk(a).tokens == 300
    a.kill_9()  # the lock goes with the process
    assert Server(raw_a, tmp_path).start().tokens() == 300


def test_a_snapshot_from_before_identities_is_adopted_by_one_instance_only(raw_a, tmp_path):
    engine = FakeEngineClient(config_for(raw_a))
    legacy = tmp_path / f"stats-{config_hash(engine.config)}.safetensors"
    _reference(engine, raw_a).save(legacy)
    a = Server(raw_a, tmp_path, "pod-a").start()
    b = Server(raw_a, tmp_path, "pod-b").start()
    assert (a.tokens(), b.tokens()) == (300, 0) and not legacy.exists()


# ---- finding 4: a bad snapshot at start -------------------------------------------------------
def _plant(tmp_path: Path, raw: list[RawLayer], data: bytes) -> Path:
    path = Server(raw, tmp_path).svc.snapshot_path  # (not started: takes no lock)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _aside(tmp_path: Path, reason: str) -> list[Path]:
    return sorted(tmp_path.glob(f"*.safetensors.{reason}-*"))


def test_an_unreadable_snapshot_is_moved_aside_not_overwritten(raw_a, tmp_path):
    path = _plant(tmp_path, raw_a, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    s = Server(raw_a, tmp_path).start()
    assert s.tokens() == 0
    (aside,) = _aside(tmp_path, "corrupt")
    assert aside.read_bytes() == b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"  # kept, byte for byte
    assert Stats.load(path).tokens == 0  # the server writes its own file beside it


def test_a_snapshot_of_a_newer_format_is_kept_aside_untouched(raw_a, tmp_path):
    engine = FakeEngineClient(config_for(raw_a))
    newer = _reference(engine, raw_a)
    newer.meta["format_version"] = 99
    data = newer.to_bytes()
    _plant(tmp_path, raw_a, data)
    s = Server(raw_a, tmp_path).start()
    assert s.tokens() == 0 and "actprune_load" not in s.engine.methods
    (aside,) = _aside(tmp_path, "newer")
    assert aside.read_bytes() == data


def test_a_snapshot_of_other_widths_is_refused_before_any_rank_changes(raw_a, tmp_path):
    other = random_raw(np.random.default_rng(3), tokens=50, mlp=40)  # same layers, other MLP width
    engine = FakeEngineClient(config_for(raw_a))
    bad = stats_from_raw(other, model=engine.served_model_name, config_hash=config_hash(engine.config))
    _plant(tmp_path, raw_a, bad.to_bytes())
    s = Server(raw_a, tmp_path, tp=2).start()
    assert s.tokens() == 0 and "actprune_load" not in s.engine.methods
    assert len(_aside(tmp_path, "corrupt")) == 1


def test_a_model_without_a_readable_shape_is_checked_by_hash_and_layers_and_the_rest_by_the_workers(raw_a):
    engine = FakeEngineClient(config_for(raw_a))
    stats = _reference(engine, raw_a)
    meta = {"config_hash": stats.meta["config_hash"], "num_layers": len(raw_a)}
    moe = {**config_for(raw_a), "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}
    check_fits(stats, meta, moe)  # no expert keys: model_shape cannot read it; not an error here
    with pytest.raises(StatsFormatError, match="holds layers"):
        check_fits(stats, dict(meta, num_layers=len(raw_a) + 1), moe)
    # with its expert keys, every layer is sparse: it needs a router group of E experts, not an MLP
    moe.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    with pytest.raises(StatsFormatError, match="layer 0 router has no channels, the model has 4"):
        check_fits(stats, meta, moe)


def test_an_moe_snapshot_must_hold_a_router_group_of_the_models_expert_count(tmp_path):
    from actprune.core.config import read_config
    from actprune.pruning.checkpoint.hf_io import load_causal_lm
    from actprune.pruning.fixtures.synthetic import build_checkpoint
    from actprune.pruning.record import record

    ckpt = build_checkpoint(tmp_path / "moe", arch="qwen3_moe", num_hidden_layers=2, mlp_only_layers=[1])
    cfg = read_config(ckpt)
    stats = record(load_causal_lm(ckpt), [[5, 6, 7, 8]], model_name="moe", config=cfg, progress=False)
    meta = {"config_hash": stats.meta["config_hash"], "num_layers": 2}
    check_fits(stats, meta, cfg)  # sparse layer 0: 8 experts; dense layer 1: its MLP
    with pytest.raises(StatsFormatError, match="layer 0 router has 8 channels, the model has 6"):
        check_fits(stats, meta, dict(cfg, num_local_experts=6))  # e.g. the pruned model's


def test_when_one_rank_refuses_a_snapshot_every_rank_goes_back_to_zero(raw_a, tmp_path, monkeypatch):
    engine = FakeEngineClient(config_for(raw_a))
    _plant(tmp_path, raw_a, _reference(engine, raw_a).to_bytes())
    s = Server(raw_a, tmp_path, tp=2)

    def refuse(data: bytes) -> None:
        raise ValueError("rank 1 says no")

    monkeypatch.setattr(s.engine.ranks[1].capture, "load", refuse)  # rank 0 loads, then rank 1 fails
    s.start()
    assert s.tokens() == 0 and all(float(r.capture.groups["layers.0.mlp"]["count"]) == 0 for r in s.engine.ranks)
    assert len(_aside(tmp_path, "corrupt")) == 1


def test_capture_load_checks_the_whole_file_before_touching_an_accumulator(raw_a):
    engine = FakeEngineClient(config_for(raw_a))
    engine.feed(raw_a)
    cap = engine.ranks[0].capture
    good = _reference(engine, raw_a)
    last = max(good.layers)
    bad = Stats(tensors=dict(good.tensors), meta=dict(good.meta))
    bad.tensors[f"layers.{last}.block.cos_sum"] = np.zeros(2)  # only the very last group is wrong
    before = cap.snapshot()
    with pytest.raises(ValueError, match=f"layers.{last}.block.cos_sum"):
        cap.load(bad.to_bytes())
    after = cap.snapshot()
    from safetensors.numpy import load

    for name, t in load(before).items():
        np.testing.assert_array_equal(load(after)[name], t, err_msg=name)


# ---- finding 10: what a kill leaves ----------------------------------------------------------
def test_temporary_files_a_kill_left_are_removed_at_start_and_other_instances_kept(raw_a, tmp_path):
    stem = f"{config_hash(config_for(raw_a))}"
    ours = [f".stats-{stem}-pod-a.safetensors.ab12cd34", f".shard-{stem}-pod-a-pp0-tp0.safetensors.x_y1z2w3"]
    theirs = [f".stats-{stem}-pod-b.safetensors.ab12cd34", f".stats-{stem}-pod-a.safetensors.keep"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"half")
    Server(raw_a, tmp_path).start()
    assert [n for n in _names(tmp_path) if n.startswith(".")] == sorted(theirs)


def test_a_reset_that_cannot_be_saved_answers_503_saying_so(raw_a, tmp_path, monkeypatch):
    a = Server(raw_a, tmp_path).start()
    a.engine.feed(raw_a)

    async def disk_full(*_a: Any, **_k: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(a.svc, "_write", disk_full)
    r = a.post("reset")
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "could not be saved" in r.json()["detail"] and "No space left" in r.json()["detail"]


def test_the_held_handler_is_the_one_vllms_worker_processes_install():
    # The hold keys on the qualified name of vLLM's handler: a vLLM that renamed it would
    # silently fall back to stopping each rank at its own step end.
    import inspect

    from vllm.v1.executor.multiproc_executor import WorkerProc

    source = inspect.getsource(WorkerProc.worker_main)
    assert WorkerProc.worker_main.__qualname__ == worker_mod.VLLM_WORKER_HANDLER
    assert "def signal_handler(" in source and "signal.signal(signal.SIGINT, signal_handler)" in source
