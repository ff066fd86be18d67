"""compress's candidates (pure parts): the rows split (fit rows first, validation after them;
adapted when the data is short, refused below probe + validation rows), the candidates'
requests at one budget, and the choice (lowest validation loss; over several validation
sets, the lowest mean loss above the dense model's)."""

from __future__ import annotations

import pytest
from actprune.core.archs import LayerShape, ModelShape
from actprune.pruning.candidates import (
    CANDIDATES,
    TWINS,
    Split,
    candidate_requests,
    check_names,
    choose,
    end_layers,
    excess_loss,
    figures,
    head_probe_requests,
    mlp_params,
    needs_model_delta,
    scores,
    select,
    split_rows,
    table,
)

SHAPE = ModelShape(hidden_size=64, vocab_size=100, head_dim=16, layers=(LayerShape(96, 8, 4),) * 4,
                   tie_word_embeddings=True, qkv_bias=False, qk_norm=False, dtype_bytes=4)


def test_choose_takes_the_lowest_validation_loss_and_the_first_of_ties():
    assert choose({"budget": 2.5, "heads-capped": 2.1, "mlp": 2.3}) == "heads-capped"
    assert choose({"budget": 2.0, "mlp": 1.9}) == "mlp"
    assert choose({"budget": 2.0, "mlp": 2.0}) == "budget"
    with pytest.raises(ValueError):
        choose({})


def test_choose_keeps_the_preferred_candidate_unless_another_wins_by_more_than_the_margin():
    assert choose({"budget": 2.0, "heads-capped": 1.995, "mlp": 2.004}, prefer="mlp") == "mlp"
    assert choose({"budget": 2.0, "heads-capped": 1.98, "mlp": 2.004}, prefer="mlp") == "heads-capped"
    assert choose({"budget": 2.0, "heads-capped": 1.98, "mlp": 2.004}, prefer="mlp", margin=0.05) == "mlp"
    assert choose({"budget": 2.0, "heads-capped": 1.995}, prefer="mlp") == "heads-capped"  # no mlp candidate
    assert choose({"heads-capped": 1.995, "mlp": 2.004}) == "heads-capped"  # no preference: the lowest
    # several preferred (the MLP-only candidates): the lowest of them, against the margin
    both = ("mlp", "mlp-ends")
    assert choose({"heads-capped": 1.995, "mlp": 2.004, "mlp-ends": 2.001}, prefer=both) == "mlp-ends"
    assert choose({"heads-capped": 1.98, "mlp": 2.004, "mlp-ends": 1.985}, prefer=both) == "mlp-ends"
    assert choose({"heads-capped": 1.98, "mlp": 2.004, "mlp-ends": 2.0}, prefer=both) == "heads-capped"


def test_excess_loss_weighs_each_validation_set_the_same():
    dense = {"--data": 2.0, "code": 3.0}
    # in domain a is better by 0.1; out of domain b is better by 0.3: b wins on the mean
    a, b = {"--data": 2.1, "code": 3.6}, {"--data": 2.2, "code": 3.3}
    assert excess_loss(a, dense) == pytest.approx(0.35) and excess_loss(b, dense) == pytest.approx(0.25)
    assert choose({"a": excess_loss(a, dense), "b": excess_loss(b, dense)}) == "b"
    # one set: the same order as the loss itself
    assert excess_loss({"--data": 2.1}, {"--data": 2.0}) < excess_loss({"--data": 2.2}, {"--data": 2.0})
    with pytest.raises(KeyError):
        excess_loss({"--data": 2.1}, dense)
    with pytest.raises(ValueError):
        excess_loss({}, {})


def test_the_record_scores_and_tabulates_each_candidate_against_the_dense_model():
    import math

    record = {"validation": {"rows": [24, 32]}, "dense": figures({"--data": 2.0, "code.txt": 3.0}),
              "candidates": {"heads-capped": figures({"--data": 2.30, "code.txt": 3.50}),
                             "mlp": figures({"--data": 2.31, "code.txt": 3.495})}}
    for r in record["candidates"].values():
        r.update(params_before=1000, params_after=800)
    got = scores(record, ["heads-capped", "mlp"])
    assert got == pytest.approx({"heads-capped": 0.4, "mlp": 0.4025})
    lines = table(record, ["heads-capped", "mlp"], "mlp")
    assert lines[0].startswith("candidates, validation perplexity on rows 24–31 of --data (dense 7.389)")
    assert "[1] code.txt" in lines[0] and "mean × dense" in lines[1]
    row = {ln[2:].split()[0]: ln for ln in lines[2:4]}
    assert row["mlp"].startswith("* mlp") and row["heads-capped"].startswith("  heads-capped")
    # × dense per set and their geometric mean
    want = [f"{math.exp(x):.3f}" for x in (0.3, 0.5, 0.4)]
    assert row["heads-capped"].split()[-3:] == want
    assert "200 (20.0%)" in row["mlp"]
    assert lines[4] == ("  mlp kept: heads-capped validates better by 0.25%, within the 1% a candidate that prunes "
                        "heads must win by")
    assert len(table(record, ["heads-capped", "mlp"], "heads-capped")) == 4  # the lowest chosen: no reason line


def _uniform(kv: list[int], per_group: int, lose_head_in: int | None = None):
    """A stand-in for a uniform Plan: layer i has kv[i] KV groups of per_group query heads."""
    from types import SimpleNamespace as NS

    widths = [NS(num_attention_heads=k * per_group, num_key_value_heads=k) for k in kv]
    layers = [NS(index=i, heads_keep=list(range(k * per_group - (i == lose_head_in)))) for i, k in enumerate(kv)]
    return NS(source=NS(widths=widths), layers=layers)


def test_head_probes_take_one_unit_from_every_layer_whatever_its_unit_count():
    base = {"param_ratio": 0.05, "head_mode": "kv_groups", "tp_size": 1}
    probes = head_probe_requests(base, _uniform([3, 2, 3, 1], per_group=3))
    assert [(p.units, p.layers) for p in probes] == [(3, (0, 2)), (2, (1,))]  # the one-group layer is left whole
    for p in probes:
        assert p.fields == {"head_mode": "kv_groups", "tp_size": 1, "head_ratio": pytest.approx(1.01 / p.units)}
        # the uniform split keeps the count nearest (1 - ratio) · u: exactly one unit fewer
        assert round((1 - p.fields["head_ratio"]) * p.units) == p.units - 1
    # query heads within groups: the unit is one head of each group
    probes = head_probe_requests({"param_ratio": 0.05, "head_mode": "query"}, _uniform([2, 2], per_group=4))
    assert [(p.units, p.layers, p.fields["head_ratio"]) for p in probes] == [(4, (0, 1), pytest.approx(1.01 / 4))]
    # a plan that already removes a head somewhere measures the heads where they are: no probe
    assert head_probe_requests(base, _uniform([3, 3], per_group=3, lose_head_in=1)) == []
    assert head_probe_requests(base, _uniform([1, 1], per_group=3)) == []  # no layer can lose a unit
    # the budget's head cap is not the probe's (a head_ratio plan refuses it); a cap of 0 needs no probe
    assert [p.fields for p in head_probe_requests({**base, "head_cap": 0.5}, _uniform([3], per_group=3))] == \
        [{"head_mode": "kv_groups", "tp_size": 1, "head_ratio": pytest.approx(1.01 / 3)}]
    assert head_probe_requests({**base, "head_cap": 0.0}, _uniform([3], per_group=3)) == []


def test_split_puts_validation_after_every_row_the_fit_reads():
    assert split_rows(100, 64, 8, 8) == Split(64, (64, 72))
    assert split_rows(100, 1, 8, 8) == Split(8, (8, 16))  # the probe rows are fit rows too


def test_split_adapts_to_short_data_and_refuses_below_probe_plus_validation():
    s = split_rows(20, 64, 8, 8)
    assert (s.fit, s.val) == (12, (12, 20)) and "12 rows" in s.note
    with pytest.raises(ValueError, match="--val-rows"):
        split_rows(15, 64, 8, 8)


def test_candidates_remove_the_same_budget_each_their_way():
    sens = {"layer_sensitivity": [0.1, 0.2, 0.3, 0.4], "head_sensitivity": [0.5] * 4,
            "sensitivity_at": {"mlp": 0.15, "attn": 0.25}}
    base = {"param_ratio": 0.2, "width_multiple": 8, "head_mode": "kv_groups"}
    req = candidate_requests(base, sens, SHAPE)
    assert list(req) == ["budget", "heads-capped", "mlp", "mlp-even", "mlp-bold"]
    assert req["budget"] == {**base, **sens}
    assert req["heads-capped"]["head_cap"] == 0.25
    mlp = req["mlp"]
    assert mlp["mlp_ratio"] == pytest.approx(0.2 * SHAPE.params() / mlp_params(SHAPE))
    assert mlp["per_layer"] and mlp["layer_sensitivity"] == sens["layer_sensitivity"] and mlp["width_multiple"] == 8
    assert "param_ratio" not in mlp and "head_sensitivity" not in mlp
    # the same MLP-only layout again, its cut spread more evenly across the layers, and less
    assert TWINS == {"even": 0.5, "bold": 2.0} and "sensitivity_exponent" not in mlp
    assert req["mlp-even"] == {**mlp, "sensitivity_exponent": 0.5}
    assert req["mlp-bold"] == {**mlp, "sensitivity_exponent": 2.0}
    # the request's own head cap: no second capped candidate; no heads measured: MLP only
    twins = ["mlp-even", "mlp-bold"]
    assert list(candidate_requests({**base, "head_cap": 0.0}, sens, SHAPE)) == ["budget", "mlp", *twins]
    assert list(candidate_requests(base, {"layer_sensitivity": sens["layer_sensitivity"]}, SHAPE)) == ["mlp", *twins]
    # more than the MLPs can give (removed_fractions caps a layer at 0.9): no MLP-only candidate
    assert list(candidate_requests({**base, "param_ratio": 0.85}, sens, SHAPE)) == ["budget", "heads-capped"]


def test_a_subset_of_candidates_is_checked_kept_in_order_and_refused_when_none_applies():
    assert check_names(("mlp-ends", "budget")) == ("mlp-ends", "budget")
    for wanted, why in ((("mlp", "mlp-end"), "unknown candidate 'mlp-end'"), (("mlp", "mlp"), "named twice"),
                        ((), "no candidate named")):
        with pytest.raises(ValueError, match=why) as e:
            check_names(wanted)
        assert ", ".join(CANDIDATES) in str(e.value)
    # only the ends layouts measure their own Δ: the whole-model pass is needed by every other one
    assert not needs_model_delta(("mlp-ends", "mlp-ends-even", "mlp-ends-bold"))
    assert needs_model_delta(None) and needs_model_delta(("mlp-ends", "mlp")) and needs_model_delta(("mlp-even",))
    with pytest.raises(ValueError, match="unknown candidate 'mlp-end'"):
        needs_model_delta(("mlp-end",))  # checked before anything is measured
    sens = {"layer_sensitivity": [0.1, 0.2, 0.3, 0.4], "head_sensitivity": [0.5] * 4,
            "sensitivity_at": {"mlp": 0.15, "attn": 0.25}}
    req = candidate_requests({"param_ratio": 0.2}, sens, SHAPE)
    assert select(req, None) == req
    assert list(select(req, ("mlp-bold", "budget", "mlp-ends"))) == ["budget", "mlp-bold"]  # CANDIDATES order
    assert select(req, ("mlp",)) == {"mlp": req["mlp"]}
    with pytest.raises(ValueError, match="none of mlp-ends, mlp-ends-even is built .*here: budget, heads-capped, mlp,"):
        select(req, ("mlp-ends", "mlp-ends-even"))  # 4 layers: no ends layout


def test_kept_layers_reach_every_candidate_and_the_mlp_budget_counts_only_the_other_layers():
    sens = {"layer_sensitivity": [0.1, 0.2, 0.3, 0.4], "head_sensitivity": [0.5] * 4,
            "sensitivity_at": {"mlp": 0.15, "attn": 0.25}}
    base = {"param_ratio": 0.15, "keep_layers": [0, -1]}
    req = candidate_requests(base, sens, SHAPE)
    assert all(r["keep_layers"] == [0, -1] for r in req.values())
    # mlp_ratio stays a share of all neurons (the planner takes it from the other layers)
    assert req["mlp"]["mlp_ratio"] == pytest.approx(0.15 * SHAPE.params() / mlp_params(SHAPE))
    assert mlp_params(SHAPE, [0, -1]) == mlp_params(SHAPE) // 2
    # 0.3 of the parameters fits in all four MLPs (90 % of them) but not in the two left to prune
    assert "mlp" in candidate_requests({"param_ratio": 0.3}, sens, SHAPE)
    assert "mlp" not in candidate_requests({"param_ratio": 0.3, "keep_layers": [0, 3]}, sens, SHAPE)
    # the head probe still takes one unit from every layer: no keep_layers in it
    probes = head_probe_requests({**base, "head_mode": "kv_groups"}, _uniform([3, 3], per_group=3))
    assert [p.fields for p in probes] == [{"head_mode": "kv_groups", "head_ratio": pytest.approx(1.01 / 3)}]


def test_the_ends_candidate_keeps_llm_pruners_layers_whole_on_deep_enough_models():
    assert end_layers(32) == [0, 1, 2, 3, 30, 31]  # LLM-Pruner's 4 and 2 of LLaMA-7B's 32
    assert end_layers(30) == [0, 1, 2, 3, 28, 29] and end_layers(36) == [0, 1, 2, 3, 4, 34, 35]
    assert end_layers(16) == [0, 1, 15]
    sens = {"layer_sensitivity": [0.1] * 16}
    deep = ModelShape(hidden_size=64, vocab_size=100, head_dim=16, layers=(LayerShape(96, 8, 4),) * 16,
                      tie_word_embeddings=True, qkv_bias=False, qk_norm=False, dtype_bytes=4)
    req = candidate_requests({"param_ratio": 0.2, "width_multiple": 8}, sens, deep)
    # the twins of the deeper-cut layout only
    assert list(req) == ["mlp", "mlp-ends", "mlp-ends-even", "mlp-ends-bold"]
    assert req["mlp-ends"] == {**req["mlp"], "keep_layers": [0, 1, 15]}
    assert req["mlp-ends-even"] == {**req["mlp-ends"], "sensitivity_exponent": 0.5}
    assert req["mlp-ends-bold"] == {**req["mlp-ends"], "sensitivity_exponent": 2.0}
    # the user's own keep_layers, or too few layers to keep an eighth of: no such candidate
    assert "mlp-ends" not in candidate_requests({"param_ratio": 0.2, "keep_layers": [5]}, sens, deep)
    assert "mlp-ends" not in candidate_requests({"param_ratio": 0.2}, {"layer_sensitivity": [0.1] * 4}, SHAPE)
    # more than the other 13 layers' MLPs can give (90 % of them): no ends candidate, the plain one still
    big = candidate_requests({"param_ratio": 0.35}, sens, deep)
    assert "mlp" in big and "mlp-ends" not in big


def test_the_table_says_when_another_candidate_is_better_on_data_alone():
    """With --val-data the mean over the sets chooses; a candidate better on --data alone by more
    than the margin is named with its plan file (at 30 % on SmolLM2 the choice turned on this)."""
    record = {"validation": {"rows": [24, 32]}, "dense": figures({"--data": 2.0, "code.txt": 3.0}),
              "candidates": {"heads-capped": figures({"--data": 2.30, "code.txt": 3.60}),
                             "mlp": figures({"--data": 2.35, "code.txt": 3.45})}}
    for r in record["candidates"].values():
        r.update(params_before=1000, params_after=800)
    names = ["heads-capped", "mlp"]
    assert scores(record, names)["mlp"] < scores(record, names)["heads-capped"]  # the mean prefers mlp
    lines = table(record, names, "mlp", {"heads-capped": "W/plan-heads-capped.json", "mlp": "W/plan-mlp.json"})
    assert lines[-1] == ("  mlp chosen on all the validation sets together; on --data alone heads-capped validates "
                         "5.1% better (its plan: W/plan-heads-capped.json; build it with `actprune prune --plan`)")
    assert "on --data alone" not in "\n".join(table(record, names, "heads-capped"))  # the best on --data: silent
    # within the margin on --data: no line
    record["candidates"]["mlp"].update(figures({"--data": 2.305, "code.txt": 3.45}))
    assert "on --data alone" not in "\n".join(table(record, names, "mlp"))
    # one set (no --val-data): --data is the only criterion, nothing to add
    one = {"validation": {"rows": [24, 32]}, "dense": figures({"--data": 2.0}),
           "candidates": {n: {**figures({"--data": x}), "params_before": 1000, "params_after": 800}
                          for n, x in (("heads-capped", 2.30), ("mlp", 2.35))}}
    assert "on --data alone" not in "\n".join(table(one, names, "mlp"))
