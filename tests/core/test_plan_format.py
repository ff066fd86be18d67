"""The plan wire format: round trip, versioning and the consistency checks of `Plan.check`."""

from __future__ import annotations

import json

import pytest
from actprune.core.planning.planner import make_plan
from actprune.core.wire.plan import Plan, PlanError
from actprune.core.wire.plan_request import PlanRequest
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


def test_fields_the_slicer_cuts_by_must_equal_the_models_even_when_the_hash_matches(plan):
    chash = config_hash(CFG)
    for edit, field in ((lambda r: r["source"].update(head_dim=4), "head_dim"),
                        (lambda r: r["source"].update(hidden_size=64), "hidden_size"),
                        (lambda r: r["source"]["widths"][0].update(intermediate_size=999), r"widths\[0\]")):
        with pytest.raises(PlanError, match=field):
            Plan.from_json(edited(plan, edit)).validate_for(CFG, chash)


# ---- fuzzing: only PlanError (or success) ever comes out --------------------------------------
def _paths(node, prefix=()):
    """Every place in a plan's JSON a value can be put: keys and the first/last list items."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list) and node:
        for i in {0, len(node) - 1}:
            yield from _paths(node[i], (*prefix, i))


def _fuzz_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.text(max_size=8) | st.floats(allow_nan=True, allow_infinity=True)
               | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2**31, 3_000_000_000, 10**400]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def _get(raw, path):
    for k in path:
        raw = raw[k]
    return raw


def _put(raw, path, value, delete: bool) -> None:
    """Set (or delete) ``raw[path]``; nothing when an earlier edit changed the structure."""
    try:
        node = raw
        for k in path[:-1]:
            node = node[k]
        if delete and isinstance(node, dict):
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass


def test_fuzzed_plan_fields_give_plan_errors_only(plan):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = json.loads(plan.to_json())
    paths = [p for p in _paths(base) if p]
    # Drawn as often as all the rest: the version and source fields, and every number (widths,
    # indices), which small integers put just out of range.
    shallow = [p for p in paths if len(p) <= 2]
    numbers = [p for p in paths if isinstance(_get(base, p), int) and not isinstance(_get(base, p), bool)]
    where = st.sampled_from(shallow) | st.sampled_from(numbers) | st.sampled_from(paths)
    values = st.integers(-2, 64) | st.integers(-(2**70), 2**70) | _fuzz_values()
    chash = config_hash(CFG)

    @settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(where, values, st.sampled_from([False, False, False, True])), min_size=1, max_size=3))
    def run(edits):
        raw = json.loads(json.dumps(base))
        for path, value, delete in edits:
            _put(raw, path, value, delete)
        try:
            text = json.dumps(raw)
        except ValueError:  # 10**400 and friends: json refuses to write them, nothing to test
            return
        try:
            Plan.from_json(text).validate_for(CFG, chash)
        except PlanError as e:
            assert "\n" not in str(e)

    run()
