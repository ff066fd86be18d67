"""The router op (``actprune::observe_router``) and its accumulator on a hand-computed case.

Three real tokens and one CUDA-graph padding row (NaN, as vLLM's profile run feeds), E = 3
experts, top-2. Logits are logs of small integers (plus a per-row shift, which softmax ignores),
so every probability is a fraction of 8 and every renormalised weight a fraction of 7."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import vllm.forward_context as fc
from actprune.core.tensor.accumulate import export_state, new_router_state
from actprune.server import ops  # noqa: F401  (registers torch.ops.actprune.*)

# softmax rows: [1, 2, 5]/8 -> top-2 {2, 1};  [4, 3, 1]/8 -> {0, 1};  [2, 5, 1]/8 -> {1, 0}
LOGITS = torch.tensor([[math.log(1) + 3, math.log(2) + 3, math.log(5) + 3],
                       [math.log(4), math.log(3), math.log(1)],
                       [math.log(2) - 1, math.log(5) - 1, math.log(1) - 1],
                       [float("nan")] * 3], dtype=torch.float64)  # float32 logs would miss 1e-12
PADDING = torch.tensor([False, False, False, True])


def _observe(armed: float, renormalize: bool) -> dict[str, np.ndarray]:
    st = new_router_state(3)
    torch.ops.actprune.observe_router(LOGITS, torch.tensor([armed]), st["count"], st["topk_count"],
                                      st["weight_sum"], st["prob_sum"], 2, renormalize)
    return export_state(st)


@pytest.fixture(autouse=True)
def _padded_step(monkeypatch):
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context", lambda: SimpleNamespace(is_padding=PADDING))


@pytest.mark.parametrize(("renormalize", "weights"), [
    (True, [4 / 7 + 2 / 7, 2 / 7 + 3 / 7 + 5 / 7, 5 / 7]),  # norm_topk_prob: over the top-2 only
    (False, [4 / 8 + 2 / 8, 2 / 8 + 3 / 8 + 5 / 8, 5 / 8]),  # the full-softmax probabilities
])
def test_router_op_counts_top_k_and_weights_of_real_tokens_only(renormalize, weights):
    out = _observe(1.0, renormalize)
    assert out["count"].shape == () and out["count"] == 3
    np.testing.assert_array_equal(out["topk_count"], [2.0, 3.0, 1.0])
    np.testing.assert_allclose(out["weight_sum"], weights, rtol=1e-12)
    np.testing.assert_allclose(out["prob_sum"], [7 / 8, 10 / 8, 7 / 8], rtol=1e-12)


def test_router_op_counts_nothing_before_capture_is_armed():
    out = _observe(0.0, True)  # vLLM's warm-up, or paused
    assert out["count"] == 0 and not out["topk_count"].any() and not out["weight_sum"].any()
    assert np.isfinite(out["prob_sum"]).all() and not out["prob_sum"].any()
