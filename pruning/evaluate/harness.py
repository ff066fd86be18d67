"""Task accuracy with the EleutherAI LM Evaluation Harness (the PyPI package ``lm-eval``).

``actprune eval --tasks NAME[,NAME]`` scores every model with ``lm_eval.simple_evaluate`` and
its Hugging Face model class (``HFLM``), handed the model actprune has already loaded (so a
pruned checkpoint of the actprune architecture needs no ``trust_remote_code`` there, and the
model is not loaded twice). A name is one of:

* a task shipped with actprune, in ``pruning/evaluate/tasks/`` (``actprune_facts``: 40
  handwritten multiple-choice facts, offline);
* a path to a task YAML of your own, with a local dataset (``dataset_path: json`` and
  ``dataset_kwargs: {data_files: {test: FILE.jsonl}}``; a relative ``data_files`` path is read
  beside the YAML);
* any task of lm-eval's own registry (``hellaswag``, ``arc_easy``, ``mmlu``, …): its dataset
  downloads from the Hugging Face Hub as usual, so it needs network access (a pod).

Each result keeps every metric with its standard error, e.g. ``{"acc": 0.62, "acc_stderr":
0.02, "acc_norm": …, "n": 2376}``. lm-eval is heavy (datasets, pandas, …) and imported only
when tasks are asked for; its HF path does not import vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actprune.core.errors import UsageError

__all__ = ["SHIPPED_TASKS_DIR", "TaskSuite", "parse_tasks", "run_tasks", "shipped_tasks", "task_config"]

SHIPPED_TASKS_DIR = Path(__file__).parent / "tasks"


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in SHIPPED_TASKS_DIR.glob("*.yaml"))


def parse_tasks(value: str) -> list[str]:
    """``--tasks a,b`` → ['a', 'b'] (a UsageError for an empty name)."""
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        raise UsageError(f"--tasks {value!r}: empty task name; give NAME[,NAME...]")
    return names


def task_config(path: str | Path) -> dict[str, Any]:
    """A local task YAML as an lm-eval config dict, its relative ``data_files`` made absolute
    (beside the YAML) and checked to exist."""
    import yaml

    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--tasks {path}: cannot read the task YAML ({e})") from e
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise UsageError(f"--tasks {path}: not an lm-eval task config (no 'task' key)")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        resolved = {}
        for split, f in files.items():
            p = Path(f) if Path(f).is_absolute() else path.parent / f
            if not p.is_file():
                raise UsageError(f"--tasks {path}: data file {p} of split {split!r} does not exist")
            resolved[split] = str(p.resolve())
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": resolved}
    return cfg


def _specs(names: Sequence[str]) -> tuple[list[str | dict[str, Any]], bool]:
    """lm-eval task specs for ``names``, and whether lm-eval's own registry is needed."""
    specs: list[str | dict[str, Any]] = []
    registry = False
    for name in names:
        shipped = SHIPPED_TASKS_DIR / f"{name}.yaml"
        if shipped.is_file():
            specs.append(task_config(shipped))
        elif name.endswith((".yaml", ".yml")):
            if not Path(name).is_file():
                raise UsageError(f"--tasks {name}: no such task YAML")
            specs.append(task_config(name))
        else:
            specs.append(name)
            registry = True
    return specs, registry


def _scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"acc,none": …, "acc_stderr,none": …}`` per task → ``{"acc": …,
    "acc_stderr": …, "n": …}``; filters other than ``none`` keep their suffix."""
    out: dict[str, dict[str, float]] = {}
    samples = results.get("n-samples", {})
    for task, metrics in results["results"].items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else f"{metric}[{filt}]"] = float(value)
        if task in samples:
            row["n"] = float(samples[task]["effective"])
        out[task] = row
    return out


@dataclass
class TaskSuite:
    """Tasks resolved once (unknown names refused before any model loads), then run on each
    model with :meth:`run`."""

    names: list[str]
    specs: list[str | dict[str, Any]]
    manager: Any  # lm_eval.tasks.TaskManager
    batch_size: int = 8
    limit: int | None = None  # at most this many documents per task
    num_fewshot: int | None = None
    seed: int = 0

    @classmethod
    def load(cls, names: Sequence[str], **options: Any) -> TaskSuite:
        specs, registry = _specs(names)
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_defaults=registry)  # lm-eval's index of ~15k names: 5 s
        unknown = [s for s in specs if isinstance(s, str) and s not in manager.all_tasks]
        if unknown:
            raise UsageError(f"--tasks: unknown task {unknown[0]!r}: neither shipped "
                             f"({', '.join(shipped_tasks())}), a task YAML, nor one of lm-eval's")
        return cls(list(names), specs, manager, **options)

    def run(self, model: Any, tokenizer: Any) -> dict[str, dict[str, float]]:
        """Score a loaded transformers model; per task, metrics and standard errors."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        # backend: every registry family is a causal LM (the actprune architecture included,
        # which lm-eval's detection does not know)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, backend="causal")
        seed = self.seed
        results = simple_evaluate(
            model=lm, tasks=self.specs, task_manager=self.manager, num_fewshot=self.num_fewshot,
            limit=self.limit, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
        return {} if results is None else _scores(results)  # None: ranks other than 0


def run_tasks(model: Any, tokenizer: Any, names: Sequence[str], **options: Any) -> dict[str, dict[str, float]]:
    """:class:`TaskSuite` of ``names`` (``options``: batch_size, limit, num_fewshot, seed) run
    on one model."""
    return TaskSuite.load(names, **options).run(model, tokenizer)
