"""`atomic_write`: the new file is durable once it returns (directory fsync after the rename),
and what a killed write leaves behind can be told from everything else; `read_json_record` reads
such a record back, and anything else as "none"."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from actprune.core import files
from actprune.core.files import atomic_temporaries, atomic_write, read_json_record


def test_atomic_write_fsyncs_the_file_then_the_directory_after_the_rename(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    path = atomic_write(tmp_path / "sub" / "stats.safetensors", b"data")
    assert events == ["fsync file", "rename", "fsync dir"]
    assert path.read_bytes() == b"data" and [p.name for p in path.parent.iterdir()] == ["stats.safetensors"]


def test_atomic_temporaries_are_only_the_files_a_killed_write_left(tmp_path: Path):
    target = tmp_path / "stats-x.safetensors"
    left = tmp_path / ".stats-x.safetensors.abcd_123"
    names = [".stats-x.safetensors.longer123", ".stats-x.safetensors.corrupt", ".stats-xy.safetensors.abcd1234",
             "stats-x.safetensors.abcd1234", "stats-x.safetensors"]
    for p in [left, *(tmp_path / n for n in names)]:
        p.write_bytes(b"")
    assert atomic_temporaries(target) == [left]
    assert atomic_temporaries(tmp_path / "missing" / "x") == []


def test_read_json_record_returns_the_object_written_and_empty_for_anything_else(tmp_path: Path):
    path = tmp_path / "record.json"
    assert read_json_record(path) == {}  # missing
    atomic_write(path, '{"format": "x/1", "candidates": {"mlp": 2.5}}\n')
    assert read_json_record(path) == {"format": "x/1", "candidates": {"mlp": 2.5}}
    for text in ('{"format": "x/1", "cand', "[1, 2]", "null", ""):  # a torn write, a list, JSON null, empty
        path.write_text(text)
        assert read_json_record(path) == {}, text
    path.write_bytes(b'{"a": "\xff"}')  # not UTF-8
    assert read_json_record(path) == {}
    assert read_json_record(tmp_path) == {}  # a directory where the file should be
