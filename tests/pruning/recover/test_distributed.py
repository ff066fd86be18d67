"""`actprune finetune --fsdp` under torchrun (2 CPU processes, gloo) matches one process.

Two ranks with ``--batch-size 1`` train on the same global batch as one process with
``--batch-size 2``; the weights agree to float summation order (gradients are summed over
ranks by the all-reduce rather than inside one matmul), not bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from actprune.client.cli import main as cli
from actprune.pruning.checkpoint.hf_io import load_causal_lm
from actprune.pruning.fixtures.synthetic import build_checkpoint
from safetensors.torch import load_file

_BIN = Path(sys.executable).parent


def _args(model: Path, teacher: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    # Early stopping with patience 9 never stops here, but validation after every step stages
    # each new best (a full-state gather under FSDP) and the output comes from best/.
    return ["finetune", "--model", str(model), "--teacher", str(teacher), "--data", str(data),
            "--text-field", "response", "-o", str(out), "--lr", "1e-3", "--warmup-steps", "1",
            "--batch-size", str(batch_size), "--grad-accum", "2", "--seq-len", "32",
            "--val-fraction", "0.25", "--max-steps", "3", "--eval-every", "1",
            "--early-stop-patience", "9", "--kd-alpha", "0.5"]


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "finetune_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("teacher") / "qwen3", arch="qwen3", seed=7)


@pytest.mark.skipif(not (_BIN / "torchrun").exists(), reason="torchrun is not installed beside python")
def test_two_gloo_processes_train_like_one_process_with_the_global_batch(tiny, teacher, pr_jsonl, tmp_path):
    dist_out, one_out = tmp_path / "fsdp", tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(_BIN / "torchrun"), "--nproc-per-node", "2", "--standalone", str(_BIN / "actprune"),
           *_args(tiny, teacher, pr_jsonl, dist_out, batch_size=1), "--fsdp"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("wrote ") == 1  # rank 0 alone reports (and writes)

    assert cli(_args(tiny, teacher, pr_jsonl, one_out, batch_size=2)) == 0
    got, want = _log(dist_out), _log(one_out)
    assert [e.keys() for e in got] == [e.keys() for e in want]
    for g, w in zip(got, want, strict=True):
        for k, v in w.items():
            assert g[k] == (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v), (k, g, w)
    assert got[-1] == {"kept_step": 3, "kept": "best", "kept_val_objective": got[-1]["kept_val_objective"]}
    assert all("val_kl" in e for e in got if "val_loss" in e)  # the KL to the teacher, all-reduced too
    assert "kd_loss" in got[0]

    a, b = load_file(str(dist_out / "model.safetensors")), load_file(str(one_out / "model.safetensors"))
    start = load_file(str(Path(tiny) / "model.safetensors"))
    assert a.keys() == b.keys() == start.keys()
    moved = max((b[k] - start[k]).abs().max().item() for k in b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"moved {moved:.2e}, fsdp vs one process {worst:.2e}")
    assert moved > 1e-3 and worst < 1e-5, (moved, worst)
    assert type(load_causal_lm(dist_out)).__name__ == "Qwen3ForCausalLM"


def test_fsdp_outside_torchrun_is_a_usage_error(tiny, pr_jsonl, tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    rc = cli(["finetune", "--model", str(tiny), "--data", str(pr_jsonl), "--text-field", "response",
              "-o", str(tmp_path / "x"), "--fsdp"])
    assert rc == 2
    assert "--fsdp runs under torchrun" in capsys.readouterr().err


def test_fsdp_refuses_resume_with_a_usage_error(tiny, pr_jsonl, tmp_path, capsys):
    rc = cli(["finetune", "--model", str(tiny), "--data", str(pr_jsonl), "--text-field", "response",
              "-o", str(tmp_path / "x"), "--fsdp", "--resume"])
    assert rc == 2
    assert "not supported with --fsdp yet" in capsys.readouterr().err
