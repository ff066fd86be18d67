"""The hidden-state loss of `finetune --kd-hidden` (Minitron's intermediate-state loss): its
maths against a float64 computation, the layer pairs of a student with dropped layers, the
recipe's first step against transformers' own hidden states, and that the term trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from actprune.client.cli import main as cli
from actprune.pruning.checkpoint.hf_io import load_causal_lm
from actprune.pruning.data import DataError
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.pruning.recover.features import feature_loss, layer_pairs
from actprune.pruning.recover.finetune import FinetuneConfig, FinetuneRecipe, main
from actprune.pruning.workflow import drop_layers, prune_mlp
from pruning_helpers import finetune_cfg, record_stats


def _cfg(model, data, out, **kw) -> FinetuneConfig:
    return finetune_cfg(model, data, out, **{"warmup_steps": 1, **kw})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("teacher") / "qwen3", arch="qwen3", seed=7)


def _states(model_dir, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output, from transformers' ``output_hidden_states`` (its last entry
    is after the final norm, so the norm is taken out to see the last layer's own output)."""
    model = load_causal_lm(model_dir)
    model.model.norm = torch.nn.Identity()
    with torch.no_grad():
        return list(model(input_ids=ids, output_hidden_states=True).hidden_states[1:])


def _reference(s: list[torch.Tensor], t: list[torch.Tensor]) -> float:
    """float64: mean over pairs and tokens of |s - t|^2 / |t|^2."""
    terms = [((a.double() - b.double()).pow(2).sum(-1) / b.double().pow(2).sum(-1)).mean() for a, b in zip(s, t, strict=True)]
    return float(torch.stack(terms).mean())


def test_feature_loss_is_per_token_normalised_and_zero_for_equal_states():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    s = [x + 0.1 * torch.randn(x.shape, generator=g) for x in t]
    assert feature_loss(t, t).item() == 0.0
    assert feature_loss(s, t).item() == pytest.approx(_reference(s, t), rel=1e-5)
    # a token with a huge norm (an attention sink) weighs like any other token, not by its norm
    big = [x.clone() for x in t]
    for x in big:
        x[:, 0] *= 1000.0
    moved = [a + (b - c) for a, b, c in zip(s, big, t, strict=True)]  # the same errors around the scaled states
    assert feature_loss(moved, big).item() < 0.9 * feature_loss(s, t).item()
    with pytest.raises(ValueError, match="as many"):
        feature_loss(s, t[:2])


def test_layer_pairs_follow_the_plan_of_a_student_with_dropped_layers(tiny, tmp_path):
    n = len(load_causal_lm(tiny).model.layers)
    assert layer_pairs(tiny, n, n) == [(i, i) for i in range(n)]
    dropped = drop_layers(tiny, record_stats(tiny), 1, tmp_path / "drop1")
    plan = json.loads((dropped / "actprune_plan.json").read_text())
    kept = [lp["index"] for lp in plan["layers"] if not lp["drop"]]
    assert len(kept) == n - 1
    assert layer_pairs(dropped, n - 1, n) == list(enumerate(kept))
    with pytest.raises(DataError, match="does not say which teacher layers"):
        layer_pairs(dropped, n - 1, n + 1)  # another teacher than the plan's source
    with pytest.raises(DataError, match="does not say which teacher layers"):
        layer_pairs(tiny, n - 1, n)  # no plan at all
    (dropped / "actprune_plan.json").write_text(json.dumps(plan)[:100])  # a torn record: said, not a JSON traceback
    with pytest.raises(DataError, match="does not say which teacher layers"):
        layer_pairs(dropped, n - 1, n)


def test_first_step_losses_equal_transformers_hidden_states(tiny, teacher, pr_jsonl, tmp_path):
    pruned = prune_mlp(tiny, record_stats(tiny), 0.5, tmp_path / "pruned", strategy="magnitude")
    cfg = _cfg(pruned, pr_jsonl, tmp_path / "kd", teacher=str(teacher), max_steps=1, kd_alpha=0.5, kd_hidden=2.0)
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    ids = recipe.batch_rows(0)
    feat = _reference(_states(pruned, ids), _states(teacher, ids))
    recipe.train()
    first = recipe.history[0]
    assert first["feature_loss"] == pytest.approx(feat, rel=1e-5)
    assert first["loss"] == pytest.approx(0.5 * first["kd_loss"] + 0.5 * first["lm_loss"] + 2.0 * feat, rel=1e-5)
    assert feat > 0.01  # the states really differ
    val = [e for e in recipe.history if "val_feature" in e]
    assert len(val) == 1 and val[0]["val_feature"] > 0
    recipe.cleanup()
    assert recipe.features is None and not load_causal_lm(pruned)._forward_hooks


def test_the_term_moves_the_students_states_towards_the_teachers(teacher, pr_jsonl, tmp_path):
    """The teacher pruned to half its MLP, trained alike (same steps, data and logit KD) with and
    without the hidden-state term: with it, its layers end closer to the teacher's on rows it
    never trained on."""
    student = prune_mlp(teacher, record_stats(teacher), 0.5, tmp_path / "pruned", strategy="magnitude")
    kw = dict(teacher=str(teacher), kd_alpha=1.0, max_steps=24, lr=1e-3)
    rows = FinetuneRecipe(_cfg(student, pr_jsonl, tmp_path / "rows", **kw))
    rows.setup()
    ids = torch.cat(list(rows.val_batches()))  # (N, 32): the documents held out of training
    t = _states(teacher, ids)
    start = _reference(_states(student, ids), t)
    without = main(_cfg(student, pr_jsonl, tmp_path / "without", **kw))
    with_ = main(_cfg(student, pr_jsonl, tmp_path / "with", kd_hidden=10.0, **kw))
    a, b = _reference(_states(without, ids), t), _reference(_states(with_, ids), t)
    assert b < 0.8 * a, (start, a, b)  # measured: start 0.277, without 0.495, with 0.290


def test_with_the_topk_cache_the_kl_comes_from_the_cache_and_the_states_from_the_live_teacher(
        tiny, teacher, pr_jsonl, tmp_path):
    recipe = FinetuneRecipe(_cfg(tiny, pr_jsonl, tmp_path / "topk", teacher=str(teacher), teacher_topk=8,
                                 kd_hidden=0.5, kd_alpha=1.0, max_steps=2))
    recipe.setup()
    ids = recipe.batch_rows(0)
    feat = _reference(_states(tiny, ids), _states(teacher, ids))  # the teacher runs without its lm_head here
    recipe.train()
    out = recipe.save()
    recipe.cleanup()
    log = [json.loads(x) for x in (Path(out) / "finetune_log.jsonl").read_text().splitlines()]
    assert all("feature_loss" in e and "kd_loss" in e for e in log if "lr" in e)
    assert log[0]["feature_loss"] == pytest.approx(feat, rel=1e-5)
    assert (Path(out) / "cache" / "teacher_topk.safetensors").is_file()


def test_cli_refuses_kd_hidden_without_a_teacher_and_pairs_it_can_not_trace(tiny, pr_jsonl, tmp_path, capsys):
    base = ["finetune", "--model", str(tiny), "--data", str(pr_jsonl), "--text-field", "response",
            "--max-steps", "1", "--seq-len", "32", "--batch-size", "2"]
    assert cli([*base, "-o", str(tmp_path / "a"), "--kd-hidden", "1"]) == 2
    assert "--kd-hidden must be >= 0 and needs --teacher" in capsys.readouterr().err
    other = build_checkpoint(tmp_path / "deep", arch="qwen3", num_hidden_layers=3)
    assert cli([*base, "-o", str(tmp_path / "b"), "--teacher", str(other), "--kd-hidden", "1"]) == 2
    assert "does not say which teacher layers" in capsys.readouterr().err


def test_under_lora_the_hooks_find_the_layers_inside_the_adapter_wrapper(tiny, teacher, pr_jsonl, tmp_path):
    out = main(_cfg(tiny, pr_jsonl, tmp_path / "lora", teacher=str(teacher), lora=True, kd_hidden=1.0, max_steps=2))
    log = [json.loads(x) for x in (Path(out) / "finetune_log.jsonl").read_text().splitlines()]
    assert [e["feature_loss"] > 0 for e in log if "lr" in e] == [True, True]
    assert type(load_causal_lm(out)).__name__ == "Qwen3ForCausalLM"  # merged, as without the term
