"""Scores on small hand-checked inputs."""

from __future__ import annotations

import numpy as np
import pytest
from actprune.core.planning.scores import (
    STRATEGIES,
    ScoreInput,
    describe_group,
    head_scores,
    layer_scores,
    minmax,
    standardise,
)
from actprune.core.stats_math import figures
from actprune.core.wire.plan_request import ImportanceWeights
from pruning_helpers import stats_from_samples

# 4 tokens x 3 channels, picked so every figure is easy by hand.
X = np.array([[1.0, 0.0, 2.0], [-1.0, 0.0, 2.0], [3.0, 0.0, -2.0], [-3.0, 0.01, -2.0]])


def group_of(x: np.ndarray, threshold: float = 0.05) -> dict[str, np.ndarray]:
    mean = x.mean(0)
    return {
        "count": np.asarray(float(x.shape[0])), "mean": mean, "m2": ((x - mean) ** 2).sum(0),
        "sum": x.sum(0), "sum_sq": (x * x).sum(0), "sum_abs": np.abs(x).sum(0),
        "max_abs": np.abs(x).max(0).astype(np.float32), "near_zero": (np.abs(x) <= threshold).sum(0) * 1.0,
    }


def test_summary_figures_match_hand_computation():
    s = describe_group(group_of(X))
    assert s.l1_norm == pytest.approx(8 + 0.01 + 8)
    assert s.l2_norm == pytest.approx(np.sqrt(20 + 1e-4 + 16))
    np.testing.assert_allclose(s.channel_l1, [8, 0.01, 8])
    np.testing.assert_allclose(s.channel_l2, [np.sqrt(20), 0.01, 4])
    assert s.max_abs == 3.0
    assert s.mean_abs == pytest.approx((2 + 0.0025 + 2) / 3)
    np.testing.assert_allclose(s.channel_variance, [5.0, X[:, 1].var(), 4.0])
    assert s.variance == pytest.approx(X.var())  # pooled over every value
    assert (s.variance_min, s.variance_max) == (pytest.approx(X[:, 1].var()), 5.0)
    np.testing.assert_allclose(s.channel_sparsity, [0, 1, 0])
    assert s.sparsity == pytest.approx(4 / 12)
    assert s.sparse_90_ratio == pytest.approx(1 / 3)


def score(name: str, col_norm=None, weights=None) -> np.ndarray:
    inp = ScoreInput(figures(group_of(X)), weights or ImportanceWeights(), col_norm)
    return STRATEGIES[name].fn(inp)


def test_simple_strategies_rank_by_their_figure():
    np.testing.assert_allclose(score("magnitude"), [2.0, 0.0025, 2.0])
    np.testing.assert_allclose(score("variance"), [5.0, X[:, 1].var(), 4.0])
    np.testing.assert_allclose(score("sparsity"), [1.0, 0.0, 1.0])  # sparse channels score low


def test_importance_is_weighted_sum_of_minmax_figures():
    w = ImportanceWeights(magnitude=0.5, variance=0.25, sparsity=0.25)
    var = X.var(0)
    want = 0.5 * np.array([1, 0, 1]) + 0.25 * (var - var.min()) / (var.max() - var.min()) + 0.25 * np.array([1, 0, 1])
    np.testing.assert_allclose(score("importance", weights=w), want)


def test_weight_aware_strategies_multiply_by_column_norms():
    norms = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(score("wifv", norms), X.var(0) * norms**2)
    np.testing.assert_allclose(score("wanda_sp", norms), np.sqrt((X**2).sum(0)) * norms)
    assert STRATEGIES["wifv"].needs_weights and STRATEGIES["wanda_sp"].needs_weights
    with pytest.raises(ValueError, match="column norms"):
        score("wifv")


def test_head_scores_sum_channels_of_each_head():
    np.testing.assert_allclose(head_scores(np.arange(6.0), 3), [1, 5, 9])
    with pytest.raises(ValueError, match="heads"):
        head_scores(np.arange(5.0), 2)


def test_normalisations_handle_constant_inputs():
    np.testing.assert_allclose(minmax(np.array([2.0, 4.0, 3.0])), [0, 1, 0.5])
    assert not minmax(np.ones(3)).any() and not standardise(np.ones(3)).any()
    z = standardise(np.array([1.0, 2.0, 3.0]))
    assert z.mean() == pytest.approx(0) and z.std() == pytest.approx(1)


def test_block_influence_is_one_minus_mean_cosine():
    cfg = {"num_hidden_layers": 2, "intermediate_size": 2, "num_attention_heads": 1, "head_dim": 2,
           "architectures": ["Qwen3ForCausalLM"], "hidden_size": 2, "vocab_size": 4}
    stats = stats_from_samples(cfg, lambda i, k, w: np.ones((3, w)), blocks=[0.9, 0.25])
    np.testing.assert_allclose(layer_scores(stats, [0, 1]), [0.1, 0.75])
