"""bench/decode_throughput.py --checkpoint: a pruned checkpoint served as it is, its parameters
counted from the safetensors headers like every other model of the table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import decode_throughput  # noqa: E402
import machine  # noqa: E402
from actprune.core.tensor.checkpoint import ShardIndex  # noqa: E402
from actprune.pruning.fixtures.synthetic import build_checkpoint  # noqa: E402


@pytest.mark.parametrize("tied", [True, False], ids=["tied embeddings", "own lm_head"])
def test_stored_parameters_equal_the_models_own_count(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    ckpt = build_checkpoint(tmp_path / "m", "llama", tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    # parameters() yields a tied embedding once: so must the headers' count
    assert ShardIndex(ckpt).parameters() == sum(p.numel() for p in model.parameters())


def _parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", action="append", default=[])
    ap.add_argument("--source", type=Path, default=None)
    return ap, ap.parse_args(argv)


def test_checkpoints_given_by_name(tmp_path):
    a, b = build_checkpoint(tmp_path / "a"), build_checkpoint(tmp_path / "b")
    ap, args = _parse(["--source", str(a), "--checkpoint", f"c20={b}", "--checkpoint", f"same={a}"])
    assert decode_throughput.checkpoints_given(ap, args) == {"c20": b, "same": a}


@pytest.mark.parametrize("argv, says", [
    (["--checkpoint", "c20"], "expected NAME=DIR"),
    (["--checkpoint", "base={d}"], "'base' is taken"),
    (["--checkpoint", "mlp25={d}"], "'mlp25' is taken"),
    (["--checkpoint", "x={d}", "--checkpoint", "x={d}"], "'x' is taken"),
    (["--checkpoint", "x={d}/nowhere"], "has no config.json"),
    (["--checkpoint", "x={d}"], "--checkpoint needs --source"),
])
def test_checkpoint_mistakes_are_one_line_errors(tmp_path, capsys, argv, says):
    d = build_checkpoint(tmp_path / "d")
    argv = [a.format(d=d) for a in argv]
    if "needs --source" not in says:
        argv += ["--source", str(d)]
    ap, args = _parse(argv)
    with pytest.raises(SystemExit) as e:
        decode_throughput.checkpoints_given(ap, args)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_settle_waits_for_a_quiet_window_or_gives_up(monkeypatch):
    # busy seconds since boot, read twice a window: 2 cores busy, then 1, then 0.1 (quiet)
    reads = iter([0.0, 10.0, 10.0, 15.0, 15.0, 15.5])
    monkeypatch.setattr(machine, "machine_busy_seconds", lambda: next(reads))
    monkeypatch.setattr(machine.time, "sleep", lambda s: None)
    assert machine.settle(window_s=5.0) == pytest.approx(0.1)
    reads = iter([0.0, 10.0] * 3)  # never quiet: one window past the timeout
    clock = iter([0.0, 1.0, 2.0, 99.0])
    monkeypatch.setattr(machine, "machine_busy_seconds", lambda: next(reads))
    monkeypatch.setattr(machine.time, "monotonic", lambda: next(clock))
    assert machine.settle(window_s=5.0, timeout_s=50.0) == pytest.approx(2.0)
