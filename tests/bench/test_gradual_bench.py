"""bench/gradual.py: the two schedules differ only in their schedule — same data, same optimizer
steps, same recovery — and their command lines are ones `actprune iterate` accepts."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gradual  # noqa: E402
from actprune.pruning.cli import iterate as iterate_cli  # noqa: E402


def _args(cmd: list[str]) -> dict:
    import argparse

    p = argparse.ArgumentParser()
    iterate_cli.configure(p)
    return vars(p.parse_args(cmd[2:]))  # after the executable and the subcommand


def test_gradual_and_oneshot_train_the_same_steps_on_the_same_data(tmp_path):
    ns = Namespace(budget=16384, lr=1e-4, calibration_tokens=4096, eval_tokens=1024)
    cmds = {row: gradual.iterate_args(row, ns, tmp_path / "dense", tmp_path / "d.jsonl", tmp_path / "v.jsonl",
                                      tmp_path / row) for row in gradual.SCHEDULES}
    parsed = {row: _args(c) for row, c in cmds.items()}
    assert parsed["gradual"]["ratios"] == [0.2, 0.3, 0.4] and parsed["oneshot"]["ratios"] == [0.4]
    total = {row: a["finetune_steps"] * len(a["ratios"]) for row, a in parsed.items()}
    assert total["gradual"] == total["oneshot"] == 3 * 16384 // 1024
    for a in parsed.values():
        ft = json.loads(a["finetune_config"])
        assert ft["teacher_topk"] == 64 and ft["kd_alpha"] == 1.0 and ft["lr"] == 1e-4
        assert a["train_data"] == str(tmp_path / "d.jsonl") and a["refit"] and a["per_layer"]
    same = {k for k in parsed["gradual"] if parsed["gradual"][k] == parsed["oneshot"][k]}
    assert set(parsed["gradual"]) - same == {"ratios", "finetune_steps", "finetune_config", "output"}
