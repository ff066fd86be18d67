"""A smoke run of bench/faults.py's checkers, so that the campaign cannot rot: two kills of the
snapshot writer, the "complete version" checks on a torn and a whole copy, a few inputs of
every bad-input kind, and the BENCHMARKS.md section it replaces. No server (the campaign's own
server parts run only from the script)."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from raw_samples import random_raw, stats_from_raw

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import faults  # noqa: E402
from fault_kit import Fixtures, Tally, file_diff, leftovers, tree_diff  # noqa: E402


def test_killed_snapshot_writes_leave_the_previous_or_the_new_version_and_resume(tmp_path: Path):
    from fault_kills import kill_snapshot_files

    base = stats_from_raw(random_raw(np.random.default_rng(0), tokens=40)).save(tmp_path / "base.safetensors")
    tally = Tally("kill-snapshot")
    kill_snapshot_files(Fixtures(tmp_path / "fx"), tally, 2, random.Random(0), tmp_path / "files", base_path=base)
    assert (tally.trials, tally.survived, tally.bytes_lost) == (2, 2, 0), tally.failures


def test_checks_tell_a_torn_file_from_a_complete_one(tmp_path: Path):
    ref = tmp_path / "ref"
    ref.mkdir()
    stats = stats_from_raw(random_raw(np.random.default_rng(1), tokens=20))
    stats.save(ref / "stats.safetensors")
    (ref / "config.json").write_text(json.dumps({"a": 1, "path": str(ref), "created": "now"}))
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (run / "config.json").write_text(json.dumps({"a": 1, "path": str(run), "created": "later"}))
    assert tree_diff(run, ref, swap=(str(run), str(ref))) is None  # same but for the run's own paths and times
    data = (run / "stats.safetensors").read_bytes()
    (run / "stats.safetensors").write_bytes(data[: len(data) // 2])
    assert "unreadable" in file_diff(run / "stats.safetensors", ref / "stats.safetensors")
    assert tree_diff(run, ref, swap=(str(run), str(ref))) is not None
    for name in (".out.partial-x1y2", ".out.old-0123abcd", ".stats.safetensors.ab12cd34"):
        (run / name).mkdir()
    assert [p.name for p in leftovers(run)] == sorted([".out.old-0123abcd", ".out.partial-x1y2", ".stats.safetensors.ab12cd34"])


def test_bad_input_corpus_runs_every_kind_and_files_each_outcome(tmp_path: Path):
    from fault_inputs import bad_inputs

    tally = Tally("bad-inputs")
    bad_inputs(Fixtures(tmp_path / "fx"), tally, tmp_path / "work", fuzz=2, limit=2)
    kinds = {n.split(":")[0] for n in tally.notes}
    assert {"plan file (reused)", "stats file (reused)", "config (reused)", "JSONL", "request body (reused)",
            "plan file (fuzzed)", "request body (fuzzed)"} <= kinds, tally.notes
    assert "campaign crashed" not in tally.failures
    assert tally.inputs == sum(int(n.split(":")[1].split()[0]) for n in tally.notes)
    assert tally.trials == tally.inputs and 0 < tally.survived <= tally.inputs
    # the reused cases keep their messages: a changed message is a finding of its own
    assert not [k for k in tally.failures if "(reused)" in k], tally.failures


def test_a_sliced_checkpoint_is_checked_against_the_parameters_its_plan_promised(tmp_path: Path):
    """The fuzzed-plan checker: a checkpoint one parameter short of (or over) the plan is a finding."""
    from types import SimpleNamespace

    import torch
    from fault_inputs import _sliced_as_planned
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(4, 3), "b.bias": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert _sliced_as_planned(SimpleNamespace(params_after=17), tmp_path) is None
    for wrong in (16, 18):
        assert _sliced_as_planned(SimpleNamespace(params_after=wrong), tmp_path) == (
            f"{tmp_path}: 17 parameters, the plan says {wrong}")


@pytest.mark.parametrize("present", [False, True])
def test_write_replaces_only_the_marked_section(tmp_path: Path, present: bool):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Other\n\nkept\n" + (f"\n{faults.SECTION}\n## After\n\nalso kept\n" if present else ""))
    faults.write_benchmarks("first table", doc)
    faults.write_benchmarks("second table", doc)
    text = doc.read_text()
    assert text.count(faults.BEGIN) == 1 and "second table" in text and "first table" not in text
    assert "kept" in text and (not present or text.rstrip().endswith("also kept"))
