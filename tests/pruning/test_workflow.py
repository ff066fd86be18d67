"""actprune.pruning.workflow: the notebook functions agree with the modules they wrap (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from actprune.core.planning.scores import STRATEGIES, ScoreInput
from actprune.core.wire.plan import ImportanceWeights, PlanError
from actprune.core.wire.stats import Stats
from actprune.pruning import workflow as api
from actprune.pruning.fixtures.synthetic import build_checkpoint

SHAPE = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96)
SENTENCES = [
    "The old harbour town lies at the mouth of the river.",
    "Visitors walk along the stone walls, past the cathedral and the market square.",
    "Pruning removes neurons, attention heads or whole layers to make a model smaller.",
    "The museum opens at nine in the morning and closes at six in the evening.",
]


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


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def test_analyze_gives_one_row_per_layer_with_the_guides_figures(stats):
    table = api.analyze(stats)
    assert [a.layer for a in table] == [0, 1, 2, 3]
    row = table[0].row()
    for key in ("mlp_l1_norm", "mlp_l2_norm", "mlp_variance", "mlp_sparsity", "mlp_sparse_90_ratio",
                "attn_mean_abs", "block_influence", "tokens"):
        assert key in row and np.isfinite(row[key])
    assert table[0].mlp.channel_l1.shape == (96,) and table[0].attn.channel_l1.shape == (8 * 32,)
    assert row["mlp_mean_abs"] == pytest.approx(float(stats.figures(0, "mlp").mean_abs.mean()))


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
