"""An MoE layer in the stats file: the ``router`` group round-trips exactly, is validated, merges
by adding, and is summarised per expert (hand-checked figures)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from actprune.client.stats_cli import format_layer, format_table
from actprune.core.summary import summarize
from actprune.core.wire.api import StatsSummary
from actprune.core.wire.stats import Stats, StatsFormatError
from actprune.core.wire.stats_merge import merge
from raw_samples import RawLayer, stats_from_raw

BIG = float(2**24 + 1)  # a count float32 cannot hold exactly


def _moe(count: float = 4.0) -> Stats:
    """Layer 0 dense, layer 1 MoE: 4 tokens routed top-2 among 3 experts."""
    x = np.arange(16, dtype=np.float64).reshape(4, 4)
    raw = [RawLayer(mlp=x, attn=x, cos=np.ones(4)) for _ in range(2)]
    stats = stats_from_raw(raw, head_dim=2)
    tensors = {k: v for k, v in stats.tensors.items() if not k.startswith("layers.1.mlp.")}
    tensors.update({"layers.1.router.count": np.asarray(count), "layers.1.router.topk_count": np.array([4.0, 3, 1]),
                    "layers.1.router.weight_sum": np.array([2.0, 1.5, 0.5]),
                    "layers.1.router.prob_sum": np.array([1.8, 1.5, 0.7])})
    return Stats(tensors=tensors, meta=stats.meta)


def test_router_counts_round_trip_exactly_beyond_float32():
    s = _moe(count=BIG)
    s.tensors["layers.1.router.topk_count"] = np.array([BIG, BIG - 2, 1.0])
    back = Stats.from_bytes(s.to_bytes())
    assert back.router(0) is None
    assert float(back.router(1)["count"]) == BIG
    np.testing.assert_array_equal(back.router(1)["topk_count"], [BIG, BIG - 2, 1.0])
    assert back.router(1)["weight_sum"].dtype == np.float64


@pytest.mark.parametrize(("name", "value", "match"), [
    ("layers.1.mlp.count", np.asarray(4.0), "both mlp and router"),
    ("layers.1.router.topk_count", np.array([5.0, 2, 1]), "not counts of 4 tokens"),  # > count
    ("layers.1.router.topk_count", np.array([3.5, 3, 1.5]), "not counts"),
    ("layers.1.router.weight_sum", np.array([1.0, 1.0]), "one width"),
    ("layers.1.router.prob_sum", np.array([1.0, -1.0, 1.0]), "finite values >= 0"),
    ("layers.1.router.weight_sum", np.array([2.0, 1.5, 0.5], dtype=np.float32), "float64"),
    ("layers.1.router.count", np.array([4.0]), "scalar"),
])
def test_a_malformed_router_group_is_refused_naming_it(name, value, match):
    s = _moe()
    s.tensors[name] = value
    with pytest.raises(StatsFormatError, match=match):
        s.validate()


def test_routers_merge_by_adding_and_a_dense_layer_never_merges_with_an_moe_one():
    m = merge([_moe(), _moe()])
    np.testing.assert_array_equal(m.router(1)["topk_count"], [8.0, 6, 2])
    assert float(m.router(1)["count"]) == 8 and float(m.group(0, "mlp")["count"]) == 8
    dense = stats_from_raw([RawLayer(mlp=np.ones((4, 4)), attn=np.ones((4, 4)), cos=np.ones(4))] * 2, head_dim=2)
    with pytest.raises(StatsFormatError, match="layer 1 routes to different experts"):
        merge([_moe(), dense])


def test_summary_gives_each_expert_s_frequency_and_mean_weight():
    s = summarize(_moe(), k=2)
    dense, moe = s.layers
    assert dense.experts is None and dense.mlp is not None
    assert moe.mlp is None and moe.tokens == 4
    e = moe.experts
    assert e.num_experts == 3 and e.frequency == [1.0, 0.75, 0.25]
    assert e.mean_weight == [0.5, 0.5, 0.5]
    assert [u.index for u in e.least_used] == [2, 1]  # weight per token 0.125, 0.375
    assert "3E" in format_table(s).splitlines()[-1]  # `actprune stats show`: experts, not neurons
    assert "experts (3)" in format_layer(moe) and "MLP neurons" not in format_layer(moe)
    unused = _moe(count=0.0)  # no token yet: nulls, and the answer stays strict JSON
    unused.tensors.update({f"layers.1.router.{f}": np.zeros(3) for f in ("topk_count", "weight_sum", "prob_sum")})
    empty = summarize(unused)
    assert empty.layers[1].experts.frequency == [None] * 3
    assert StatsSummary.model_validate_json(json.dumps(empty.model_dump(mode="json"), allow_nan=False)) == empty
