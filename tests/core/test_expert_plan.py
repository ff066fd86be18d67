"""Expert scores and counts (pure, hand-checked), and the plan format around them: a dense plan
is still the version-1 document older readers know."""

from __future__ import annotations

import json

import numpy as np
import pytest
from actprune.core.planning.experts import EXPERT_STRATEGIES, expert_counts, kept_experts
from actprune.core.planning.planner import make_plan
from actprune.core.wire.plan import Plan, PlanError
from actprune.core.wire.plan_request import PlanRequest
from actprune.pruning.fixtures.synthetic import tiny_config
from pruning_helpers import stats_from_samples

# 10 tokens, top-2 of 4 experts: expert 0 picked 8 times with small weights, expert 3 twice
# with large ones
GROUP = {"count": np.float64(10), "topk_count": np.array([8.0, 6.0, 4.0, 2.0]),
         "weight_sum": np.array([2.0, 3.0, 3.5, 1.5]), "prob_sum": np.array([3.0, 3.0, 2.5, 1.5])}


def test_expert_strategies_are_per_token_weight_and_top_k_share():
    np.testing.assert_allclose(EXPERT_STRATEGIES["router_weighted"](GROUP), [0.2, 0.3, 0.35, 0.15])
    np.testing.assert_allclose(EXPERT_STRATEGIES["frequency"](GROUP), [0.8, 0.6, 0.4, 0.2])
    assert kept_experts(EXPERT_STRATEGIES["router_weighted"](GROUP), 2) == [1, 2]
    assert kept_experts(EXPERT_STRATEGIES["frequency"](GROUP), 2) == [0, 1]
    assert kept_experts(np.array([1.0, 2.0, 2.0, 1.0]), 3) == [0, 1, 2]  # ties keep the lower index
    empty = dict(GROUP, count=np.float64(0), topk_count=np.zeros(4), weight_sum=np.zeros(4))
    assert EXPERT_STRATEGIES["router_weighted"](empty).tolist() == [0.0] * 4  # no traffic: no NaN


def test_expert_counts_keep_top_k_and_whole_multiples():
    assert expert_counts(8, 2, 1) == [2, 3, 4, 5, 6, 7, 8]
    assert expert_counts(128, 8, 16) == [16, 32, 48, 64, 80, 96, 112, 128]
    assert expert_counts(8, 3, 4) == [4, 8]
    assert expert_counts(6, 2, 4) == [4]
    assert expert_counts(4, 2, 8) == []
    assert expert_counts(8, 2, 1, minimum=4) == [4, 5, 6, 7, 8]  # tp_size 4: vLLM needs E' >= 4


def test_a_dense_plan_is_still_a_version_1_document_without_expert_fields():
    cfg = tiny_config("qwen3")
    stats = stats_from_samples(cfg, lambda i, k, w: np.random.default_rng(i).standard_normal((16, w)))
    plan = make_plan(stats, cfg, PlanRequest(mlp_ratio=0.25, strategy="magnitude"), None)
    raw = json.loads(plan.to_json())
    assert raw["format_version"] == 1
    assert all("num_experts" not in w for w in [*raw["widths"], *raw["source"]["widths"]])
    assert all("experts_keep" not in lp for lp in raw["layers"])
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError, match="no routed experts"):
        make_plan(stats, cfg, PlanRequest(expert_ratio=0.25, strategy="magnitude"), None)
