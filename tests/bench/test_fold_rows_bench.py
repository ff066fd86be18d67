"""bench/fold_rows.py runs the server's real fold (``ops._fold_rows``) with the chunk size it is
given: a smoke run of a few steps prints one row per configuration. (No timing is asserted.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fold_rows.py"


def test_the_fold_benchmark_runs_the_real_fold_and_prints_a_row_per_configuration():
    out = subprocess.run([sys.executable, str(BENCH), "--batch", "4", "--configs", "4:4", "8:4", "--steps", "4",
                          "--blocks", "2", "--flush-mb", "1"], capture_output=True, text=True, timeout=600, check=True)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[:2] for r in rows] == [["| 4", "4"], ["| 8", "4"]], out.stdout
    assert "load average before" in out.stdout and "load average after" in out.stdout
