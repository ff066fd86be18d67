"""compress's candidates (pure parts): the rows split (fit rows first, validation after them;
adapted when the data is short, refused below probe + validation rows), the candidates'
requests at one budget, and the choice (lowest validation loss)."""

from __future__ import annotations

import pytest
from actprune.core.archs import LayerShape, ModelShape
from actprune.pruning.candidates import Split, candidate_requests, choose, mlp_params, split_rows

SHAPE = ModelShape(hidden_size=64, vocab_size=100, head_dim=16, layers=(LayerShape(96, 8, 4),) * 4,
                   tie_word_embeddings=True, qkv_bias=False, qk_norm=False, dtype_bytes=4)


def test_choose_takes_the_lowest_validation_loss_and_the_first_of_ties():
    assert choose({"budget": 2.5, "heads-capped": 2.1, "mlp": 2.3}) == "heads-capped"
    assert choose({"budget": 2.0, "mlp": 1.9}) == "mlp"
    assert choose({"budget": 2.0, "mlp": 2.0}) == "budget"
    with pytest.raises(ValueError):
        choose({})


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
    assert list(req) == ["budget", "heads-capped", "mlp"]
    assert req["budget"] == {**base, **sens}
    assert req["heads-capped"]["head_cap"] == 0.25
    mlp = req["mlp"]
    assert mlp["mlp_ratio"] == pytest.approx(0.2 * SHAPE.params() / mlp_params(SHAPE))
    assert mlp["per_layer"] and mlp["layer_sensitivity"] == sens["layer_sensitivity"] and mlp["width_multiple"] == 8
    assert "param_ratio" not in mlp and "head_sensitivity" not in mlp
    # the request's own head cap: no second capped candidate; no heads measured: MLP only
    assert list(candidate_requests({**base, "head_cap": 0.0}, sens, SHAPE)) == ["budget", "mlp"]
    assert list(candidate_requests(base, {"layer_sensitivity": sens["layer_sensitivity"]}, SHAPE)) == ["mlp"]
    # more than the MLPs can give (removed_fractions caps a layer at 0.9): no MLP-only candidate
    assert "mlp" not in candidate_requests({**base, "param_ratio": 0.85}, sens, SHAPE)
