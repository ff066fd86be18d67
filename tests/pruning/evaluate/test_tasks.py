"""Task accuracy through the real lm-eval harness, on tiny models and the local task shipped
with actprune (offline): a number in [0, 1] with its standard error, in the report beside
perplexity and KL, and a model that knows the answers scores apart from one broken on purpose."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from actprune.client.cli import main as cli
from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
from actprune.pruning.evaluate.harness import SHIPPED_TASKS_DIR, run_tasks
from actprune.pruning.recover.finetune import FinetuneConfig, main

FACTS = [json.loads(ln) for ln in (SHIPPED_TASKS_DIR / "actprune_facts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def knows_facts(tiny, tmp_path_factory) -> Path:
    """The tiny model fine-tuned on the task's true statements ("The capital of France is Paris")."""
    root = tmp_path_factory.mktemp("facts")
    data = root / "facts.txt"
    data.write_text("\n\n".join(f"{d['question']} {d['choices'][d['answer']]}" for d in FACTS * 4))
    return main(FinetuneConfig(model=str(tiny), data=str(data), output=str(root / "knows"), lr=3e-3,
                               max_steps=60, warmup_steps=3, seq_len=32, batch_size=4, val_fraction=0.0,
                               progress=False))


@pytest.fixture(scope="module")
def broken(knows_facts, tmp_path_factory) -> Path:
    """The same model with its output rows shuffled: every token's logit goes to another token."""
    model = load_causal_lm(knows_facts)
    with torch.no_grad():
        w = model.lm_head.weight  # (V, H)
        w.copy_(w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))])
    out = tmp_path_factory.mktemp("broken") / "broken"
    model.save_pretrained(str(out))
    load_tokenizer(knows_facts).save_pretrained(str(out))
    return out


def test_shipped_task_gives_an_accuracy_in_0_1_with_its_standard_error(tiny):
    scores = run_tasks(load_causal_lm(tiny), load_tokenizer(tiny), ["actprune_facts"], limit=12)
    facts = scores["actprune_facts"]
    assert facts["n"] == 12
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= facts[metric] <= 1.0
        # the standard error of a mean of 0/1 outcomes over n documents
        p = facts[metric]
        assert facts[f"{metric}_stderr"] == pytest.approx((p * (1 - p) / (12 - 1)) ** 0.5)


def test_eval_reports_accuracy_beside_perplexity_and_kl(knows_facts, broken, tour_jsonl, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli(["eval", "--model", str(knows_facts), "--model", str(broken), "--data", str(tour_jsonl),
              "--text-field", "response", "--max-new-tokens", "2", "--tasks", "actprune_facts", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    models = json.loads((out / "results.json").read_text())["models"]
    knows, bad = (m["tasks"]["actprune_facts"] for m in models)
    assert knows["n"] == bad["n"] == len(FACTS)
    assert knows["acc"] >= 0.9  # trained on the true statements
    assert bad["acc"] <= 0.6 and bad["acc_stderr"] > 0  # near chance (0.25) once broken
    row = f"{bad['acc']:.3f} ± {bad['acc_stderr']:.3f} |"
    md = (out / "report.md").read_text()
    assert "actprune_facts acc (± s.e.)" in md and row in md
    assert row in printed  # the same table on stdout
    width = struct.unpack(">I", (out / "quality.png").read_bytes()[16:20])[0]
    assert width >= 1300  # three panels: perplexity, KL and task accuracy


def test_a_task_yaml_of_ones_own_reads_its_local_data_beside_it(tiny, tmp_path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "harbour.jsonl").write_text("".join(json.dumps(d) + "\n" for d in FACTS[:5]))
    yaml = (SHIPPED_TASKS_DIR / "actprune_facts.yaml").read_text()
    (tasks / "harbour.yaml").write_text(yaml.replace("task: actprune_facts", "task: harbour")
                                        .replace("test: actprune_facts.jsonl", "test: harbour.jsonl"))
    scores = run_tasks(load_causal_lm(tiny), load_tokenizer(tiny), [str(tasks / "harbour.yaml")])
    assert scores["harbour"]["n"] == 5


@pytest.mark.parametrize(("tasks", "message"), [
    ("no_such_task_xyz", "unknown task 'no_such_task_xyz'"),
    ("actprune_facts,", "empty task name"),
    ("missing.yaml", "missing.yaml: no such task YAML"),
])
def test_bad_task_names_are_one_line_before_any_model_loads(tasks, message, tmp_path, capsys):
    rc = cli(["eval", "--model", str(tmp_path / "not-loaded"), "--tasks", tasks])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and message in err, err


def test_lm_eval_is_imported_only_for_tasks_and_its_hf_path_needs_no_vllm():
    code = (
        "import sys\n"
        "import actprune.pruning.cli.eval, actprune.pruning.evaluate.harness, actprune.pruning.evaluate.report\n"
        "assert 'lm_eval' not in sys.modules\n"
        "from lm_eval import simple_evaluate\n"
        "from lm_eval.models.huggingface import HFLM\n"
        "from lm_eval.tasks import TaskManager\n"
        "assert 'vllm' not in sys.modules, 'lm-eval pulled in vllm'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_python_api_evaluate_takes_tasks_too(knows_facts, tour_jsonl, tmp_path):
    from actprune.pruning import workflow as api

    (result,) = api.evaluate([knows_facts], str(tour_jsonl), text_field="response", max_new_tokens=1,
                             progress=False, tasks=["actprune_facts"], output=tmp_path / "r")
    assert result.tasks["actprune_facts"]["acc"] >= 0.9
    assert json.loads((tmp_path / "r" / "results.json").read_text())["meta"]["tasks"] == ["actprune_facts"]
