"""`publish_model_files`: the final model moves into an output directory that also holds the
run's state, and a kill at any point never leaves it looking like a complete model."""

from __future__ import annotations

from pathlib import Path

import pytest
from actprune.pruning.checkpoint import hf_io
from actprune.pruning.checkpoint.hf_io import publish_model_files


class Killed(BaseException):
    """Stands for a kill."""


def _out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "checkpoints" / "step-000004").mkdir(parents=True)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "config.json", "tokenizer.json", "finetune_log.jsonl",
                 "teacher_topk.safetensors"):
        (out / name).write_text(f"old {name}")
    return out


def _staged(tmp_path: Path) -> Path:
    staged = tmp_path / "out" / ".final"
    staged.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        (staged / name).write_text(f"new {name}")
    return staged


def test_publishing_replaces_the_old_model_and_keeps_the_run_state(tmp_path):
    out = _out(tmp_path)
    publish_model_files(_staged(tmp_path), out)
    files = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    assert files == {
        "model.safetensors": "new model.safetensors", "config.json": "new config.json",
        "tokenizer.json": "new tokenizer.json", "generation_config.json": "new generation_config.json",
        "finetune_log.jsonl": "old finetune_log.jsonl",  # not a model file: the run's own
        "teacher_topk.safetensors": "old teacher_topk.safetensors",  # the teacher cache, reused by a rerun
    }
    assert (out / "checkpoints" / "step-000004").is_dir()


@pytest.mark.parametrize("kill_at", range(4))
def test_a_kill_while_publishing_never_leaves_a_config_beside_other_weights(tmp_path, monkeypatch, kill_at):
    out = _out(tmp_path)
    staged = _staged(tmp_path)
    moves: list[str] = []
    real = Path.replace

    def replace(self: Path, target):
        if len(moves) == kill_at:
            raise Killed
        moves.append(self.name)
        return real(self, target)

    monkeypatch.setattr(hf_io.Path, "replace", replace)
    with pytest.raises(Killed):
        publish_model_files(staged, out)
    assert not (out / "config.json").exists()  # not loadable: never a mix that looks complete
    monkeypatch.undo()
    publish_model_files(_restage(staged), out)  # the command run again publishes whole
    assert (out / "config.json").read_text() == "new config.json"
    assert sorted(p.name for p in out.glob("model*.safetensors")) == ["model.safetensors"]


def _restage(staged: Path) -> Path:
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        (staged / name).write_text(f"new {name}")
    return staged
