"""One step through the real ops equals the plain accumulators, however the step is cut.

``fold_step`` folds the step buffers in chunks of ``FOLD_ROWS`` rows (cost, BENCHMARKS.md issue 16)
and the stream buffer holds one slot per layer boundary (slot j + 1: the stream leaving layer j,
which layer j + 1 is given). Neither may change a number: the packed accumulators after a step
of T rows, on both paths of the ops (stashed and folded at the step's end, or folded tap by tap
past the buffer), must equal ``update_channels`` / ``update_block`` on the whole batch. No
forward context: every row is valid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from actprune.core.tensor.accumulate import (
    export_state,
    new_block_state,
    new_channel_state,
    new_packed_channels,
    update_block,
    update_channels,
)
from actprune.server import ops

WIDTHS, LAYERS, HIDDEN = [5, 3], 2, 4


def _step(xs: list[torch.Tensor], streams: list[tuple[torch.Tensor, torch.Tensor | None]], rows: int):
    """One step of T tokens through the ops as the hooks call them: channels of each tap, the
    stream entering layer 0 (slot 0) and leaving each layer (slot j + 1), then the fold."""
    fields, counts, gid, groups = new_packed_channels(WIDTHS)
    t = xs[0].shape[0]
    chan, buf = torch.zeros(rows, sum(WIDTHS)), torch.zeros(rows, LAYERS + 1, HIDDEN)  # (N, L + 1, H)
    scratch, blocks = torch.zeros(t, HIDDEN), torch.zeros(2, LAYERS, dtype=torch.float64)
    armed, thr = torch.tensor(1.0), torch.tensor(0.5)
    zero_gid = torch.zeros(max(WIDTHS), dtype=torch.int32)
    for slot, (h, r) in enumerate(streams):
        if slot < len(xs):  # the channel taps of layer `slot` run between its stream hooks
            offset = sum(WIDTHS[:slot])
            ops.stash_channels(xs[slot], chan, fields, counts, zero_gid, armed, thr, offset, slot)
        ops.stash_stream(h, r, buf, scratch, blocks, armed, slot)
    ops.fold_step(streams[-1][0], chan, buf, fields, counts, gid, blocks, armed, thr)
    return groups, blocks


@pytest.mark.parametrize("t, rows", [(37, 64), (37, 8)], ids=["stashed, 3 chunks", "tap-by-tap"])
def test_a_step_folded_in_row_chunks_equals_one_fold_of_the_whole_batch(t, rows):
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(t, w, generator=g) * 3 + 40 for w in WIDTHS]  # (T, C) of each tap
    xs[0][::5, 0] = 0.1  # near zero, below the threshold
    hs = [torch.randn(t, HIDDEN, generator=g) for _ in range(LAYERS + 1)]  # (T, H) per boundary
    rs = [None] + [torch.randn(t, HIDDEN, generator=g) for _ in range(LAYERS)]  # layer 0: no residual
    groups, blocks = _step(xs, list(zip(hs, rs, strict=True)), rows)

    valid = torch.ones(t, dtype=torch.bool)
    for x, packed in zip(xs, groups, strict=True):
        ref = new_channel_state(x.shape[1])
        update_channels(ref, x, valid, 0.5)
        p, r = export_state(packed), export_state(ref)
        for f in r:
            np.testing.assert_allclose(p[f], r[f], rtol=1e-12, atol=1e-12, err_msg=f)
    stream = [h if r is None else h + r for h, r in zip(hs, rs, strict=True)]  # (T, H) each
    for j in range(LAYERS):  # layer j: from the stream it was given to the one it left
        ref = new_block_state()
        update_block(ref, stream[j], stream[j + 1], valid)
        assert float(blocks[1, j]) == float(ref["count"][0]) == t
        # float32 cosines, compiled or not: equal to float32 rounding
        assert abs(float(blocks[0, j]) - float(ref["cos_sum"][0])) < 1e-6 * t
