"""Distillation from the teacher's top-k kept on disk: the loss is the KL on k + 1 outcomes
(checked in float64), equals the full KL when k is the vocabulary, trains like the live teacher,
and the file is reused only for the same rows, k, temperature and teacher."""

from __future__ import annotations

import json

import pytest
import torch
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.pruning.recover import teacher_cache as tc
from actprune.pruning.recover.finetune import FinetuneConfig, FinetuneRecipe, main
from actprune.pruning.recover.recipe_config import kd_loss


def _topk(teacher_logits: torch.Tensor, k: int, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(teacher_logits / t, -1)
    top = logp.topk(k, -1)
    return top.values.float(), top.indices


def _coarse_kl(s: torch.Tensor, t: torch.Tensor, k: int, temp: float) -> float:
    """float64 reference: KL between teacher and student on {top-k tokens, the rest}."""
    s, t = s[:, :-1].double() / temp, t[:, :-1].double() / temp
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    idx = pt.topk(k, -1).indices
    qs, qt = ps.gather(-1, idx), pt.gather(-1, idx)
    qs = torch.cat([qs, 1 - qs.sum(-1, keepdim=True)], -1)
    qt = torch.cat([qt, 1 - qt.sum(-1, keepdim=True)], -1)
    return float((qt * (qt.log() - qs.log())).sum(-1).mean() * temp**2)


@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_topk_loss_is_the_kl_on_k_plus_one_outcomes_and_at_most_the_full_kl(k, temp):
    g = torch.Generator().manual_seed(k)
    s, t = torch.randn(3, 7, 50, generator=g) * 2, torch.randn(3, 7, 50, generator=g) * 2
    got = tc.topk_kd_loss(s, *_topk(t, k, temp), temp).item()
    assert got == pytest.approx(_coarse_kl(s, t, k, temp), rel=1e-4, abs=1e-6)
    assert 0 <= got <= kd_loss(s, t, temp).item() + 1e-6


def test_topk_loss_over_the_whole_vocabulary_is_the_full_kl_and_zero_for_the_teacher_itself():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 30, generator=g), torch.randn(2, 6, 30, generator=g)
    assert tc.topk_kd_loss(s, *_topk(t, 30, 1.5), 1.5).item() == pytest.approx(kd_loss(s, t, 1.5).item(), rel=1e-4)
    assert tc.topk_kd_loss(t, *_topk(t, 8, 1.0), 1.0).item() == pytest.approx(0.0, abs=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("teacher") / "qwen3", arch="qwen3", seed=7)


def _cfg(tiny, pr_jsonl, out, teacher, **kw) -> FinetuneConfig:
    base = dict(model=str(tiny), data=str(pr_jsonl), output=str(out), text_field="response", lr=3e-3,
                warmup_steps=2, batch_size=2, seq_len=32, val_fraction=0.25, max_steps=3, progress=False,
                teacher=str(teacher), kd_alpha=0.6, kd_temperature=2.0)
    base.update(kw)
    return FinetuneConfig(**base)


def test_cached_teacher_over_the_vocabulary_trains_like_the_live_teacher(tiny, teacher, pr_jsonl, tmp_path):
    live = FinetuneRecipe(_cfg(tiny, pr_jsonl, tmp_path / "live", teacher))
    live.setup()
    vocab = live.model.config.vocab_size
    live.train()
    cached = FinetuneRecipe(_cfg(tiny, pr_jsonl, tmp_path / "cached", teacher, teacher_topk=vocab))
    cached.setup()
    assert cached.teacher is None  # not kept in memory for training
    cached.train()
    for a, b in zip(live.history, cached.history, strict=True):
        for key in ("kd_loss", "lm_loss", "loss", "val_loss", "val_kl", "val_objective"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-4), (key, a, b)


def test_the_cache_is_reused_for_the_same_run_and_rebuilt_when_anything_changes(
        tiny, teacher, pr_jsonl, tmp_path, monkeypatch):
    cache = tmp_path / "topk.safetensors"
    first = FinetuneRecipe(_cfg(tiny, pr_jsonl, tmp_path / "a", teacher, teacher_topk=8, teacher_cache=str(cache)))
    first.setup()
    built = cache.stat().st_mtime_ns
    rows = first.batch_rows(1)
    lp, idx = first.teacher_topk.lookup(rows[[1, 0]])
    with torch.no_grad():
        want = torch.log_softmax(first_teacher_logits(teacher, rows[[1, 0]]) / 2.0, -1).topk(8, -1)
    assert torch.equal(idx, want.indices) and torch.allclose(lp, want.values, atol=1e-5)

    def no_teacher(self, dtype):
        raise AssertionError("the teacher was loaded although the cache matches")

    monkeypatch.setattr(FinetuneRecipe, "_build_teacher", no_teacher)
    again = FinetuneRecipe(_cfg(tiny, pr_jsonl, tmp_path / "b", teacher, teacher_topk=8, teacher_cache=str(cache)))
    again.setup()
    assert cache.stat().st_mtime_ns == built
    for change in ({"teacher_topk": 4}, {"kd_temperature": 1.0}, {"seq_len": 16}):
        with pytest.raises(AssertionError, match="the teacher was loaded"):
            FinetuneRecipe(_cfg(tiny, pr_jsonl, tmp_path / "c", teacher, teacher_cache=str(cache),
                                **{"teacher_topk": 8, **change})).setup()


def test_the_teacher_runs_only_over_the_rows_the_run_reads(tiny, teacher, pr_jsonl, tmp_path):
    def read(recipe: FinetuneRecipe) -> set[tuple[int, ...]]:
        return {tuple(r) for step in range(recipe.total_steps) for r in recipe.batch_rows(step).tolist()}

    cfg = dict(teacher_topk=8, val_fraction=0.0, seq_len=16, batch_size=2)
    short = FinetuneRecipe(_cfg(tiny, pr_jsonl, tmp_path / "short", teacher, max_steps=2, **cfg))
    short.setup()
    assert len(short.train_rows) > 8  # a file of many rows, of which two steps read four
    assert {tuple(r) for r in short.visited_rows().tolist()} == read(short)
    assert short.teacher_topk.indices.shape[0] == len(read(short)) == 4
    short.train()  # every row a step reads has its top-k
    whole = FinetuneRecipe(_cfg(tiny, pr_jsonl, tmp_path / "whole", teacher, max_steps=None, epochs=2, **cfg))
    whole.setup()  # two epochs read (nearly) every row: the cache holds what they read, in file order
    visited = whole.visited_rows()
    assert {tuple(r) for r in visited.tolist()} == read(whole) and len(visited) >= len(whole.train_rows) - 1
    assert whole.teacher_topk.indices.shape[0] == len(visited)


def test_distillation_validates_on_the_kl_to_the_teacher_and_keeps_the_best_objective(
        tiny, teacher, pr_jsonl, tmp_path):
    cfg = _cfg(tiny, pr_jsonl, tmp_path / "v", teacher, teacher_topk=8, kd_alpha=0.7, max_steps=4,
               eval_every=1, early_stop_patience=5, lr=3e-2)
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    recipe.evaluate()
    got = recipe.history[-1]
    # Here: the top-8 KL at T = 2 over the validation rows, weighted by predicted tokens.
    kl = lm = n = 0.0
    with torch.no_grad():
        for ids in recipe.val_batches():
            s, t = recipe.model(input_ids=ids).logits, first_teacher_logits(teacher, ids)
            tokens = ids.shape[0] * (ids.shape[1] - 1)
            kl += tc.topk_kd_loss(s, *_topk(t, 8, 2.0), 2.0).item() / 4.0 * tokens
            lm += torch.nn.functional.cross_entropy(s[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item() * tokens
            n += tokens
    assert got["val_kl"] == pytest.approx(kl / n, rel=1e-4) and got["val_loss"] == pytest.approx(lm / n, rel=1e-4)
    assert got["val_objective"] == pytest.approx(0.7 * 4.0 * kl / n + 0.3 * lm / n, rel=1e-4)
    out = main(cfg)
    # The default cache is not beside the weights: vLLM loads every *.safetensors at the top level.
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert (out / "cache" / "teacher_topk.safetensors").is_file()
    log = [json.loads(x) for x in (out / "finetune_log.jsonl").read_text().splitlines()]
    vals = {e["step"]: e["val_objective"] for e in log if "val_objective" in e}
    best = min(vals, key=vals.get)
    assert log[-1] == {"kept_step": best, "kept": "best", "kept_val_objective": vals[best]}


def first_teacher_logits(teacher, ids: torch.Tensor) -> torch.Tensor:
    from actprune.pruning.checkpoint.hf_io import load_causal_lm

    return load_causal_lm(teacher)(input_ids=ids).logits.float()


def test_teacher_topk_needs_a_teacher_and_one_process():
    from actprune.pruning.data import DataError
    from actprune.pruning.recover.recipe_config import check_config

    with pytest.raises(DataError, match="needs --teacher"):
        check_config(FinetuneConfig(model="m", data="d", output="o", teacher_topk=8))
    with pytest.raises(DataError, match="not supported with --fsdp"):
        check_config(FinetuneConfig(model="m", data="d", output="o", teacher="t", teacher_topk=8, fsdp=True))
