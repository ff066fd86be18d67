"""What every part of bench/faults.py shares: the tally of a campaign, the fixtures (tiny
checkpoints, text, stats, plans, built once under the work directory), running and killing the
real ``actprune`` CLI, and the "complete version" checks, made with the real readers
(``Stats.load``, ``Plan.load``, ``safetensors.safe_open``, ``json``) against reference outputs.

No torch here: the bench process compares files with safetensors' numpy reader; the CLI runs in
child processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from actprune.core.files import RETIRED_MARK, STAGING_MARK

__all__ = ["ACTPRUNE", "Fixtures", "Tally", "checkpoint_diff", "cli", "file_diff", "kill_group",
           "leftovers", "scrub", "size_of", "spawn", "stats_diff", "tree_diff", "wait_for"]

ACTPRUNE = str(Path(sys.executable).parent / "actprune")
# A temporary file of core.files.atomic_write: ``.NAME.xxxxxxxx`` (mkstemp's 8 characters)
_ATOMIC_TMP = re.compile(r"\..+\.[a-z0-9_]{8}")
SENTENCES = [
    "The old harbour town lies at the mouth of the river, where fishing boats return at dawn.",
    "Visitors walk along the stone walls, past the cathedral and the market square.",
    "Pruning removes neurons, attention heads or whole layers to make a model smaller.",
    "The museum opens at nine in the morning and closes at six in the evening.",
    "Rivers, mountains and forests cover most of the northern province.",
    "Please book a table for two at the restaurant near the bridge.",
]


@dataclass
class Tally:
    """One campaign's figures: trials (faults injected), the ones every check passed, inputs
    tried, bytes of a previous complete version lost, and what failed: ``kind -> details``
    (each detail says how to reproduce)."""

    name: str
    trials: int = 0
    survived: int = 0
    inputs: int = 0
    bytes_lost: int = 0
    failures: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, kind: str, detail: str) -> None:
        self.failures.setdefault(kind, []).append(detail)

    def trial(self, problems: list[tuple[str, str]], lost: int = 0, label: str = "") -> bool:
        """Count one fault: ``problems`` are (kind, detail) pairs, none when it was survived."""
        self.trials += 1
        self.bytes_lost += lost
        for kind, detail in problems:
            self.fail(kind, f"{label}: {detail}" if label else detail)
        self.survived += not problems
        return not problems

    def row(self) -> dict[str, Any]:
        return {"campaign": self.name, "trials": self.trials, "survived": self.survived,
                "inputs": self.inputs, "bytes_lost": self.bytes_lost,
                "failures": sum(len(v) for v in self.failures.values()), "seconds": round(self.seconds)}


# ---- processes ---------------------------------------------------------------------------------
def cli(args: list[str], *, timeout: float = 600, log: Path | None = None, **kw: Any) -> subprocess.CompletedProcess:
    """Run ``actprune ARGS`` to the end; stdout+stderr in the result (and in ``log``)."""
    r = subprocess.run([ACTPRUNE, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if log is not None:
        log.write_text(f"$ actprune {' '.join(args)}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r


def spawn(args: list[str], log: Path, *, python: bool = False, **kw: Any) -> subprocess.Popen:
    """Start ``actprune ARGS`` (or ``python ARGS``) in a session of its own, output to ``log``
    as it is printed (unbuffered: the campaign watches the log to time its kills)."""
    cmd = [sys.executable, *args] if python else [ACTPRUNE, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    with log.open("wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env, **kw)


def kill_group(proc: subprocess.Popen) -> bool:
    """SIGKILL the process's session (the CLI and anything it started); True when it was
    still running, i.e. the kill interrupted it."""
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    return alive


def wait_for(pred, timeout: float, every: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


# ---- fixtures ----------------------------------------------------------------------------------
class Fixtures:
    """Inputs built once under ``root`` and reused by every campaign (and by a rerun)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def model(self, name: str = "tiny", **shape: Any) -> Path:
        path = self.root / "models" / name
        if not (path / "config.json").is_file():
            from actprune.pruning.fixtures.synthetic import build_checkpoint

            build_checkpoint(path, arch="qwen3", dtype="float32", **shape)
        return path

    def small(self) -> Path:
        """4 layers, hidden 256, MLP 1024, 8 heads in 4 KV groups: 4.2 M parameters, 17 MB."""
        return self.model("small", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=32)

    def wide(self) -> Path:
        """6 layers, hidden 384, MLP 2048: 60 MB, so that slicing takes a while to write."""
        return self.model("wide", hidden_size=384, intermediate_size=2048, num_hidden_layers=6,
                          num_attention_heads=12, num_key_value_heads=4, head_dim=32)

    def text(self) -> Path:
        path = self.root / "text.txt"
        if not path.is_file():
            path.write_text("\n\n".join(f"{SENTENCES[k % len(SENTENCES)]} Number {k}." for k in range(240)))
        return path

    def stats(self, model: Path) -> Path:
        path = self.root / f"stats-{model.name}.safetensors"
        if not path.is_file():
            r = cli(["record", "--model", str(model), "--data", str(self.text()), "--max-tokens", "2000",
                     "-o", str(path)])
            if r.returncode:
                raise RuntimeError(f"actprune record failed:\n{r.stderr[-2000:]}")
        return path

    def plan(self, model: Path, name: str, *flags: str) -> Path:
        path = self.root / f"plan-{model.name}-{name}.json"
        if not path.is_file():
            r = cli(["plan", "--stats", str(self.stats(model)), "--model", str(model), "-o", str(path), *flags])
            if r.returncode:
                raise RuntimeError(f"actprune plan failed:\n{r.stderr[-2000:]}")
        return path


# ---- "complete version" checks -----------------------------------------------------------------
def size_of(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    if path.is_dir():
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return 0


def leftovers(directory: Path) -> list[Path]:
    """What a killed writer left: staging directories, retired outputs, atomic_write temporaries."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob(".*")
                  if STAGING_MARK in p.name or RETIRED_MARK in p.name or _ATOMIC_TMP.fullmatch(p.name))


def _safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def scrub(obj: Any, swap: tuple[str, str] | None = None) -> Any:
    """JSON made comparable across two runs: creation times dropped, the run's own directory
    (``swap[0]``) spelled as the reference's (``swap[1]``) in every string."""
    if isinstance(obj, dict):
        return {k: scrub(v, swap) for k, v in obj.items() if k not in ("created", "key")}
    if isinstance(obj, list):
        return [scrub(v, swap) for v in obj]
    if isinstance(obj, str) and swap:
        return obj.replace(*swap)
    return obj


def file_diff(path: Path, ref: Path, swap: tuple[str, str] | None = None) -> str | None:
    """None when ``path`` holds what ``ref`` holds, read as its kind (safetensors, JSON, JSONL,
    bytes; JSON through :func:`scrub`); else the first difference, or why ``path`` cannot be
    read."""
    try:
        if path.suffix == ".safetensors":
            (a, ma), (b, mb) = _safetensors(path), _safetensors(ref)
            if set(a) != set(b) or ma != mb:
                return f"{path.name}: other tensor names or metadata"
            bad = [k for k in a if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])]
            return f"{path.name}: tensor {bad[0]} differs" if bad else None
        if path.suffix == ".json":
            same = scrub(json.loads(path.read_text()), swap) == scrub(json.loads(ref.read_text()))
            return None if same else f"{path.name}: JSON differs"
        if path.suffix == ".jsonl":
            a = [scrub(json.loads(x), swap) for x in path.read_text().splitlines() if x.strip()]
            b = [scrub(json.loads(x)) for x in ref.read_text().splitlines() if x.strip()]
            return None if a == b else f"{path.name}: {len(a)} records, reference {len(b)} (or other values)"
        return None if path.read_bytes() == ref.read_bytes() else f"{path.name}: bytes differ"
    except Exception as e:  # unreadable: torn, truncated, not what it claims to be
        return f"{path.name}: unreadable ({type(e).__name__}: {str(e)[:160]})"


def tree_diff(directory: Path, ref: Path, ignore: tuple[str, ...] = (),
              swap: tuple[str, str] | None = None) -> str | None:
    """None when ``directory`` holds the same files as ``ref`` (hidden leftovers and paths
    starting with an ``ignore`` prefix aside), each equal by :func:`file_diff`."""
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
                and not str(p.relative_to(root)).startswith(ignore)}

    if not directory.is_dir():
        return f"{directory.name}: missing"
    mine, theirs = files(directory), files(ref)
    if mine != theirs:
        return f"{directory.name}: files {sorted(mine ^ theirs)[:4]} differ from the reference"
    for rel in sorted(mine):
        if (d := file_diff(directory / rel, ref / rel, swap)) is not None:
            return f"{directory.name}/{d}"
    return None


def checkpoint_diff(directory: Path) -> str | None:
    """None when every file of a checkpoint-like directory reads back whole (no reference)."""
    for p in sorted(directory.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(directory).parts):
            continue
        try:
            if p.suffix == ".safetensors":
                _safetensors(p)
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        except Exception as e:
            return f"{p.relative_to(directory.parent)}: unreadable ({type(e).__name__}: {str(e)[:160]})"
    return None


def stats_diff(path: Path, ref: Any) -> str | None:
    """None when the stats file at ``path`` loads (Stats.load) and equals the Stats ``ref``."""
    from actprune.core.wire.stats import Stats

    try:
        got = Stats.load(path)
    except Exception as e:
        return f"{path.name}: Stats.load fails ({str(e)[:160]})"
    if set(got.tensors) != set(ref.tensors) or any(not np.array_equal(got.tensors[k], ref.tensors[k]) for k in got.tensors):
        return f"{path.name}: tensors differ from the reference"
    return None
