"""summarize(): hand-checked figures on a tiny snapshot, strict JSON, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from actprune.core.summary import summarize
from actprune.core.wire.api import StatsSummary
from actprune.core.wire.stats import StatsFormatError
from raw_samples import RawLayer, stats_from_raw


def _tiny(head_dim: int | None = 2):
    # 4 tokens; MLP neurons: 0 always zero, 1 = +-1, 2 = 3, 3 = zero on 3 of 4 tokens
    mlp = np.array([[0, 1, 3, 0], [0, -1, 3, 0], [0, 1, 3, 0], [0, -1, 3, 8]], dtype=np.float64)
    # attention channels, 2 heads of 2: head 0 |x| = 2 and 4, head 1 |x| = 1 and 1
    attn = np.array([[2, -4, 1, 1]] * 4, dtype=np.float64)
    return stats_from_raw([RawLayer(mlp=mlp, attn=attn, cos=np.array([1.0, 0.5, 0.5, 1.0]))], head_dim=head_dim)


def test_summary_figures_are_the_hand_computed_ones():
    s = summarize(_tiny(), k=2)
    (layer,) = s.layers
    assert layer.tokens == 4 and layer.block_influence == pytest.approx(0.25)
    assert (layer.mlp.mean_abs.min, layer.mlp.mean_abs.mean, layer.mlp.mean_abs.max) == (0, 1.5, 3)
    assert layer.mlp.std.max == pytest.approx(np.std([0, 0, 0, 8]))
    assert layer.mlp.sparsity.max == 1.0 and layer.mlp.sparsity.mean == pytest.approx((1 + 0.75) / 4)
    assert layer.mlp.frac_sparse_90 == 0.25  # only neuron 0 is more than 90% sparse
    assert [(u.index, u.score) for u in layer.mlp.least_important] == [(0, 0.0), (1, 1.0)]
    assert layer.mlp.max_abs == 8
    h = layer.heads
    assert h is not None and (h.num_heads, h.head_dim) == (2, 2)
    assert h.mean_abs == [3.0, 1.0] and [u.index for u in h.least_important] == [1, 0]
    assert s.score == "mean_abs" and s.tokens == 4 and s.meta.model == "tiny/qwen3"


def test_summary_is_strict_json_even_for_a_layer_that_saw_no_token():
    empty = np.zeros((0, 4))
    stats = stats_from_raw([RawLayer(mlp=empty, attn=empty, cos=np.zeros(0))], head_dim=2, decode_share=0)
    s = summarize(stats)
    assert s.layers[0].block_influence is None and s.layers[0].tokens == 0
    text = json.dumps(s.model_dump(mode="json"), allow_nan=False)
    assert StatsSummary.model_validate_json(text) == s


def test_heads_need_head_dim_and_it_must_divide_the_width():
    assert summarize(_tiny(head_dim=None)).layers[0].heads is None
    assert summarize(_tiny(head_dim=None), head_dim=4).layers[0].heads.num_heads == 1
    with pytest.raises(StatsFormatError, match="not a multiple of head_dim 3"):
        summarize(_tiny(head_dim=3))


def test_k_is_capped_by_the_number_of_units_and_never_negative():
    layer = summarize(_tiny(), k=100).layers[0]
    assert len(layer.mlp.least_important) == 4 and len(layer.heads.least_important) == 2
    assert summarize(_tiny(), k=0).layers[0].mlp.least_important == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        summarize(_tiny(), k=-1)
