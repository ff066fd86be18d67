"""Router statistics through the real step ops, on a hand-computed case.

Three real tokens and one CUDA-graph padding row (NaN, as vLLM's profile run feeds), E = 3
experts, top-2. Logits are logs of small integers (plus a per-row shift, which softmax ignores),
so every probability is a fraction of 8 and every renormalised weight a fraction of 7. The
logits go through ``stash_layer`` and ``end_step`` as the capture hooks call them, on both
paths (buffered and folded later, or folded as the layer ends when the step is too long for
the buffers), packed beside a second MoE layer with fewer experts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import vllm.forward_context as fc
from actprune.core.tensor.accumulate import export_state, new_packed_channels, new_packed_routers
from actprune.server import ops

# softmax rows: [1, 2, 5]/8 -> top-2 {2, 1};  [4, 3, 1]/8 -> {0, 1};  [2, 5, 1]/8 -> {1, 0}
LOGITS = torch.tensor([[math.log(1) + 3, math.log(2) + 3, math.log(5) + 3],
                       [math.log(4), math.log(3), math.log(1)],
                       [math.log(2) - 1, math.log(5) - 1, math.log(1) - 1],
                       [float("nan")] * 3], dtype=torch.float64)  # float32 logs would miss 1e-12
PADDING = torch.tensor([False, False, False, True])


def _observe(armed: float, renormalize: bool, rows: int) -> list[dict[str, np.ndarray]]:
    """Two MoE layers of one step: layer 0 routes LOGITS over 3 experts, layer 1 the first two
    columns over 2 experts (packed beside it, its third column unused)."""
    fields, counts, gid, _ = new_packed_channels([4])
    router_fields, states = new_packed_routers([3, 2])
    bufs = ops.StepBuffers.new(fields, counts, gid, torch.tensor(armed), torch.tensor(0.0), rows=rows,
                               long_rows=8, n_layers=2, hidden=4, router_fields=router_fields, top_k=2,
                               renormalize=renormalize)
    # float64 logits into the float32 buffer: the hand-computed sums hold to float32 rounding
    h = torch.zeros(4, 4)
    torch.ops.actprune.stash_layer([], None, h, None, *bufs.stash_args(), [], [], 0, -1, 2, renormalize)
    torch.ops.actprune.stash_layer([h], LOGITS, h, h, *bufs.stash_args(), [0], [0], 1, 0, 2, renormalize)
    torch.ops.actprune.stash_layer([], LOGITS[:, :2], h, h, *bufs.stash_args(), [], [], 2, 1, 2, renormalize)
    torch.ops.actprune.end_step(h, *bufs.end_args())
    bufs.flush()
    return [export_state(st) for st in states]


@pytest.fixture(autouse=True)
def _padded_step(monkeypatch):
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context", lambda: SimpleNamespace(is_padding=PADDING))


@pytest.mark.parametrize("rows", [8, 2], ids=["buffered", "long step"])
@pytest.mark.parametrize(("renormalize", "weights"), [
    (True, [4 / 7 + 2 / 7, 2 / 7 + 3 / 7 + 5 / 7, 5 / 7]),  # norm_topk_prob: over the top-2 only
    (False, [4 / 8 + 2 / 8, 2 / 8 + 3 / 8 + 5 / 8, 5 / 8]),  # the full-softmax probabilities
])
def test_router_stats_count_top_k_and_weights_of_real_tokens_only(renormalize, weights, rows):
    out, two = _observe(1.0, renormalize, rows)
    assert out["count"].shape == () and out["count"] == 3
    np.testing.assert_array_equal(out["topk_count"], [2.0, 3.0, 1.0])
    np.testing.assert_allclose(out["weight_sum"], weights, rtol=1e-6)
    np.testing.assert_allclose(out["prob_sum"], [7 / 8, 10 / 8, 7 / 8], rtol=1e-6)
    # the layer with 2 experts: top-2 of 2 picks both; probabilities [1,2]/3, [4,3]/7, [2,5]/7
    assert two["count"] == 3 and two["topk_count"].shape == (2,)
    np.testing.assert_array_equal(two["topk_count"], [3.0, 3.0])
    np.testing.assert_allclose(two["prob_sum"], [1 / 3 + 4 / 7 + 2 / 7, 2 / 3 + 3 / 7 + 5 / 7], rtol=1e-6)
    np.testing.assert_allclose(two["weight_sum"], two["prob_sum"], rtol=1e-6)  # top-2 of 2: all of it


def test_router_stats_count_nothing_before_capture_is_armed():
    for out in _observe(0.0, True, 8):  # vLLM's warm-up, or paused
        assert out["count"] == 0 and not out["topk_count"].any() and not out["weight_sum"].any()
        assert np.isfinite(out["prob_sum"]).all() and not out["prob_sum"].any()
