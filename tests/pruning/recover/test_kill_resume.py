"""A fine-tuning process killed with SIGKILL resumes to bit-identical weights."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from actprune.client.cli import main as cli
from safetensors.torch import load_file

_RUN = "import sys; from actprune.client.cli import main; sys.exit(main())"


@pytest.mark.slow
def test_sigkilled_finetune_resumes_bit_identically(tiny, pr_jsonl, tmp_path, capsys):
    def args(out):
        return ["finetune", "--model", str(tiny), "--data", str(pr_jsonl), "--text-field", "response",
                "-o", str(out), "--max-steps", "16", "--save-every", "1", "--warmup-steps", "3",
                "--lr", "3e-3", "--batch-size", "2", "--seq-len", "32", "--val-fraction", "0.25",
                "--eval-every", "5"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _RUN, *args(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoints" / "step-000004").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()

    assert cli([*args(killed), "--resume"]) == 0
    m = re.search(r"resumed from \S+ \(step (\d+)\)", capsys.readouterr().out)
    assert m and 4 <= int(m.group(1)) < 16  # it continued, it did not start over
    full = tmp_path / "full"
    assert cli(args(full)) == 0
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
