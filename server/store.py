"""One server instance's files in the snapshot directory, the lock that keeps them its own, and
what start-up resumes from them (numpy and safetensors only: the API process runs it, and the
workers take their shard's name from it).

The files of instance ``ID`` serving the model whose config hash is ``H``::

    stats-H-ID.safetensors            the snapshot, written by the API server every interval,
                                      after every reset, pause and resume (before the route
                                      answers), at shutdown, and once at start-up
    shard-H-ID-ppP-tpT.safetensors    rank (P, T)'s own accumulators, written by its worker as it
                                      shuts down: when Ctrl-C (SIGINT to the whole process group)
                                      stops the server, the engine stops before the API server's
                                      last snapshot can reach it
    stats-H-ID.lock                   held (flock) by the live server: a second server with the same
                                      identity and directory is refused
    NAME.corrupt-UTC, NAME.newer-UTC  set aside at start-up: unreadable or unusable, or written by a
                                      newer actprune; never deleted, never read again
    .NAME.XXXXXXXX                    a write killed half-way (``atomic_write``); removed at start-up

At start-up :func:`recover` picks the newest complete state: the snapshot, or the complete set of
one run's worker shards when they were taken later (they hold all the snapshot holds and what came
after). One replaces the other, nothing is added: a start-up interrupted anywhere never counts a
token twice. Shards are removed only once a newer snapshot is on disk.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actprune.core.archs.shape import model_shape
from actprune.core.errors import ActpruneError
from actprune.core.files import atomic_temporaries, fsync_dir
from actprune.core.wire.schema import ROUTER_KIND, key
from actprune.core.wire.stats import Stats, StatsFormatError, StatsVersionError

from .snapshot import Shard, assemble

__all__ = [
    "SHARD_FORMAT",
    "SHARD_FORMAT_VERSION",
    "CannotSetAside",
    "InstanceFiles",
    "InstanceLock",
    "Recovered",
    "SnapshotInUse",
    "check_fits",
    "recover",
    "set_aside",
]

log = logging.getLogger("vllm.actprune")  # under "vllm": its handlers apply
SHARD_FORMAT = "actprune.shard"
SHARD_FORMAT_VERSION = 1
_SNAPSHOT_NAME = re.compile(r"stats-([0-9a-f]{16})(?:-[A-Za-z0-9_-]+)?\.safetensors")


class SnapshotInUse(ActpruneError):
    """Another live server holds this instance's files (same identity, same directory)."""


class CannotSetAside(ActpruneError):
    """A file that must not be overwritten could not be moved out of the way."""


@dataclass(frozen=True)
class InstanceFiles:
    """The names of one instance's files (see the module docstring)."""

    directory: Path
    config_hash: str
    instance_id: str

    @property
    def stem(self) -> str:
        return f"{self.config_hash}-{self.instance_id}"

    @property
    def snapshot(self) -> Path:
        return self.directory / f"stats-{self.stem}.safetensors"

    @property
    def legacy(self) -> Path:
        """The snapshot's name before servers had identities."""
        return self.directory / f"stats-{self.config_hash}.safetensors"

    @property
    def lock(self) -> Path:
        return self.directory / f"stats-{self.stem}.lock"

    def shard(self, pp_rank: int, tp_rank: int) -> Path:
        return self.directory / f"shard-{self.stem}-pp{pp_rank}-tp{tp_rank}.safetensors"

    def shards(self) -> list[Path]:
        name = re.compile(rf"shard-{re.escape(self.stem)}-pp\d+-tp\d+\.safetensors")
        return sorted(p for p in self.directory.glob(f"shard-{self.stem}-*") if name.fullmatch(p.name))

    def other_models(self) -> list[Path]:
        """Snapshots of other models in the directory (never mixed with this one)."""
        return sorted(p for p in self.directory.glob("stats-*.safetensors")
                      if (m := _SNAPSHOT_NAME.fullmatch(p.name)) and m.group(1) != self.config_hash)


class InstanceLock:
    """An exclusive ``flock`` on the instance's lock file, held while this process lives: the
    kernel releases it when the process ends, however it ends (kill -9 included)."""

    def __init__(self, files: InstanceFiles) -> None:
        self.files = files
        self._fd: int | None = None

    def acquire(self) -> InstanceLock:
        path = self.files.lock
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by another process (or another open here)
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SnapshotInUse(
                f"another live server (pid {holder}) is instance {self.files.instance_id!r} of this model "
                f"in {self.files.directory} (it holds {path.name}); two servers must not share one "
                f"identity: give each its own --instance-id (ACTPRUNE_INSTANCE_ID) or --snapshot-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def set_aside(path: Path, reason: str, why: object) -> Path:
    """Rename ``path`` to ``NAME.REASON-UTC`` beside it (never delete data) and say so loudly."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = path.with_name(f"{path.name}.{reason}-{stamp}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.{reason}-{stamp}-{n}"), n + 1
    try:
        os.rename(path, target)
    except OSError as e:
        raise CannotSetAside(f"cannot move {path} aside to {target.name} ({e}); it is kept in place "
                             f"and this server will not write over it") from e
    fsync_dir(path.parent)
    log.error("actprune: %s: %s; moved aside to %s (kept, never read again)", path, why, target.name)
    return target


def check_fits(stats: Stats, meta: dict[str, Any], hf_config: dict[str, Any]) -> None:
    """StatsFormatError unless ``stats`` belongs to the served model: same config hash, every
    layer, every width (what the workers check again before touching their accumulators)."""
    if stats.meta.get("config_hash") != meta["config_hash"]:
        raise StatsFormatError(f"config_hash {stats.meta.get('config_hash')} is another model's "
                               f"(this server's is {meta['config_hash']})")
    if stats.layers != list(range(int(meta["num_layers"]))):
        raise StatsFormatError(f"holds layers {stats.layers}, the model has {meta['num_layers']}")
    try:
        shape = model_shape(hf_config)
    except Exception:  # an unusual config: the workers check widths
        return
    for i, s in enumerate(shape.layers):
        mlp = ("mlp", "sum", s.intermediate_size) if s.num_experts is None else \
            (ROUTER_KIND, "topk_count", s.num_experts)  # a sparse layer: one router entry per expert
        for kind, entry, width in (mlp, ("attn", "sum", s.num_attention_heads * shape.head_dim)):
            name = key(i, kind, entry)
            got = stats.tensors[name].shape[0] if name in stats.tensors else None
            if got != width:
                raise StatsFormatError(f"layer {i} {kind} has {got or 'no'} channels, the model has {width}")


@dataclass
class Recovered:
    """What start-up found: the state to fold back in (None: start from zero), the files it
    came from, and the shard files to remove once a newer snapshot is on disk."""

    stats: Stats | None = None
    source: list[Path] = field(default_factory=list)
    spent: list[Path] = field(default_factory=list)


def recover(files: InstanceFiles, meta: dict[str, Any], check: Callable[[Stats], None], *,
            resume: bool = True) -> Recovered:
    """Clean what a kill left, adopt a snapshot written before servers had identities, set aside
    every file that cannot be used, and (when ``resume``) return the newest complete state.
    ``check`` raises StatsFormatError for a state of another model. Call it holding the lock."""
    files.directory.mkdir(parents=True, exist_ok=True)
    ranks = [(p, t) for p in range(int(meta["pipeline_parallel_size"]))
             for t in range(int(meta["tensor_parallel_size"]))]
    for target in [files.snapshot, files.legacy, *(files.shard(p, t) for p, t in ranks)]:
        for tmp in atomic_temporaries(target):
            tmp.unlink(missing_ok=True)
            log.warning("actprune: removed %s, a write to %s cut short by a kill", tmp.name, target.name)
    _adopt_legacy(files)
    if not resume:
        return Recovered(spent=files.shards())
    found: list[tuple[float, Stats, list[Path]]] = []
    snap = _read_snapshot(files.snapshot, check)
    if snap is not None:
        found.append((_taken_at(snap), snap, [files.snapshot]))
    found += _read_shard_sets(files, meta, check)
    spent = files.shards()
    if not found:
        return Recovered(spent=spent)
    _, stats, source = max(found, key=lambda f: f[0])
    return Recovered(stats=stats, source=source, spent=spent)


def _adopt_legacy(files: InstanceFiles) -> None:
    if files.snapshot.exists() or not files.legacy.exists():
        return
    try:
        os.rename(files.legacy, files.snapshot)  # one rename: of two servers, one adopts it
    except FileNotFoundError:
        return
    fsync_dir(files.directory)
    log.warning("actprune: adopted %s (written before servers had identities) as %s",
                files.legacy.name, files.snapshot.name)


def _taken_at(stats: Stats) -> float:
    return float(stats.meta.get("taken_at") or stats.meta.get("created") or 0.0)


def _read_snapshot(path: Path, check: Callable[[Stats], None]) -> Stats | None:
    if not path.exists():
        return None
    try:
        stats = Stats.from_bytes(path.read_bytes(), source=str(path))
        check(stats)
    except StatsVersionError as e:
        set_aside(path, "newer", e)
        return None
    except Exception as e:  # unreadable, malformed, another model's: kept aside, never resumed
        set_aside(path, "corrupt", e)
        return None
    return stats


def _read_shard_sets(files: InstanceFiles, meta: dict[str, Any],
                     check: Callable[[Stats], None]) -> list[tuple[float, Stats, list[Path]]]:
    """(taken at, assembled state, files) of every complete, consistent set of one run's shards;
    the rest is set aside."""
    runs: dict[str, list[tuple[Path, bytes, Shard]]] = {}
    for path in files.shards():
        try:
            data = path.read_bytes()
            shard = Shard(data)
            if shard.meta.get("format") != SHARD_FORMAT:
                raise ValueError(f"format is {shard.meta.get('format')!r}, expected {SHARD_FORMAT!r}")
            version = int(shard.meta.get("format_version", "0"))
            if version > SHARD_FORMAT_VERSION:
                set_aside(path, "newer", f"shard format_version {version} is newer than this actprune's")
                continue
            if (shard.meta.get("config_hash"), shard.meta.get("instance_id")) != (files.config_hash, files.instance_id):
                raise ValueError("written by another model or instance")
            runs.setdefault(shard.meta["run_id"], []).append((path, data, shard))
        except Exception as e:
            set_aside(path, "corrupt", e)
    out = []
    for run, members in runs.items():
        paths = [p for p, _, _ in members]
        try:
            info = members[0][2].info
            want = {(p, t) for p in range(info["pp_size"]) for t in range(info["tp_size"])}
            got = {(s.info["pp_rank"], s.info["tp_rank"]) for _, _, s in members}
            if got != want:
                raise ValueError(f"shards of (pp, tp) ranks {sorted(got)} of {sorted(want)}: a rank "
                                 f"stopped mid-step or was killed")
            stats = assemble([d for _, d, _ in members], dict(meta, created=time.time()))
            check(stats)
        except Exception as e:  # incomplete or torn (ranks at different steps): unusable as a set
            for p in paths:
                set_aside(p, "corrupt", f"run {run}: {e}")
            continue
        out.append((_taken_at(stats), stats, paths))
    return out
