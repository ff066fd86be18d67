"""``keep_layers``: the layers a user keeps whole (LLM-Pruner's layout keeps the first and last
ones) lose nothing and are never dropped, while every ratio and budget still removes its share of
the *whole* model, from the other layers; impossible requests are refused in one line."""

from __future__ import annotations

import pytest
from actprune.core.wire.plan import PlanError
from actprune.pruning.cli.plan import parse_layers
from test_planner import CFG, plan, stats  # noqa: F401  (the module-scoped stats fixture)

N, WIDTH = CFG["num_hidden_layers"], CFG["intermediate_size"]
H, K = CFG["num_attention_heads"], CFG["num_key_value_heads"]


def _whole(p, i: int) -> bool:
    lp = p.layers[i]
    return lp.mlp_keep == list(range(WIDTH)) and lp.heads_keep == list(range(H)) and lp.kv_heads_keep == list(range(K))


def test_an_mlp_ratio_is_taken_from_the_other_layers_and_still_counts_the_whole_model(stats):  # noqa: F811
    p = plan(stats, mlp_ratio=0.25, keep_layers=[0, -1])
    assert _whole(p, 0) and _whole(p, N - 1)
    widths = [w.intermediate_size for w in p.widths]
    assert widths == [WIDTH, WIDTH // 2, WIDTH // 2, WIDTH]  # 0.25 of 4 layers' neurons = half of the two free ones
    for per_layer in ({"per_layer": True}, {"per_layer": True, "layer_sensitivity": [1.0, 1.0, 4.0, 1.0]}):
        p = plan(stats, mlp_ratio=0.25, keep_layers=[3, 0], **per_layer)
        widths = [w.intermediate_size for w in p.widths]
        assert widths[0] == widths[3] == WIDTH and sum(widths) == round(0.75 * N * WIDTH), widths
    # without it the same ratio is spread over every layer
    assert [w.intermediate_size for w in plan(stats, mlp_ratio=0.25).widths] == [72] * N


def test_heads_and_the_uniform_parameter_split_leave_kept_layers_whole(stats):  # noqa: F811
    p = plan(stats, head_ratio=0.25, keep_layers=[1, 2])
    assert _whole(p, 1) and _whole(p, 2)
    assert [w.num_key_value_heads for w in p.widths] == [2, K, K, 2]  # a quarter of all 16 KV groups
    free = plan(stats, param_ratio=0.1)
    kept = plan(stats, param_ratio=0.1, keep_layers=[0])
    assert _whole(kept, 0) and not _whole(free, 0)
    for p in (free, kept):  # the same share of the model goes, within one MLP step per layer
        assert abs((1 - p.params_after / p.params_before) - 0.1) < 0.01


def test_the_measured_budget_allocation_skips_kept_layers_and_refuses_what_they_leave_too_small(stats):  # noqa: F811
    req = dict(param_ratio=0.1, layer_sensitivity=[1.0] * N, head_sensitivity=[10.0, 10.0, 10.0, 1e-4],
               sensitivity_at={"mlp": 0.25, "attn": 0.25})
    p = plan(stats, **req)
    assert p.widths[3].num_key_value_heads == 2  # layer 3's attention is the cheapest: it gives heads
    p = plan(stats, **req, keep_layers=[3])
    assert _whole(p, 3)
    assert 0.09 <= 1 - p.params_after / p.params_before <= 0.1 + 1e-9
    with pytest.raises(PlanError, match="give up at most"):  # one layer cannot hold 30 % of the model
        plan(stats, **{**req, "param_ratio": 0.3}, keep_layers=[0, 1, 2], head_cap=0.0)


def test_kept_layers_are_never_dropped(stats):  # noqa: F811
    # block influence: layer 2 (cos 0.99) changes the stream least, then layer 3 (0.7)
    assert plan(stats, drop_layers=1).dropped_layers == [2]
    assert plan(stats, drop_layers=1, keep_layers=[2]).dropped_layers == [3]
    with pytest.raises(PlanError, match="keep_layers keeps 2 whole"):
        plan(stats, drop_layers=3, keep_layers=[0, 1])


def test_impossible_keep_layers_are_refused_in_one_line(stats):  # noqa: F811
    with pytest.raises(PlanError, match="has no layer 4"):
        plan(stats, mlp_ratio=0.1, keep_layers=[4])
    with pytest.raises(PlanError, match="has no layer -5"):
        plan(stats, mlp_ratio=0.1, keep_layers=[-5])
    with pytest.raises(PlanError, match="outside keep_layers hold 96"):  # 0.3 of 384 neurons from one layer
        plan(stats, mlp_ratio=0.3, keep_layers=[0, 1, 2])
    with pytest.raises(PlanError, match="heads"):
        plan(stats, head_ratio=0.5, keep_layers=[0, 1, 2, 3])
    assert plan(stats, keep_layers=[0, 1, 2, 3]).params_after == plan(stats).params_after  # nothing asked: fine


def test_the_cli_reads_indices_ranges_and_indices_from_the_end():
    from actprune.core.errors import UsageError

    assert parse_layers("0-3,28,-2,-1") == [0, 1, 2, 3, 28, -2, -1]
    assert parse_layers(" 5 ") == [5]
    for bad in ("3-1", "a", "1-", "0,,1"):
        with pytest.raises(UsageError, match="--keep-layers"):
            parse_layers(bad)
