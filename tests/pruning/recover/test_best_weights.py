"""Early stopping keeps the weights of the best validation, also across a kill and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from actprune.core.errors import ActpruneError
from actprune.pruning.recover.finetune import FinetuneConfig, main
from actprune.pruning.recover.train_state import EarlyStop, delete_stale_best, load_best, save_best
from safetensors.torch import load_file


def _cfg(model, data, out, **kw) -> FinetuneConfig:
    # A constant learning rate this high makes validation worse after the first step; being
    # constant, it does not depend on max_steps, so a shorter run reproduces any prefix.
    base = dict(model=str(model), data=str(data), output=str(out), text_field="response",
                lr=0.3, schedule="steps", epoch_lrs=[0.3], warmup_steps=0, batch_size=2,
                seq_len=32, val_fraction=0.25, max_steps=20, eval_every=1, early_stop_patience=2,
                progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "finetune_log.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_early_stopping_saves_the_weights_of_the_best_validation(tiny, pr_jsonl, tmp_path):
    out = main(_cfg(tiny, pr_jsonl, tmp_path / "es"))
    log = _log(out)
    vals = {e["step"]: e["val_loss"] for e in log if "val_loss" in e}
    best = min(vals, key=vals.get)
    last = max(vals)
    assert best < last, vals  # training went on past the best: the last weights are not it
    assert log[-1] == {"kept_step": best, "kept": "best", "kept_val_loss": vals[best]}
    # The weights after `best` steps, from a run that simply ends there.
    ref = main(_cfg(tiny, pr_jsonl, tmp_path / "ref", max_steps=best, early_stop_patience=0))
    assert _log(ref)[-1] == {"kept_step": best, "kept": "last"}
    got, want = _weights(out), _weights(ref)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_best_weights_survive_a_kill_and_resume(tiny, pr_jsonl, tmp_path, capsys):
    kw = dict(save_every=1)
    full = main(_cfg(tiny, pr_jsonl, tmp_path / "full", **kw))
    killed = tmp_path / "killed"
    assert main(_cfg(tiny, pr_jsonl, killed, stop_after_steps=2, **kw)) is None
    assert (killed / "best" / "step-000001" / "weights.safetensors").is_file()
    resumed = main(_cfg(tiny, pr_jsonl, killed, resume=True, **kw))
    assert "(step 2)" in capsys.readouterr().out  # the resumed process never saw step 1's weights
    assert _log(full)[-1]["kept"] == "best" and _log(full) == _log(resumed)
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_torn_checkpoint_state_is_named_on_resume(tiny, pr_jsonl, tmp_path):
    out = tmp_path / "torn"
    assert main(_cfg(tiny, pr_jsonl, out, save_every=1, stop_after_steps=2)) is None
    states = sorted(out.rglob("step-*/state.json"))
    assert states, "the killed run saved no checkpoint"
    states[-1].write_text('{"step": 2, "optim')  # what an edit or a bad disk leaves
    with pytest.raises(ActpruneError, match="state.json cannot be read"):
        main(_cfg(tiny, pr_jsonl, out, save_every=1, resume=True))


def test_prune_best_keeps_the_current_best_and_those_kept_checkpoints_refer_to(tmp_path):
    best, ckpts = tmp_path / "best", tmp_path / "checkpoints"
    for step, best_step in ((3, 2), (5, 4)):  # checkpoint step-3 was saved when 2 was the best
        (ckpts / f"step-{step:06d}").mkdir(parents=True)
        (ckpts / f"step-{step:06d}" / "state.json").write_text(json.dumps({"best_step": best_step}))
    kept = []
    for step in (1, 2, 3, 4):
        save_best(best, ckpts, step, {"w": torch.full((2,), float(step))}, 1.0 / step)
        kept.append(sorted(int(p.name[5:]) for p in best.iterdir()))
    assert kept == [[1], [2], [2, 3], [2, 4]]
    assert json.loads((best / "step-000004" / "best.json").read_text()) == {"step": 4, "val_loss": 0.25}
    shutil.rmtree(ckpts / "step-000003")  # rotated out: nothing resumes to best 2 any more
    (best / ".step-000005.partial-x1y2").mkdir()  # what a kill while staging best 5 leaves
    (ckpts / "step-000007").mkdir()
    (ckpts / "step-000007" / "state.json").write_text('{"best_step": 3')  # torn: it cannot be resumed
    delete_stale_best(best, ckpts, current=4)
    assert [p.name for p in best.iterdir()] == ["step-000004"]
    assert torch.equal(load_best(best, 4)["w"], torch.full((2,), 4.0))


@pytest.mark.parametrize("patience", [0, 2])
def test_early_stop_counts_evaluations_since_the_best(patience):
    es = EarlyStop(patience)
    assert [es.update(s, v) for s, v in enumerate([3.0, 2.0, 2.5, 2.0, 1.0, 1.5, 1.2], 1)] == [
        True, True, False, False, True, False, False]
    assert (es.best_step, es.best_val, es.bad_evals) == (5, 1.0, 2)
    assert es.stop is (patience == 2)
    again = EarlyStop(patience)
    again.restore(es.state())
    assert again == es
