"""Files shared by every reader and writer: atomic writes (stats, plans, downloads) and the
JSONL reader behind prompts, training data and evaluation prompts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["JsonlError", "atomic_write", "read_jsonl"]


class JsonlError(ValueError):
    """A JSONL file that cannot be read; the message names the file and line."""


def read_jsonl(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; JsonlError on a missing or unreadable
    file, a line that is not JSON, or one that is not a JSON object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise JsonlError(f"no such file {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise JsonlError(f"cannot read {path}: {e}") from e
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise JsonlError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise JsonlError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
        out.append((n, obj))
    return out


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``:
    a reader sees the old file or the new one, never half of one, even after a kill -9."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
