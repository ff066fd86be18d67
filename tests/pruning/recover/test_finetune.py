"""The fine-tuning recipe: learning, exact resume, distillation loss, LoRA merge, schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from actprune.client.cli import main as cli
from actprune.pruning.checkpoint.hf_io import finish_output_dir, load_causal_lm
from actprune.pruning.data import DataError
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.pruning.recover.finetune import FinetuneConfig, FinetuneRecipe, main
from actprune.pruning.recover.recipe_config import kd_loss, lr_at
from pruning_helpers import finetune_cfg
from safetensors.torch import load_file

_cfg = finetune_cfg


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "finetune_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("teacher") / "qwen3", arch="qwen3", seed=7)


def test_finetune_lowers_validation_loss_on_repeated_text(tiny, pr_jsonl, tmp_path):
    out = main(_cfg(tiny, pr_jsonl, tmp_path / "ft", max_steps=12, eval_every=4))
    vals = [e["val_loss"] for e in _log(out) if "val_loss" in e]
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.0, vals
    loaded = load_causal_lm(out)  # a plain HF checkpoint
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_resume_after_a_kill_gives_bit_identical_weights(tiny, pr_jsonl, tmp_path, capsys):
    kw = dict(max_steps=6, save_every=2, grad_accum=2, batch_size=1, eval_every=3)
    full = main(_cfg(tiny, pr_jsonl, tmp_path / "full", **kw))
    killed = tmp_path / "killed"
    assert main(_cfg(tiny, pr_jsonl, killed, stop_after_steps=3, **kw)) is None
    assert not (killed / "model.safetensors").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000002"]
    resumed = main(_cfg(tiny, pr_jsonl, killed, resume=True, **kw))
    assert "step-000002 (step 2)" in capsys.readouterr().out  # continued, not started over
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _log(full) == _log(resumed)  # the log (losses, lr, validation) continues exactly


def test_resume_refuses_changed_options(tiny, pr_jsonl, tmp_path, capsys):
    out = tmp_path / "o"
    main(_cfg(tiny, pr_jsonl, out, max_steps=4, save_every=2, stop_after_steps=3))
    args = ["finetune", "--model", str(tiny), "--data", str(pr_jsonl), "--text-field", "response",
            "-o", str(out), "--resume", "--lr", "1e-4", "--warmup-steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--val-fraction", "0.25", "--max-steps", "4"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "options changed since it was saved: ['lr']" in err, err


def test_distillation_loss_is_the_documented_mix(tiny, teacher, pr_jsonl, tmp_path):
    cfg = _cfg(tiny, pr_jsonl, tmp_path / "kd", teacher=str(teacher), max_steps=2,
               kd_alpha=0.3, kd_temperature=2.0)
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    ids = recipe.batch_rows(0)
    student, teach = load_causal_lm(tiny), load_causal_lm(teacher)
    with torch.no_grad():
        lm = student(input_ids=ids, labels=ids).loss.item()  # transformers' own LM loss
        s = student(input_ids=ids).logits[:, :-1] / 2.0
        t = teach(input_ids=ids).logits[:, :-1] / 2.0
        n = s.shape[0] * s.shape[1]
        kl = F.kl_div(F.log_softmax(s, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1),
                      log_target=True, reduction="sum").item() / n * 4.0
    recipe.train()
    first = recipe.history[0]
    assert first["lm_loss"] == pytest.approx(lm, rel=1e-5)
    assert first["kd_loss"] == pytest.approx(kl, rel=1e-5)
    assert first["loss"] == pytest.approx(0.3 * kl + 0.7 * lm, rel=1e-5)
    assert kl > 0.01  # the teacher really differs from the student


def test_kd_loss_is_zero_for_identical_logits_and_scales_with_t_squared():
    x = torch.randn(2, 5, 11)
    assert kd_loss(x, x, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.tensor([[[0.0, 0.0], [9.0, 9.0]]])  # last position is ignored
    t = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # p_teacher = (3/4, 1/4)
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(want, rel=1e-5)


def test_lr_schedules_warm_up_then_decay_or_step_per_epoch():
    cfg = FinetuneConfig(model="m", data="d", output="o", lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 10, 100) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(4, cfg, 10, 100) == pytest.approx(1e-3)
    assert lr_at(52, cfg, 10, 100) == pytest.approx(0.1e-3 + 0.9e-3 * 0.5)
    assert lr_at(100, cfg, 10, 100) == pytest.approx(1e-4)
    steps = FinetuneConfig(model="m", data="d", output="o", schedule="steps", warmup_steps=0,
                           epoch_lrs=[2e-5, 1e-5, 5e-6])
    assert [lr_at(s, steps, 10, 50) for s in (0, 9, 10, 25, 49)] == pytest.approx(
        [2e-5, 2e-5, 1e-5, 5e-6, 5e-6])


def test_lora_is_merged_into_a_plain_checkpoint(tiny, pr_jsonl, tmp_path):
    cfg = _cfg(tiny, pr_jsonl, tmp_path / "lora", lora=True, lora_r=4, lr=1e-2, max_steps=3)
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    probe = recipe.batch_rows(0)
    with torch.no_grad():
        want = recipe.model(input_ids=probe).logits
    out = recipe.save()
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in weights)
    assert not (out / "adapter_config.json").exists()
    before = load_file(str(Path(tiny) / "model.safetensors"))
    assert weights.keys() == before.keys()
    assert not torch.equal(weights["model.layers.0.mlp.down_proj.weight"],
                           before["model.layers.0.mlp.down_proj.weight"])
    with torch.no_grad():
        got = load_causal_lm(out)(input_ids=probe).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_with_gradient_checkpointing_takes_the_same_steps_as_fp32(tiny, pr_jsonl, tmp_path):
    """bf16 autocast + gradient checkpointing must train, not just stay finite: its weight
    updates point where the float32 run's do (bf16 rounds, so not bit-equal)."""
    kw = dict(max_steps=3, warmup_steps=0, lr=1e-3)
    bf = main(_cfg(tiny, pr_jsonl, tmp_path / "bf", bf16=True, grad_checkpointing=True, **kw))
    fp = main(_cfg(tiny, pr_jsonl, tmp_path / "fp", **kw))
    assert all(math.isfinite(e["loss"]) for e in _log(bf) if "loss" in e)
    w0 = load_file(str(tiny / "model.safetensors"))
    w_bf, w_fp = load_file(str(bf / "model.safetensors")), load_file(str(fp / "model.safetensors"))
    assert w_bf["model.embed_tokens.weight"].dtype == torch.float32  # saved in the input's dtype
    name = "model.layers.0.mlp.down_proj.weight"
    d_bf, d_fp = (w_bf[name] - w0[name]).flatten(), (w_fp[name] - w0[name]).flatten()
    assert d_bf.norm() > 0.1 * d_fp.norm() > 0  # it moved, about as far
    assert torch.nn.functional.cosine_similarity(d_bf, d_fp, dim=0) > 0.9


def test_early_stopping_ends_training_when_validation_worsens(tiny, pr_jsonl, tmp_path):
    out = main(_cfg(tiny, pr_jsonl, tmp_path / "es", lr=0.3, warmup_steps=0, max_steps=30,
                    eval_every=1, early_stop_patience=2))
    log = _log(out)
    vals = [e["val_loss"] for e in log if "val_loss" in e]
    assert len(vals) < 30
    assert min(vals[:-2]) <= min(vals[-2:])


def test_output_keeps_actprune_config_keys_but_never_foreign_code(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "config.json").write_text(json.dumps({
        "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"},
        "actprune_layer_widths": [10, 20], "dtype": "bfloat16"}))
    (src / "modeling_x.py").write_text("# custom\n")
    (dst / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    finish_output_dir(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert "auto_map" not in cfg and not (dst / "modeling_x.py").exists()
    assert cfg["actprune_layer_widths"] == [10, 20] and cfg["torch_dtype"] == "bfloat16"


def test_finetune_cli_reports_a_missing_text_field(tiny, pr_jsonl, tmp_path, capsys):
    rc = cli(["finetune", "--model", str(tiny), "--data", str(pr_jsonl), "--text-field", "answer",
              "-o", str(tmp_path / "x")])
    assert rc == 2
    assert "no field 'answer'" in capsys.readouterr().err


def test_lora_on_a_bf16_checkpoint_keeps_the_base_in_bf16(pr_jsonl, tmp_path):
    src = build_checkpoint(tmp_path / "bf16", arch="qwen3", dtype="bfloat16")
    recipe = FinetuneRecipe(_cfg(src, pr_jsonl, tmp_path / "out", lora=True, lora_r=4, max_steps=2))
    recipe.setup()
    base = recipe.model.get_base_model().model.layers[0].mlp.down_proj
    assert base.base_layer.weight.dtype == torch.bfloat16  # frozen base: stored dtype
    assert base.lora_A["default"].weight.dtype == torch.float32  # adapters: float32
    recipe.train()
    out = recipe.save()
    w = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in w.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_mix_data_fills_its_share_of_the_training_tokens_and_leaves_validation_alone(tiny, pr_jsonl, tmp_path,
                                                                                      capsys):
    mix = tmp_path / "general.txt"  # paragraphs of another domain, one word the traffic never has
    mix.write_text("\n\n".join(f"Zebrafish number {i} swims in the tank with the others." for i in range(200)))
    plain, mixed = (FinetuneRecipe(_cfg(tiny, pr_jsonl, tmp_path / name, **kw))
                    for name, kw in (("a", {}), ("b", {"mix_data": str(mix), "mix_share": 0.25})))
    plain.setup()
    mixed.setup()
    assert "of the training tokens" in capsys.readouterr().out
    assert torch.equal(mixed.val_rows, plain.val_rows)  # validation stays on --data
    n = len(plain.train_rows)  # packed in order: --data's rows, then the mix's
    assert torch.equal(mixed.train_rows[:n], plain.train_rows)
    assert "Zebrafish" not in plain.tok.decode(plain.train_rows.flatten())
    assert "Zebrafish number" in mixed.tok.decode(mixed.train_rows[n + 1])
    own, total = plain.train_rows.numel(), mixed.train_rows.numel()
    assert (total - own) / total == pytest.approx(0.25, abs=0.05)  # up to a paragraph and a row of rounding


def test_mix_data_refuses_a_share_out_of_range_and_the_training_data_itself(tiny, pr_jsonl, tmp_path):
    with pytest.raises(DataError, match="--mix-share"):
        main(_cfg(tiny, pr_jsonl, tmp_path / "o", mix_data="wiki:train", mix_share=1.0))
    with pytest.raises(DataError, match="is the training or validation data"):
        main(_cfg(tiny, pr_jsonl, tmp_path / "o", mix_data=str(pr_jsonl)))
    with pytest.raises(DataError, match="--mix-data .*no such file"):
        main(_cfg(tiny, pr_jsonl, tmp_path / "o", mix_data=str(tmp_path / "missing.txt")))


def test_finetune_cli_refuses_a_mix_share_without_mix_data(tiny, pr_jsonl, tmp_path, capsys):
    args = ["finetune", "--model", str(tiny), "--data", str(pr_jsonl), "-o", str(tmp_path / "o"), "--mix-share", "0.3"]
    assert cli(args) == 2
    assert "--mix-share needs --mix-data" in capsys.readouterr().err
