"""Files, one module for every reader and writer of actprune (stdlib only):

- :func:`atomic_write`: a file appears whole or not at all (stats, plans, records);
- :func:`staged_directory`: an output directory appears whole or not at all (checkpoints);
- :func:`read_jsonl`: the JSONL reader behind prompts, training data and evaluation prompts;
- :func:`package_data_file`: a data file inside an installed PyPI package, found without
  importing it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ActpruneError

__all__ = ["STAGING_MARK", "JsonlError", "atomic_write", "package_data_file", "read_jsonl", "staged_directory"]


class JsonlError(ActpruneError):
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

STAGING_MARK = ".partial-"  # in the name of every staging directory: ``.OUT.partial-XXXX``


def package_data_file(package: str, relative: str, missing: str) -> Path:
    """``relative`` inside an installed package, found WITHOUT importing it (some data-only
    packages import heavy runtimes in ``__init__``). Raises FileNotFoundError: ``missing`` says
    how to install the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(missing)
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the package that provides {package}")
    return path


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield a hidden ``.OUT.partial-*`` directory beside ``out``; on success it replaces
    ``out`` by one rename, on any error (or a kill) nothing that looks complete is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
