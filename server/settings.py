"""API-process settings, read once from the environment (the only place actprune reads it).

    ACTPRUNE_SNAPSHOT_DIR       where snapshots are written (default /workspace/actprune on a
                                RunPod volume, else ~/.cache/actprune)
    ACTPRUNE_SNAPSHOT_INTERVAL  seconds between snapshots to disk; 0 disables (default 60)
    ACTPRUNE_RESUME             1: resume accumulating from the last snapshot of the same model
                                at start-up (default), 0: start from zero
    VLLM_API_KEY                vLLM's key, used when --api-key is not given
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Settings"]


def _default_dir() -> Path:
    ws = Path("/workspace")
    if ws.is_dir() and os.access(ws, os.W_OK):
        return ws / "actprune"
    return Path.home() / ".cache" / "actprune"


@dataclass(frozen=True)
class Settings:
    snapshot_dir: Path = field(default_factory=_default_dir)
    snapshot_interval: float = 60.0
    resume: bool = True
    env_api_key: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        interval = env.get("ACTPRUNE_SNAPSHOT_INTERVAL", "60")
        try:
            interval_s = float(interval)
        except ValueError:
            raise ValueError(f"ACTPRUNE_SNAPSHOT_INTERVAL must be a number of seconds, got {interval!r}") from None
        if interval_s < 0:
            raise ValueError(f"ACTPRUNE_SNAPSHOT_INTERVAL must be >= 0, got {interval_s}")
        resume = env.get("ACTPRUNE_RESUME", "1").strip().lower()
        if resume not in ("0", "1", "true", "false", "yes", "no"):
            raise ValueError(f"ACTPRUNE_RESUME must be 0 or 1, got {resume!r}")
        snap = env.get("ACTPRUNE_SNAPSHOT_DIR")
        return cls(
            snapshot_dir=Path(snap).expanduser() if snap else _default_dir(),
            snapshot_interval=interval_s,
            resume=resume in ("1", "true", "yes"),
            env_api_key=env.get("VLLM_API_KEY") or None,
        )
