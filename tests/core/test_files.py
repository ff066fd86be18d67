"""`staged_directory`: replacing an output survives a failure or a kill at every step.

Faults are injected into ``os.rename`` and ``shutil.rmtree`` (the only calls that change what sits
under the final name): after the fault, the final name holds the old or the new complete
directory, or the old one waits beside it and the next run renames it back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from actprune.core import files
from actprune.core.files import RETIRED_MARK, STAGING_MARK, staged_directory


class Killed(BaseException):
    """Stands for a kill: not an Exception, so no ``except Exception`` swallows it."""


def _write(d: Path, version: str) -> None:
    (d / "a.txt").write_text(version)
    (d / "b.txt").write_text(version * 2)


def _version(d: Path) -> str | None:
    """'old' / 'new' for a complete directory, None for anything else."""
    if not d.is_dir() or sorted(p.name for p in d.iterdir()) != ["a.txt", "b.txt"]:
        return None
    v = (d / "a.txt").read_text()
    return v if (d / "b.txt").read_text() == v * 2 else None


def _siblings(out: Path, mark: str) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{mark}")]


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    _write(out, "old")
    return out


def _faults(monkeypatch, fail_from: int, exc: type[BaseException] = Killed, only=None) -> list[str]:
    """From the ``fail_from``-th call (0-based) of os.rename / shutil.rmtree on, every call raises
    (a kill: nothing after it happens). ``only(name, path)`` limits which calls count."""
    calls: list[str] = []
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def guard(name: str, path) -> None:
        if only is not None and not only(name, Path(path)):
            return
        calls.append(name)
        if len(calls) > fail_from:
            raise exc(f"injected fault in {name} #{len(calls)}")

    def rename(src, dst, *a, **kw):
        guard("rename", src)
        return real_rename(src, dst, *a, **kw)

    def rmtree(path, *a, **kw):
        guard("rmtree", path)
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(files.os, "rename", rename)
    monkeypatch.setattr(files.shutil, "rmtree", rmtree)
    return calls


def test_replacing_an_output_leaves_only_the_new_one(out):
    with staged_directory(out) as tmp:
        _write(tmp, "new")
    assert _version(out) == "new"
    assert not _siblings(out, STAGING_MARK) and not _siblings(out, RETIRED_MARK)


def test_an_error_while_writing_keeps_the_old_output(out):
    with pytest.raises(RuntimeError), staged_directory(out) as tmp:
        _write(tmp, "new")
        raise RuntimeError("disk full")
    assert _version(out) == "old" and not _siblings(out, STAGING_MARK)


def test_a_failed_rename_aside_keeps_the_old_output(out, monkeypatch):
    _faults(monkeypatch, 0, OSError, only=lambda name, p: name == "rename")
    with pytest.raises(OSError), staged_directory(out) as tmp:
        _write(tmp, "new")
    assert _version(out) == "old"
    assert not _siblings(out, STAGING_MARK) and not _siblings(out, RETIRED_MARK)


def test_a_failed_rename_in_puts_the_old_output_back(out, monkeypatch):
    _faults(monkeypatch, 0, OSError, only=lambda name, p: name == "rename" and STAGING_MARK in p.name)
    with pytest.raises(OSError), staged_directory(out) as tmp:
        _write(tmp, "new")
    assert _version(out) == "old"
    assert not _siblings(out, STAGING_MARK) and not _siblings(out, RETIRED_MARK)


def test_a_failed_delete_of_the_old_output_keeps_the_new_and_the_next_run_cleans_up(out, monkeypatch):
    with monkeypatch.context() as m:
        _faults(m, 0, OSError, only=lambda name, p: name == "rmtree" and RETIRED_MARK in p.name)
        with staged_directory(out) as tmp:
            _write(tmp, "new")
    assert _version(out) == "new"
    [left] = _siblings(out, RETIRED_MARK)
    assert _version(left) == "old"
    with pytest.raises(RuntimeError), staged_directory(out):
        raise RuntimeError("the next run fails early")
    assert _version(out) == "new" and not _siblings(out, RETIRED_MARK)


@pytest.mark.parametrize("step", range(4))
def test_a_kill_at_any_step_leaves_a_complete_directory_or_one_the_next_run_restores(out, monkeypatch, step):
    with monkeypatch.context() as m:
        calls = _faults(m, step)
        try:
            with staged_directory(out) as tmp:
                _write(tmp, "new")
        except Killed:
            pass
    killed = len(calls) > step
    if _version(out) is None:  # only between the two renames: the old one waits beside
        assert killed and not out.exists()
        assert [_version(p) for p in _siblings(out, RETIRED_MARK)] == ["old"]
    else:
        assert _version(out) == ("new" if step >= 2 or not killed else "old")
    with pytest.raises(RuntimeError), staged_directory(out):
        raise RuntimeError("the next run fails early")
    assert _version(out) in ("old", "new") and not _siblings(out, RETIRED_MARK)


# ---- staging directories a kill left behind -------------------------------------------------------
def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # exited and reaped: no process has it (until the kernel reuses it)


def test_staging_directories_of_killed_writers_are_removed_by_the_next_run(tmp_path):
    host = files._owner().split("@")[1]
    dead = tmp_path / f".step-000009{STAGING_MARK}{_dead_pid()}@{host}-abcd1234"
    live = tmp_path / f".model{STAGING_MARK}{os.getppid()}@{host}-abcd1234"  # a writer still running
    remote = tmp_path / f".model{STAGING_MARK}{_dead_pid()}@0badc0de-abcd1234"  # shared storage, other host
    older = tmp_path / f".model{STAGING_MARK}abcd1234"  # an older version's name: whose, unknown
    for d in (dead, live, remote, older):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    with staged_directory(tmp_path / "step-000010") as tmp:
        assert f"{os.getpid()}@{host}-" in tmp.name  # its own writer is named, and alive
        _write(tmp, "new")
    assert not dead.exists()
    assert live.is_dir() and remote.is_dir() and older.is_dir()
    assert _version(tmp_path / "step-000010") == "new"


# ---- JSONL ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("line", "named"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"text": ' + "1" * 5000 + "}", "not readable JSON"),
    ('{"text": "a"', "not valid JSON"),
    ('["text"]', "expected a JSON object per line, got list"),
])
def test_read_jsonl_refuses_unreadable_lines_with_the_file_and_line(tmp_path, line, named):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(files.JsonlError) as e:
        files.read_jsonl(path)
    assert f"{path}:3: " in str(e.value) and named in str(e.value)
