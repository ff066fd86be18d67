"""actprune.pruning.workflow: the notebook functions agree with the modules they wrap (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from actprune.core.planning.scores import STRATEGIES, ScoreInput
from actprune.core.wire.plan import PlanError
from actprune.core.wire.plan_request import ImportanceWeights
from actprune.core.wire.stats import Stats
from actprune.pruning import workflow as api
from actprune.pruning.fixtures.synthetic import build_checkpoint, tiny_config
from pruning_helpers import SENTENCES, stats_from_samples

SHAPE = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("api") / "qwen3", arch="qwen3", **SHAPE)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n\n".join(SENTENCES[i % 4] + f" Item {i}." for i in range(60)))
    return path


@pytest.fixture(scope="module")
def stats(model, texts, tmp_path_factory) -> Stats:
    out = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    s = api.record_stats(model, str(texts), max_tokens=2000, max_len=64, output=out, progress=False)
    assert api.load_stats(out).tokens == s.tokens > 0
    return s


def test_recorded_stats_say_their_head_dim_so_a_summary_shows_heads(stats):
    # as a server's snapshot does: `actprune stats show` of an offline file lists heads too
    from actprune.core.summary import summarize

    assert int(stats.meta["head_dim"]) == 32 and int(stats.meta["num_layers"]) == SHAPE["num_hidden_layers"]
    heads = summarize(stats).layers[0].heads
    assert heads is not None and heads.num_heads == SHAPE["num_attention_heads"]


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def test_analyze_figures_equal_numpy_on_the_raw_activations():
    """Each figure of ``analyze`` against the same figure computed directly on the samples the
    stats summarise (float64 numpy, one pass over all tokens x channels)."""
    cfg = tiny_config("qwen3", num_hidden_layers=2, intermediate_size=24, num_attention_heads=2,
                      num_key_value_heads=1)
    rng = np.random.default_rng(0)
    raw = {}

    def samples(i: int, kind: str, width: int) -> np.ndarray:
        x = rng.standard_t(df=3, size=(200, width)) + rng.uniform(-2, 2, width)  # (N, C)
        x[:, :3] *= rng.random((200, 3)) < 0.05  # mostly-zero channels
        raw[(i, kind)] = x
        return x

    stats = stats_from_samples(cfg, samples, blocks=[0.9, 0.6], threshold=0.05)
    table = api.analyze(stats)
    assert [a.layer for a in table] == [0, 1]
    for a in table:
        assert a.block_influence == pytest.approx(1 - [0.9, 0.6][a.layer])
        for kind in ("mlp", "attn"):
            x, g = raw[(a.layer, kind)], getattr(a, kind)
            near = np.abs(x) <= 0.05
            want = {"l1_norm": np.abs(x).sum(), "l2_norm": np.sqrt((x * x).sum()), "max_abs": np.abs(x).max(),
                    "mean_abs": np.abs(x).mean(), "variance": x.var(), "sparsity": near.mean(),
                    "sparse_90_ratio": (near.mean(0) > 0.9).mean(),
                    "variance_min": x.var(0).min(), "variance_max": x.var(0).max()}
            for name, value in want.items():
                assert getattr(g, name) == pytest.approx(value, rel=1e-6), (a.layer, kind, name)
            np.testing.assert_allclose(g.channel_variance, x.var(0), rtol=1e-9)
            np.testing.assert_allclose(g.channel_l1, np.abs(x).sum(0), rtol=1e-6)
    row = table[0].row()
    assert row["mlp_variance"] == pytest.approx(raw[(0, "mlp")].var(), rel=1e-6) and "attn_l2_norm" in row


def test_mlp_candidates_are_the_lowest_scores_and_the_complement_of_the_plan(stats, model):
    cands = api.pruning_candidates(stats, 0.25, "importance")
    plan = api.make_plan(stats, model, mlp_ratio=0.25, strategy="importance")
    for i in stats.layers:
        s = STRATEGIES["importance"].fn(ScoreInput(stats.figures(i, "mlp"), ImportanceWeights()))
        assert len(cands[i]) == 24
        assert max(s[cands[i]]) <= min(np.delete(s, cands[i]))
        assert sorted(set(range(96)) - set(cands[i])) == plan.layers[i].mlp_keep


def test_weight_aware_and_head_candidates_need_the_checkpoint(stats, model):
    with pytest.raises(ValueError, match="needs model_dir"):
        api.pruning_candidates(stats, 0.3, "wifv")
    with pytest.raises(ValueError, match="needs model_dir"):
        api.pruning_candidates(stats, 0.25, unit="heads")
    heads = api.pruning_candidates(stats, 0.25, "wanda_sp", unit="heads", model_dir=model)
    assert all(len(h) == 2 and all(0 <= j < 8 for j in h) for h in heads.values())
    (layers,) = api.pruning_candidates(stats, 0.5, unit="layers").values()
    bi = [stats.block_influence(i) for i in stats.layers]
    assert sorted(layers) == sorted(np.argsort(bi)[:2].tolist())


def test_bad_ratio_or_strategy_is_refused_with_the_choices(stats, model):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        api.pruning_candidates(stats, 1.0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        api.pruning_candidates(stats, 0.3, "random")
    with pytest.raises(PlanError, match="^mlp_ratio: "):  # one line naming the field, not pydantic's dump
        api.make_plan(stats, model, mlp_ratio=1.5)


def test_prune_helpers_cut_mlp_heads_and_layers(stats, model, tmp_path):
    mlp = api.prune_mlp(model, stats, 0.25, tmp_path / "mlp")
    assert _config(mlp)["intermediate_size"] == 72
    heads = api.prune_heads(model, stats, 0.5, tmp_path / "heads")
    assert (_config(heads)["num_attention_heads"], _config(heads)["num_key_value_heads"]) == (4, 2)
    short = api.drop_layers(model, stats, 1, tmp_path / "short")
    assert _config(short)["num_hidden_layers"] == 3
    plan_file = tmp_path / "plan.json"
    api.make_plan(stats, model, mlp_ratio=0.5, output=plan_file)
    assert _config(api.prune(model, plan_file, tmp_path / "from-file"))["intermediate_size"] == 48


def test_run_pipeline_writes_every_step_and_recovers_the_pruned_shape(stats, model, texts, tmp_path):
    result = api.run_pipeline(
        model, tmp_path / "work", stats=stats, mlp_ratio=0.3, train_data=str(texts),
        finetune_steps=2, eval_data=str(texts), eval_tokens=256, eval_seq_len=32, progress=False,
        finetune_config={"batch_size": 2, "seq_len": 32, "val_fraction": 0.2, "max_val_batches": 1},
    )
    original, pruned, recovered = result.results
    assert original.parameters > pruned.parameters == recovered.parameters
    assert original.kl_vs_first == 0.0 and pruned.kl_vs_first > 0
    assert result.report.is_file() and (result.stats.is_file() and result.paths["plan"].is_file())
    assert _config(result.recovered)["intermediate_size"] == _config(result.pruned)["intermediate_size"]
    assert "perplexity" in result.table()
