"""CUDA-graph padding rows are masked through vLLM's ``is_padding``.

There is no GPU here, so no CUDA graph pads a batch: this test stands in a forward context
(the one fake in this folder) carrying an ``is_padding`` mask, as vLLM's GPU model runner sets
it, and checks that the real ops fold only the real rows — on both of their paths: a step
short enough for the step buffers (stashed, folded at its end) and a longer one (folded tap by
tap)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import vllm.forward_context as fc
from actprune.core.tensor.accumulate import export_state, new_packed_channels
from actprune.server import forward, ops


def _observe(x: torch.Tensor, armed: float, buffer_rows: int) -> dict:
    (fields, counts, gid, (st,)) = new_packed_channels([x.shape[1]])
    bufs = ops.StepBuffers.new(fields, counts, gid, torch.tensor(armed), torch.tensor(0.0), rows=buffer_rows,
                               long_rows=8, n_layers=1, hidden=1)
    torch.ops.actprune.stash_layer([], None, x, None, *bufs.stash_args(), [], [], 0, -1, 0, False)
    torch.ops.actprune.stash_layer([x], None, x, None, *bufs.stash_args(), [0], [0], 1, -1, 0, False)
    torch.ops.actprune.end_step(x, *bufs.end_args())
    bufs.flush()  # a step of 6 rows waits for more on a CPU
    return export_state(st)


@pytest.mark.parametrize("buffer_rows", [8, 2], ids=["stashed", "tap-by-tap"])
def test_padding_rows_and_disarmed_steps_are_not_counted(monkeypatch, buffer_rows):
    padded = torch.tensor([False, False, True, True, True, True])  # 2 real rows of a graph of 6
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context", lambda: SimpleNamespace(is_padding=padded))
    x = torch.tensor([[1.0], [3.0], [float("nan")], [1e9], [-1e9], [7.0]])
    out = _observe(x, 1.0, buffer_rows)
    assert out["count"] == 2 and out["sum"][0] == 4.0 and out["max_abs"][0] == 3.0
    assert out["m2"][0] == 2.0 and out["sum_sq"][0] == 10.0
    assert forward.valid_rows(6, torch.tensor([1.0])).tolist() == [True, True, False, False, False, False]
    assert _observe(x, 0.0, buffer_rows)["count"] == 0  # warm-up / paused: nothing counted
