"""Block-wise (local) distillation: stored dense layer calls replay exactly, every pruned layer
ends closer to its dense layer on its training batches and never further on held-out ones, and
only decoder layers change. (Whether the whole model then moves towards the teacher is a
question for real models and text: on this random tiny model it does not — see docs/recovery.md.)"""

from __future__ import annotations

import pytest
import torch
from actprune.pruning.checkpoint.hf_io import load_causal_lm
from actprune.pruning.data import DataError
from actprune.pruning.recover.blockwise import (
    _first,
    _layer_error,
    blockwise_distill,
    capture_layer_io,
)
from actprune.pruning.workflow import drop_layers, prune_mlp
from pruning_helpers import record_stats


@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    stats = record_stats(tiny)
    out = prune_mlp(tiny, stats, 0.5, tmp_path_factory.mktemp("bw") / "pruned", strategy="magnitude")
    return load_causal_lm(tiny), out, stats


def _rows(seed: int, n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def test_stored_layer_calls_replay_the_dense_layers_exactly(pair):
    teacher, _, _ = pair
    records = capture_layer_io(teacher, _rows(0), batch_size=4)
    layers = teacher.model.layers
    assert len(records) == len(layers) and all(len(r) == 2 for r in records)
    with torch.no_grad():
        for layer, recs in zip(layers, records, strict=True):
            for rec in recs:
                assert torch.equal(_first(layer(rec.hidden_in, **rec.kwargs)), rec.hidden_out)
    # consecutive layers chain: layer i's output is layer i+1's input
    assert torch.equal(records[0][0].hidden_out, records[1][0].hidden_in)


def test_each_layer_gets_closer_to_its_dense_layer_and_never_worse_held_out(pair):
    teacher, pruned, _ = pair
    student = load_causal_lm(pruned)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".layers." not in n}
    report = blockwise_distill(student, teacher, _rows(1, n=32), steps=30, lr=3e-4, batch_size=4, progress=False)
    assert len(report) == len(student.model.layers)
    assert all(r["train_after"] < 0.8 * r["train_before"] for r in report), report
    assert all(r["heldout_after"] <= r["heldout_before"] for r in report), report
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    # the held-out figure is the kept weights' own: measured again on the same held-out batches
    records = capture_layer_io(teacher, _rows(1, n=32), batch_size=4)
    for r, layer, recs in zip(report, student.model.layers, records, strict=True):
        assert _layer_error(layer, recs[-2:], torch.device("cpu")) == pytest.approx(r["heldout_after"], rel=1e-6)


def test_a_student_with_other_layers_than_the_teacher_is_refused(pair, tiny, tmp_path):
    teacher, _, stats = pair
    fewer = load_causal_lm(drop_layers(tiny, stats, 1, tmp_path / "dropped"))
    with pytest.raises(DataError, match="layer count"):
        blockwise_distill(fewer, teacher, _rows(0), steps=1, lr=1e-3, batch_size=4, progress=False)


def test_finetune_runs_the_local_stage_before_global_training_and_not_again_on_resume(
        pair, tiny, pr_jsonl, tmp_path, monkeypatch):
    from actprune.pruning.recover.finetune import FinetuneConfig, FinetuneRecipe

    _, pruned, _ = pair
    cfg = dict(model=str(pruned), data=str(pr_jsonl), output=str(tmp_path / "ft"), text_field="response",
               teacher=str(tiny), local_steps=6, lr=1e-3, warmup_steps=0, batch_size=2, seq_len=32,
               val_fraction=0.25, max_steps=2, save_every=1, progress=False)
    recipe = FinetuneRecipe(FinetuneConfig(**cfg))
    recipe.setup()
    [local] = [e["local"] for e in recipe.history if "local" in e]
    assert len(local) == len(recipe.model.model.layers)
    original = load_causal_lm(pruned).state_dict()
    changed = [n for n, p in recipe.model.state_dict().items() if not torch.equal(p, original[n])]
    assert changed and all(".layers." in n for n in changed)
    recipe.train()
    recipe.save_checkpoint()
    from actprune.pruning.recover import blockwise

    def again(*a, **kw):
        raise AssertionError("the local stage ran again on resume")

    monkeypatch.setattr(blockwise, "blockwise_distill", again)
    resumed = FinetuneRecipe(FinetuneConfig(**{**cfg, "resume": True}))
    resumed.setup()
    assert resumed.step == 2 and sum("local" in e for e in resumed.history) == 1  # the checkpoint's record
