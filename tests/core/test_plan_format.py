"""The plan wire format: round trip, versioning and the consistency checks of `Plan.check`."""

from __future__ import annotations

import json

import pytest
from actprune.core.planning.planner import make_plan
from actprune.core.wire.plan import Plan, PlanError, PlanRequest
from actprune.core.wire.stats import config_hash
from actprune.pruning.fixtures.synthetic import tiny_config
from pruning_helpers import stats_from_samples

CFG = tiny_config("qwen2", num_attention_heads=8, num_key_value_heads=4, head_dim=8)


@pytest.fixture(scope="module")
def plan() -> Plan:
    import numpy as np

    stats = stats_from_samples(CFG, lambda i, k, w: np.random.default_rng(i).standard_normal((16, w)))
    return make_plan(stats, CFG, PlanRequest(mlp_ratio=0.25, head_ratio=0.5, strategy="importance"), None)


def edited(plan: Plan, fn) -> str:
    raw = json.loads(plan.to_json())
    fn(raw)
    return json.dumps(raw)


def test_plan_round_trips_through_json_and_file(plan, tmp_path):
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.load(plan.save(tmp_path / "p.json")) == plan


def test_newer_format_version_asks_for_an_upgrade(plan):
    with pytest.raises(PlanError, match="upgrade actprune"):
        Plan.from_json(edited(plan, lambda r: r.update(format_version=99)))


def test_uneven_query_heads_per_kv_group_are_rejected(plan):
    def uneven(r):
        r["layers"][0]["heads_keep"] = [0, 1, 2]  # group 0 keeps 2, group 1 keeps 1
        r["layers"][0]["kv_heads_keep"] = [0, 1]

    with pytest.raises(PlanError, match="unequal numbers of query heads"):
        Plan.from_json(edited(plan, uneven))


def test_out_of_range_and_unsorted_indices_are_named(plan):
    with pytest.raises(PlanError, match="layer 1 mlp_keep has index 999"):
        Plan.from_json(edited(plan, lambda r: r["layers"][1]["mlp_keep"].append(999)))
    with pytest.raises(PlanError, match="sorted and unique"):
        Plan.from_json(edited(plan, lambda r: r["layers"][1]["mlp_keep"].reverse()))


def test_widths_must_agree_with_keep_lists(plan):
    with pytest.raises(PlanError, match="widths"):
        Plan.from_json(edited(plan, lambda r: r["widths"][0].update(intermediate_size=1)))


def test_plan_is_checked_against_the_model_config(plan):
    plan.validate_for(CFG, config_hash(CFG))
    other = dict(CFG, intermediate_size=512)
    with pytest.raises(PlanError, match="config hash"):
        plan.validate_for(other, config_hash(other))
    with pytest.raises(PlanError, match="plan is for Qwen2ForCausalLM"):
        plan.validate_for(tiny_config("llama"), config_hash(tiny_config("llama")))
