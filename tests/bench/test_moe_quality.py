"""bench/moe_quality.py end to end on the tests' tiny random Qwen3-MoE (the pod runs it on
Qwen3-30B-A3B): plan, prune and eval through the real commands, one row per configuration,
REAP from the offline recorder's stats, a rerun doing nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from moe_helpers import tiny_moe

BENCH = Path(__file__).resolve().parents[2] / "bench" / "moe_quality.py"
pytestmark = pytest.mark.slow


def _run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_configuration_is_planned_sliced_and_scored_against_the_original(tmp_path):
    model, stats = tiny_moe(tmp_path)  # recorded offline: router counts and REAP's reap_sum
    work = tmp_path / "work"
    common = ["--work", str(work), "--model", str(model), "--stats", str(stats), "--reap-stats", str(stats),
              "--ratios", "0.25", "--strategies", "router_weighted", "reap", "--max-tokens", "256"]
    _run(*common)
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == ["reap-0.25", "reap-0.25-per-layer",
                                              "router_weighted-0.25", "router_weighted-0.25-per-layer"]
    for r in rows:
        assert r["params"] < r["params_original"] and r["kl"] > 0 and r["ppl"] > 0
        assert not (work / r["name"] / "model").exists()  # deleted once evaluated
    assert _run(*common).count("\n| 25% |") == 4  # nothing left to do: the table of the four rows
    assert (work / "results.jsonl").read_text().count("\n") == 4
