"""API-process settings, read once from the environment (the only place actprune reads it).

    ACTPRUNE_SNAPSHOT_DIR       where snapshots are written (default /workspace/actprune on a
                                RunPod volume, else ~/.cache/actprune)
    ACTPRUNE_SNAPSHOT_INTERVAL  seconds between snapshots to disk, at least 1; 0 disables
                                persistence (no snapshots, no worker shards; default 60)
    ACTPRUNE_INSTANCE_ID        this server's identity, stable across its restarts: it names its
                                snapshot files and is in every stats file's metadata, so servers
                                sharing a directory never mix their counts (letters, digits, _ and
                                -, at most 64; default HOSTNAME-PORT, set by `actprune serve`)
    ACTPRUNE_RESUME             1: resume accumulating from the last snapshot of the same model
                                at start-up (default), 0: start from zero
    VLLM_API_KEY                vLLM's key, used when --api-key is not given
    ACTPRUNE_ALLOW_NO_KEY       1: let `actprune serve` listen on a non-loopback address without
                                an API key (default 0: it refuses, see server/launch.py)
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MIN_SNAPSHOT_INTERVAL", "Settings", "allow_no_key", "check_instance_id", "default_instance_id",
           "parse_interval"]

_BOOLS = {"0": False, "1": True, "false": False, "true": True, "no": False, "yes": True}


def _default_dir() -> Path:
    ws = Path("/workspace")
    if ws.is_dir() and os.access(ws, os.W_OK):
        return ws / "actprune"
    return Path.home() / ".cache" / "actprune"


MIN_SNAPSHOT_INTERVAL = 1.0  # seconds; each snapshot stops every worker for a step
_INSTANCE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # part of file names: no dot, no slash


def parse_interval(text: str, name: str = "ACTPRUNE_SNAPSHOT_INTERVAL") -> float:
    """Seconds between snapshots: 0 (off) or at least :data:`MIN_SNAPSHOT_INTERVAL`."""
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None
    if seconds != 0 and not (math.isfinite(seconds) and seconds >= MIN_SNAPSHOT_INTERVAL):
        raise ValueError(f"{name} must be 0 (no snapshots) or at least {MIN_SNAPSHOT_INTERVAL:g} "
                         f"seconds, got {text!r}")
    return seconds


def check_instance_id(value: str, name: str = "ACTPRUNE_INSTANCE_ID") -> str:
    if not _INSTANCE_ID.fullmatch(value):
        raise ValueError(f"{name} must be 1 to 64 letters, digits, '_' or '-', got {value!r}")
    return value


def default_instance_id(port: int | str | None = None) -> str:
    """``HOSTNAME-PORT`` (the host name's characters outside the allowed set become '_'):
    stable across restarts of one server, distinct for two servers on one host. Without a port
    (vLLM started without `actprune serve`) the host name alone: a second server on the host
    is then refused until it gets its own ACTPRUNE_INSTANCE_ID."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    suffix = "" if port is None else f"-{port}"
    return host[: 64 - len(suffix)] + suffix


@dataclass(frozen=True)
class Settings:
    snapshot_dir: Path = field(default_factory=_default_dir)
    snapshot_interval: float = 60.0
    resume: bool = True
    instance_id: str = field(default_factory=default_instance_id)
    env_api_key: str | None = field(default=None, repr=False)  # never in logs or tracebacks

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        interval_s = parse_interval(env.get("ACTPRUNE_SNAPSHOT_INTERVAL", "60"))
        resume = env.get("ACTPRUNE_RESUME", "1").strip().lower()
        if resume not in ("0", "1", "true", "false", "yes", "no"):
            raise ValueError(f"ACTPRUNE_RESUME must be 0 or 1, got {resume!r}")
        snap = env.get("ACTPRUNE_SNAPSHOT_DIR")
        return cls(
            snapshot_dir=Path(snap).expanduser() if snap else _default_dir(),
            snapshot_interval=interval_s,
            resume=resume in ("1", "true", "yes"),
            instance_id=check_instance_id(env.get("ACTPRUNE_INSTANCE_ID") or default_instance_id()),
            env_api_key=env.get("VLLM_API_KEY") or None,
        )


def allow_no_key(env: Mapping[str, str]) -> bool:
    """ACTPRUNE_ALLOW_NO_KEY: the operator's explicit consent to serve a network without a key."""
    value = env.get("ACTPRUNE_ALLOW_NO_KEY", "0").strip().lower()
    if value not in _BOOLS:
        raise ValueError(f"ACTPRUNE_ALLOW_NO_KEY must be 0 or 1, got {value!r}")
    return _BOOLS[value]
