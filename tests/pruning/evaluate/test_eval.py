"""Evaluation: perplexity, KL against the first model, generations and the report."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from actprune.client.cli import main as cli
from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
from actprune.pruning.data import load_texts, pack, tokenize
from actprune.pruning.evaluate.perplexity import evaluate_models
from actprune.pruning.fixtures.synthetic import build_checkpoint


@pytest.fixture(scope="module")
def rows(tiny, pr_jsonl):
    tok = load_tokenizer(tiny)
    return pack(tokenize(tok, load_texts(str(pr_jsonl), "response")), 32, tok.eos_token_id)[:5]


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("other") / "qwen3", arch="qwen3", seed=11)


def test_perplexity_is_exp_of_the_mean_token_nll(tiny, other, rows):
    results = evaluate_models([str(tiny), str(other)], rows, ["Hi"], batch_size=2,
                              max_new_tokens=2, progress=False)
    for r, d in zip(results, (tiny, other), strict=True):
        model = load_causal_lm(d)
        with torch.no_grad():  # transformers' own loss, one row at a time: mean over L-1 tokens
            nll = [model(input_ids=row[None], labels=row[None]).loss.item() for row in rows]
        assert r.tokens == rows.shape[0] * (rows.shape[1] - 1)
        assert r.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert results[0].perplexity != pytest.approx(results[1].perplexity, rel=1e-3)


def test_kl_of_a_model_against_itself_is_zero_and_against_another_positive(tiny, other, rows, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(tiny, twin)
    results = evaluate_models([str(tiny), str(twin), str(other)], rows, ["Hi"],
                              max_new_tokens=3, progress=False)
    assert results[0].kl_vs_first == 0.0
    assert abs(results[1].kl_vs_first) < 1e-9
    assert results[2].kl_vs_first > 0.05
    assert results[0].generations == results[1].generations  # greedy is deterministic


def test_eval_cli_writes_json_markdown_and_plots(tiny, other, pr_jsonl, tmp_path, capsys):
    # a fake fine-tune log beside the second model makes the report plot loss curves
    second = tmp_path / "recovered"
    shutil.copytree(other, second)
    (second / "finetune_log.jsonl").write_text(
        '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "val_loss": 2.5}\n')
    prompts = tmp_path / "p.txt"
    prompts.write_text("The museum opens at\n")
    out = tmp_path / "report"
    rc = cli(["eval", "--model", str(tiny), "--model", str(second), "--data", str(pr_jsonl),
              "--text-field", "response", "--prompts", str(prompts), "--seq-len", "32",
              "--max-new-tokens", "3", "-o", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["qwen3", "recovered"]
    assert res["prompts"] == ["The museum opens at"]
    assert all(len(m["generations"]) == 1 for m in res["models"])
    for png in ("widths.png", "quality.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    md = (out / "report.md").read_text()
    assert "| recovered |" in md and "![fine-tuning loss](loss.png)" in md
    assert f"{res['models'][1]['perplexity']:.3f}" in md


def test_eval_cli_rejects_the_same_model_twice(tiny, pr_jsonl, tmp_path, capsys):
    rc = cli(["eval", "--model", str(tiny), "--model", str(tiny), "--data", str(pr_jsonl), "-o", str(tmp_path)])
    assert rc == 2
    assert "given twice" in capsys.readouterr().err
