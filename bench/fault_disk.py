"""Disk full: every writer of actprune on a filesystem with no room left — a small tmpfs when
this process may mount one (root), else children under ``RLIMIT_FSIZE`` (the writes past the
limit fail with EFBIG; CPython ignores SIGXFSZ). Each must fail with a clear error (the CLI: exit
code 2 and one line naming the problem, no traceback; the server: an answer or a log line that
says the disk is full) and keep the last good file, leaving nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from actprune.core.wire.stats import Stats
from fault_kit import (
    Fixtures,
    Tally,
    checkpoint_diff,
    cli,
    kill_group,
    leftovers,
    size_of,
    spawn,
    stats_diff,
    tree_diff,
    wait_for,
)

__all__ = ["disk_full"]

DISK_WORDS = ("No space left", "File too large", "disk is full", "ENOSPC", "EFBIG")


class Medium:
    """Where the outputs go, and how it is made full: a tmpfs of ``mb`` MiB filled to ``leave``
    bytes, or (no mount allowed) a plain directory and children limited to ``leave`` bytes per file."""

    def __init__(self, path: Path, mb: int) -> None:
        self.path, self.limit = path, None
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True)
        self.tmpfs = r.returncode == 0

    def fill(self, leave: int) -> None:
        if not self.tmpfs:
            self.limit = leave
            return
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        with open(self.path / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(0, free - leave))

    def free(self) -> None:
        self.limit = None
        (self.path / "filler").unlink(missing_ok=True)

    def preexec(self):
        if self.limit is None:
            return None
        limit = self.limit
        return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@contextmanager
def medium(path: Path, mb: int):
    m = Medium(path, mb)
    try:
        yield m
    finally:
        m.close()


def _cli_fails_clearly(r: subprocess.CompletedProcess, what: str) -> list[tuple[str, str]]:
    err = r.stderr.strip()
    last = err.splitlines()[-1] if err else ""
    if r.returncode == 0:
        return [("a write to a full disk reports success", f"{what}: exit 0")]
    if "Traceback" in err or r.returncode != 2:
        return [("disk full gives a traceback, not a one-line error",
                 f"{what}: exit {r.returncode}, last line {last[:200]!r}")]
    if not any(w in last for w in DISK_WORDS):
        return [("disk full error does not say so", f"{what}: {last[:200]!r}")]
    return []


def _case_cli(tally: Tally, m: Medium, label: str, argv: list[str], keep: Path, check) -> None:
    """Fill the medium, run ``actprune ARGV``: a clear error, ``keep`` still what ``check``
    accepts, no leftovers; then with room again the same command succeeds."""
    before = size_of(keep)
    m.fill(4096)
    r = cli(argv, preexec_fn=m.preexec())
    problems = _cli_fails_clearly(r, f"actprune {' '.join(argv)}")
    lost = 0
    if (d := check()) is not None:
        problems.append(("the last good file is not kept", f"{label}: {d}"))
        lost = before
    if left := leftovers(m.path):
        problems.append(("a failed write leaves partial files", f"{label}: {[p.name for p in left][:3]}"))
    m.free()
    r = cli(argv)
    if r.returncode:
        problems.append(("fails again once there is room", f"{label}: {r.stderr.strip()[-200:]}"))
    tally.trial(problems, lost, label)


def disk_full(fx: Fixtures, tally: Tally, work: Path, server: bool = True) -> None:
    model, text = fx.small(), fx.text()
    stats_path = fx.stats(model)
    old = Stats.load(stats_path)
    plan_a = fx.plan(model, "a", "--mlp-ratio", "0.25", "--head-ratio", "0.5")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ref = work / "ref-pruned"
    cli(["prune", "--model", str(model), "--plan", str(plan_a), "-o", str(ref)])
    with medium(work / "disk", 256) as m:
        tally.notes.append("a 256 MiB tmpfs, filled to 4 KiB free" if m.tmpfs else "RLIMIT_FSIZE 4 KiB children (no mount)")
        d = m.path
        # 1. the stats file itself (Stats.save, what the server and `stats pull` call)
        shutil.copy(stats_path, d / "stats.safetensors")
        m.fill(4096)
        code = ("import sys; from actprune.core.wire.stats import Stats; s = Stats.load(sys.argv[1]); "
                "s.meta['tokens_prefill'] = 1; s.save(sys.argv[2])")
        r = subprocess.run([sys.executable, "-c", code, str(stats_path), str(d / "stats.safetensors")],
                           capture_output=True, text=True, preexec_fn=m.preexec())
        problems = [] if r.returncode and any(w in r.stderr for w in DISK_WORDS) else [
            ("Stats.save on a full disk does not fail with the disk's error", f"exit {r.returncode}: {r.stderr[-200:]}")]
        kept = stats_diff(d / "stats.safetensors", old)
        problems += [("the last good file is not kept", f"Stats.save: {kept}")] if kept else []
        problems += [("a failed write leaves partial files", str(leftovers(d)))] if leftovers(d) else []
        tally.trial(problems, size_of(stats_path) if kept else 0, "Stats.save")
        m.free()
        # 2. the CLI's outputs, each over a previous good one
        shutil.copy(plan_a, d / "plan.json")
        _case_cli(tally, m, "plan -o", ["plan", "--stats", str(stats_path), "--model", str(model),
                                        "--mlp-ratio", "0.5", "-o", str(d / "plan.json")],
                  d / "plan.json", lambda: None if json.loads((d / "plan.json").read_text()) ==
                  json.loads(plan_a.read_text()) else "plan.json changed")
        _case_cli(tally, m, "record -o", ["record", "--model", str(model), "--data", str(text), "--max-tokens", "500",
                                          "-o", str(d / "stats.safetensors")],
                  d / "stats.safetensors", lambda: stats_diff(d / "stats.safetensors", old))
        shutil.copytree(ref, d / "pruned")
        _case_cli(tally, m, "prune --overwrite", ["prune", "--model", str(model), "--plan", str(fx.plan(model, "b", "--mlp-ratio", "0.5")),
                                                  "-o", str(d / "pruned"), "--overwrite"],
                  d / "pruned", lambda: tree_diff(d / "pruned", ref))
        shutil.rmtree(d / "pruned")
        _finetune_case(tally, m, model, text)
    if server:
        from fault_server import snapshot_disk_full

        with medium(work / "snapdisk", 2) as m:
            if m.tmpfs:
                snapshot_disk_full(fx, tally, m, work)
            else:
                tally.notes.append("server snapshot on a full disk: not run (no mount allowed here)")


def _finetune_case(tally: Tally, m: Medium, model: Path, text: Path) -> None:
    """A checkpoint that does not fit: training stops with a clear error, the previous checkpoint
    stays whole and a resume (with room) continues from it."""
    out = m.path / "ft"
    argv = ["finetune", "--model", str(model), "--data", str(text), "-o", str(out), "--resume", "--max-steps", "4",
            "--save-every", "1", "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "0", "--val-fraction", "0"]
    ck = out / "checkpoints" / "step-000001"
    proc = spawn(argv, m.path.parent / "finetune-first.log")  # killed once checkpoint 1 is whole
    wait_for(lambda: (ck / "state.json").is_file() or proc.poll() is not None, 600, every=0.01)
    kill_group(proc)
    if not (ck / "state.json").is_file():
        tally.fail("campaign setup failed", f"finetune on the tmpfs wrote no checkpoint, see {m.path.parent}/finetune-first.log")
        return
    for p in (out / "checkpoints").iterdir():
        if p.name != ck.name:
            shutil.rmtree(p)
    m.fill(4096)
    t0 = time.monotonic()
    r = cli(argv, preexec_fn=m.preexec())
    problems = _cli_fails_clearly(r, "actprune finetune --save-every 1 (checkpoint 2 on a full disk)")
    lost = 0
    d = checkpoint_diff(ck) if ck.is_dir() else "missing"
    if d or len(list(ck.iterdir())) != 4:
        problems.append(("the last good file is not kept", f"finetune: checkpoint step 1 damaged ({d})"))
        lost = size_of(ck)
    if left := leftovers(out):
        problems.append(("a failed write leaves partial files", f"finetune: {[p.name for p in left][:3]}"))
    m.free()
    r2 = cli(argv)
    if r2.returncode:
        problems.append(("fails again once there is room", f"finetune --resume: {r2.stderr.strip()[-200:]}"))
    tally.trial(problems, lost, f"finetune checkpoint ({time.monotonic() - t0:.0f}s)")
