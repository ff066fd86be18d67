"""bench/graph_decode.py and bench/graph_capture_cost.py, checked on a CPU with a tiny Qwen3.

What the GPU figures in BENCHMARKS.md rest on, checked here without a GPU (the scripts run their
steps eagerly where no CUDA graph can be made): the hand-driven decode step is transformers'
Qwen3 (its logits equal the model's own forward over the sequence); capture on leaves the
greedy tokens unchanged; steps while unarmed fold nothing, and the accumulators after armed
steps equal float64 sums of the activations the step logged; every cost piece runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, *args: str, out: Path) -> dict:
    r = subprocess.run([sys.executable, str(BENCH / script), "--tiny", "--device", "cpu", *args, "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=BENCH)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(out.read_text())


def test_graph_decode_checks_hold_on_a_tiny_model(tmp_path):
    res = _run("graph_decode.py", "--rounds", "2", "--steps", "4", "--batches", "1", "8", out=tmp_path / "g.json")
    assert res["decoder_vs_forward"] < 1e-5  # float32: the step is the model's forward
    for b in ("1", "8"):
        assert res["capture"][b]["same_tokens"] is True
        assert res["capture"][b]["on"]["ratio"] > 0
    exact = res["exact"]
    assert exact["count"] == exact["block_count"] == 0.0  # the unarmed steps are not counted
    assert max(v for f, v in exact.items() if f not in ("count", "block_count")) < 1e-9, exact
    dense, pruned = (res["decode"]["batches"]["8"][n] for n in ("dense", "mlp50"))
    assert dense["ideal"] == 1.0 and pruned["ideal"] > 1.0  # fewer weight bytes read per step


def test_graph_capture_cost_times_every_piece(tmp_path):
    res = _run("graph_capture_cost.py", "--batches", "8", "--replays", "2", out=tmp_path / "c.json")
    pieces = res["batches"]["8"]
    assert len(pieces) == 8 and all(p["us"] > 0 for p in pieces.values())
