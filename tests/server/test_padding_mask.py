"""CUDA-graph padding rows are masked through vLLM's ``is_padding``.

There is no GPU here, so no CUDA graph pads a batch: this test stands in a forward context
(the one fake in this folder) carrying an ``is_padding`` mask, as vLLM's GPU model runner sets
it, and checks that the real custom op folds only the real rows."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import vllm.forward_context as fc
from actprune.core.tensor.accumulate import export_state, new_channel_state
from actprune.server import ops


def _observe(x: torch.Tensor, armed: float) -> dict:
    st = new_channel_state(x.shape[1])
    torch.ops.actprune.observe_channels(
        x, torch.tensor([armed]), st["count"], st["mean"], st["m2"], st["sum"], st["sum_sq"],
        st["sum_abs"], st["max_abs"], st["near_zero"], torch.tensor([0.0]))
    return export_state(st)


def test_padding_rows_and_disarmed_steps_are_not_counted(monkeypatch):
    padded = torch.tensor([False, False, True, True, True, True])  # 2 real rows of a graph of 6
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context", lambda: SimpleNamespace(is_padding=padded))
    x = torch.tensor([[1.0], [3.0], [float("nan")], [1e9], [-1e9], [7.0]])
    out = _observe(x, armed=1.0)
    assert out["count"] == 2 and out["sum"][0] == 4.0 and out["max_abs"][0] == 3.0
    assert ops.valid_rows(6, torch.tensor([1.0])).tolist() == [True, True, False, False, False, False]
    assert _observe(x, armed=0.0)["count"] == 0  # warm-up / paused: nothing counted
