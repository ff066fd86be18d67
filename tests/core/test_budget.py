"""Whole-model budget: the allocation takes parameters where the modelled loss per parameter is
least, never overshoots the budget, respects caps and GQA steps, and make_plan with measured
head and MLP sensitivities gives heads to the layers whose attention matters least."""

from __future__ import annotations

import pytest
from actprune.core.planning.budget import Pool, allocate_budget
from actprune.core.wire.plan_request import PlanRequest
from test_planner import CFG, plan, stats  # noqa: F401  (the module-scoped stats fixture)


def _mlp(n: int, per: int, delta: float, at: float = 0.5) -> Pool:
    counts = list(range(0, n + 1))
    return Pool(counts, [c * per for c in counts], [1 - c / n for c in counts], delta, at)


def test_allocation_follows_the_lagrangian_optimum_on_fine_pools():
    # cost Δ (p/p0)², equal sizes: removed fraction ∝ 1/Δ (p0 equal)
    pools = [_mlp(100, 1, 1.0), _mlp(100, 1, 4.0)]
    kept = allocate_budget(pools, 50)
    assert 100 - kept[0] == 40 and 100 - kept[1] == 10


def test_coarse_steps_that_do_not_fit_are_skipped_and_fine_pools_fill_in():
    heads = Pool([1, 2, 3], [100, 200, 300], [2 / 3, 1 / 3, 0.0], 0.001, 1 / 3)  # cheap but coarse
    mlp = _mlp(100, 1, 10.0)
    kept = allocate_budget([heads, mlp], 150)
    assert kept[0] == 2 and 100 - kept[1] == 50  # one group (100), then 50 neurons; never over budget
    assert allocate_budget([heads, mlp], 1000) == [1, 10]  # cap 0.9 of the MLP; heads down to one group


def test_zero_or_negative_sensitivity_does_not_gut_a_layer_beyond_the_cap():
    kept = allocate_budget([_mlp(10, 1, -1.0), _mlp(10, 1, 1.0)], 12, cap=0.5)
    assert kept[0] == 5 and sum(10 - k for k in kept) <= 12
    # by default a pool loses at most twice the fraction its Δ was measured at
    kept = allocate_budget([_mlp(10, 1, -1.0, at=0.2), _mlp(10, 1, 1.0, at=0.2)], 6)
    assert kept == [6, 8]


def test_make_plan_gives_heads_where_attention_matters_least(stats):  # noqa: F811
    n = CFG["num_hidden_layers"]
    head_sens = [10.0, 10.0, 10.0, 1e-4]  # layer 3's attention is nearly free
    req = dict(param_ratio=0.1, layer_sensitivity=[1.0] * n, head_sensitivity=head_sens,
               sensitivity_at={"mlp": 0.25, "attn": 0.25})
    p = plan(stats, **req)
    assert [w.num_key_value_heads for w in p.widths] == [4, 4, 4, 2]  # at most 2 × the measured 25 %
    assert len(p.layers[3].heads_keep) == 4  # whole KV groups (2 query heads each)
    removed = 1 - p.params_after / p.params_before
    assert 0.09 <= removed <= 0.1 + 1e-9
    assert [w.num_key_value_heads for w in plan(stats, **{**req, "head_sensitivity": [10.0] * n}).widths] == [4] * 4
    with pytest.raises(ValueError, match="sensitivity_at"):
        PlanRequest(param_ratio=0.1, layer_sensitivity=[1.0] * n, head_sensitivity=head_sens)
    with pytest.raises(ValueError, match="param_ratio"):
        PlanRequest(mlp_ratio=0.1, per_layer=True, layer_sensitivity=[1.0] * n, head_sensitivity=head_sens)


def test_the_budget_is_met_past_the_pools_limits_when_it_cannot_be_met_within_them():
    from actprune.core.planning.budget import Pool, allocate_budget

    # two pools of 10 units, 10 parameters each; measured at 10 %: limits of 20 % (2 units)
    pools = [Pool(list(range(11)), [10 * c for c in range(11)], [1 - c / 10 for c in range(11)], d, 0.1)
             for d in (1.0, 2.0)]
    assert allocate_budget(pools, 40) == [8, 8]  # within the limits
    kept = allocate_budget(pools, 100)  # 5 units: past the limits, the cheaper pool first
    assert sum(10 - k for k in kept) * 10 == 100 and kept[0] <= kept[1], kept


def test_an_explicit_cap_holds_even_when_the_budget_cannot_be_met_within_the_limits():
    pools = [Pool(list(range(11)), [10 * c for c in range(11)], [1 - c / 10 for c in range(11)], d, 0.1, cap)
             for d, cap in ((1.0, 0.0), (2.0, None))]
    kept = allocate_budget(pools, 50)
    assert kept == [10, 5]  # the capped pool gives nothing; the other goes past its 20 % limit


def test_head_cap_zero_spends_the_whole_budget_on_mlp_neurons(stats):  # noqa: F811
    n = CFG["num_hidden_layers"]
    req = dict(param_ratio=0.1, layer_sensitivity=[1.0] * n, head_sensitivity=[10.0, 10.0, 10.0, 1e-4],
               sensitivity_at={"mlp": 0.25, "attn": 0.25})
    p = plan(stats, **req, head_cap=0.0)
    assert [w.num_attention_heads for w in p.widths] == [CFG["num_attention_heads"]] * n
    assert 0.09 <= 1 - p.params_after / p.params_before <= 0.1 + 1e-9
    with pytest.raises(ValueError, match="head_cap"):
        PlanRequest(mlp_ratio=0.1, head_cap=0.0)
