"""The streaming accumulators (pure torch), on hand-checked and adversarial inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from actprune.core.tensor.accumulate import (
    export_state,
    fold_blocks,
    fold_packed,
    merge_channels,
    new_block_state,
    new_channel_state,
    new_packed_channels,
    update_block,
    update_channels,
)


def test_update_channels_matches_hand_computed_figures():
    st = new_channel_state(2)
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0], [float("nan"), 5.0]])
    valid = torch.tensor([True, True, False])  # the NaN row is a padding row: masked, not counted
    update_channels(st, x, valid, threshold=0.5)
    out = export_state(st)
    assert out["count"].shape == () and out["count"] == 2
    np.testing.assert_allclose(out["mean"], [2.0, -1.0])
    np.testing.assert_allclose(out["m2"], [2.0, 2.0])  # sum of squared deviations
    np.testing.assert_allclose(out["sum"], [4.0, -2.0])
    np.testing.assert_allclose(out["sum_sq"], [10.0, 4.0])
    np.testing.assert_allclose(out["sum_abs"], [4.0, 2.0])
    np.testing.assert_allclose(out["max_abs"], [3.0, 2.0])
    np.testing.assert_allclose(out["near_zero"], [0.0, 1.0])


def test_batches_merge_to_the_same_state_as_one_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g) * 3 + 7
    one, parts = new_channel_state(5), new_channel_state(5)
    update_channels(one, x, torch.ones(300, dtype=torch.bool), 0.1)
    for chunk in x.split([1, 99, 200]):
        update_channels(parts, chunk, torch.ones(len(chunk), dtype=torch.bool), 0.1)
    a, b = export_state(one), export_state(parts)
    # Deviations within a batch are taken in float32 (the activation's own precision at
    # best), sums and merges in float64: agreement to ~1e-8 relative.
    for f in a:
        np.testing.assert_allclose(a[f], b[f], rtol=1e-7, atol=1e-9, err_msg=f)


def test_merge_channels_of_disjoint_samples_equals_the_union():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 3, generator=g), torch.randn(70, 3, generator=g) + 100
    sa, sb, su = new_channel_state(3), new_channel_state(3), new_channel_state(3)
    update_channels(sa, x, torch.ones(50, dtype=torch.bool), 0.0)
    update_channels(sb, y, torch.ones(70, dtype=torch.bool), 0.0)
    update_channels(su, torch.cat([x, y]), torch.ones(120, dtype=torch.bool), 0.0)
    merge_channels(sa, sb)
    a, u = export_state(sa), export_state(su)
    for f in a:
        np.testing.assert_allclose(a[f], u[f], rtol=1e-7, atol=1e-7, err_msg=f)


@pytest.mark.slow  # 1e8 tokens: ~1 minute on 2 cores
def test_variance_stays_accurate_over_1e8_tokens_with_large_mean():
    """1e8 tokens of mean 1e4, std 1: the naive E[x^2] - E[x]^2 in float64 loses about 8 of
    16 digits to cancellation; the Chan-merged (mean, m2) must match an exact two-pass."""
    batches, rows = 100, 1_000_000

    def batch(k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + k)
        return 1e4 + torch.randn(rows, 1, generator=g) * (1.0 + 0.01 * (k % 7))  # float32

    st = new_channel_state(1)
    ones = torch.ones(rows, dtype=torch.bool)
    total = 0.0
    for k in range(batches):
        xb = batch(k)
        update_channels(st, xb, ones, 0.0)
        total += xb.double().sum().item()
    mean = total / (batches * rows)
    m2 = sum(((batch(k).double() - mean) ** 2).sum().item() for k in range(batches))
    exact_var = m2 / (batches * rows)

    out = export_state(st)
    assert out["count"] == batches * rows
    got_var = out["m2"][0] / out["count"]
    assert abs(got_var - exact_var) / exact_var < 1e-6
    naive = out["sum_sq"][0] / out["count"] - (out["sum"][0] / out["count"]) ** 2
    assert abs(naive - exact_var) / exact_var > abs(got_var - exact_var) / exact_var


def test_update_block_sums_cosines_of_valid_rows_only():
    st = new_block_state()
    h_in = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    h_out = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-5.0, -5.0]])
    update_block(st, h_in, h_out, torch.tensor([True, True, False]))
    out = export_state(st)
    assert out["count"] == 2 and abs(out["cos_sum"] - 1.0) < 1e-6  # float32 cosines


def test_packed_groups_fold_as_separate_groups_even_with_unequal_counts():
    # The server packs every group side by side and folds a step of all of them at once; the
    # gathered count must be each group's own (they differ once one group was folded alone).
    g = torch.Generator().manual_seed(2)
    fields, counts, gid, (pa, pb) = new_packed_channels([3, 5])
    ra, rb = new_channel_state(3), new_channel_state(5)
    alone = torch.randn(4, 3, generator=g) * 2 + 50
    fold_packed([f[:3] for f in fields], counts[:1], torch.zeros(3, dtype=torch.int64), alone,
                torch.ones(4, dtype=torch.bool), 0.1)
    update_channels(ra, alone, torch.ones(4, dtype=torch.bool), 0.1)
    for t in (1, 7, 3):
        x = torch.randn(t + 1, 8, generator=g) * 3 + 20
        x[-1] = float("nan")  # a padding row
        valid = torch.arange(t + 1) < t
        fold_packed(fields, counts, gid, x, valid, 0.1)
        update_channels(ra, x[:, :3], valid, 0.1)
        update_channels(rb, x[:, 3:], valid, 0.1)
    for packed, ref in ((pa, ra), (pb, rb)):
        p, r = export_state(packed), export_state(ref)
        assert p["count"] == r["count"]
        for f in r:
            np.testing.assert_allclose(p[f], r[f], rtol=1e-12, atol=1e-12, err_msg=f)


def test_fold_blocks_equals_update_block_layer_by_layer():
    g = torch.Generator().manual_seed(3)
    h_in, h_out = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)  # (T, L, H)
    valid = torch.tensor([True, True, False, True, True])
    blocks = torch.zeros(2, 3, dtype=torch.float64)
    fold_blocks(blocks, h_in, h_out, valid)
    for j in range(3):
        st = new_block_state()
        update_block(st, h_in[:, j], h_out[:, j], valid)
        assert float(blocks[1, j]) == float(st["count"][0]) == 4
        assert abs(float(blocks[0, j]) - float(st["cos_sum"][0])) < 1e-12
