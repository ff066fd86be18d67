"""The evaluation report: ``results.json``, ``report.md`` and PNG plots (matplotlib, Agg).

Plots: kept MLP width per layer (from each config), perplexity and KL per model (and task
accuracy with its standard error, when lm-eval tasks were run), and the
training / validation loss curves of every model directory holding a ``finetune_log.jsonl``
(written by ``actprune finetune``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actprune.pruning.evaluate.perplexity import ModelResult

__all__ = ["read_finetune_log", "results_table", "task_metric", "write_report"]


def read_finetune_log(model_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(model_dir) / "finetune_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_widths(results: Sequence[ModelResult], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in results:
        ax.plot(range(len(r.mlp_widths)), r.mlp_widths, marker="o", label=r.name)
    ax.set(xlabel="layer", ylabel="MLP width (neurons kept)", title="Kept MLP width per layer")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def task_metric(metrics: dict[str, float]) -> str | None:
    """The metric a task is reported by: acc, else acc_norm, exact_match, else the first."""
    names = [k for k in metrics if k != "n" and "_stderr" not in k]
    return next((m for m in ("acc", "acc_norm", "exact_match") if m in names), names[0] if names else None)


def _task_columns(results: Sequence[ModelResult]) -> list[tuple[str, str]]:
    """(task, metric) of every task any model was scored on, in first-seen order."""
    cols: dict[tuple[str, str], None] = {}
    for r in results:
        for task, metrics in r.tasks.items():
            if (metric := task_metric(metrics)) is not None:
                cols[(task, metric)] = None
    return list(cols)


def _plot_quality(results: Sequence[ModelResult], path: Path) -> None:
    plt = _plt()
    tasks = _task_columns(results)
    fig, axes = plt.subplots(1, 3 if tasks else 2, figsize=(13.5 if tasks else 9, 3.5))
    a, b = axes[0], axes[1]
    names = [r.name for r in results]
    a.bar(names, [r.perplexity for r in results])
    a.set(title="Perplexity (held-out)", ylabel="perplexity")
    b.bar(names, [r.kl_vs_first for r in results])
    b.set(title=f"KL vs {names[0]}", ylabel="nats / token")
    if tasks:
        c, width = axes[2], 0.8 / len(tasks)
        for k, (task, metric) in enumerate(tasks):
            vals = [r.tasks.get(task, {}).get(metric, float("nan")) for r in results]
            errs = [r.tasks.get(task, {}).get(f"{metric}_stderr", 0.0) for r in results]
            c.bar([i + k * width for i in range(len(results))], vals, width, yerr=errs, capsize=3,
                  label=f"{task} {metric}")
        c.set_xticks([i + 0.4 - width / 2 for i in range(len(results))], names)
        c.set(title="Task accuracy (± standard error)", ylabel="score", ylim=(0, 1))
        c.legend(fontsize="small")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_losses(logs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, log in logs.items():
        train = [(e["step"], e["loss"]) for e in log if "loss" in e]
        val = [(e["step"], e["val_loss"]) for e in log if "val_loss" in e]
        if train:
            ax.plot(*zip(*train, strict=True), label=f"{name} train")
        if val:
            ax.plot(*zip(*val, strict=True), marker="o", label=f"{name} validation")
    ax.set(xlabel="optimizer step", ylabel="loss", title="Fine-tuning loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_table(results: Sequence[ModelResult]) -> list[str]:
    """The markdown table of the report, one line per model (``actprune eval`` prints it)."""
    first = results[0]
    tasks = _task_columns(results)
    lines = ["| model | parameters | perplexity | ×first | KL vs first (nats/token) |"
             + "".join(f" {task} {metric} (± s.e.) |" for task, metric in tasks),
             "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(tasks)]
    for r in results:
        cells = []
        for task, metric in tasks:
            m = r.tasks.get(task, {})
            cells.append(f"{m[metric]:.3f} ± {m.get(f'{metric}_stderr', float('nan')):.3f}" if metric in m else "–")
        lines.append(f"| {r.name} | {r.parameters:,} | {r.perplexity:.3f} | "
                     f"{r.perplexity / first.perplexity:.3f} | {r.kl_vs_first:.4f} |"
                     + "".join(f" {c} |" for c in cells))
    return lines


def write_report(
    out_dir: str | Path, results: Sequence[ModelResult], prompts: Sequence[str], meta: dict[str, Any]
) -> Path:
    """Write results.json, the plots and report.md into ``out_dir``; returns report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "prompts": list(prompts), "models": [r.to_json() for r in results]}, indent=2) + "\n")
    _plot_widths(results, out / "widths.png")
    _plot_quality(results, out / "quality.png")
    logs = {r.name: log for r in results if (log := read_finetune_log(r.path))}
    if logs:
        _plot_losses(logs, out / "loss.png")

    first = results[0]
    lines = [
        "# actprune evaluation", "",
        f"Held-out data: `{meta.get('data')}` — {first.tokens} predicted tokens in rows of "
        f"{meta.get('seq_len')} tokens. KL is KL(p_{first.name} ‖ p_model) per token."
        + (f" Tasks through lm-eval: {', '.join(meta['tasks'])} ({_task_note(results)})."
           if meta.get("tasks") else ""), "",
        *results_table(results),
    ]
    lines += ["", "![perplexity and KL](quality.png)", "", "![kept MLP width](widths.png)", ""]
    if logs:
        lines += ["![fine-tuning loss](loss.png)", ""]
    lines += ["## Greedy generations", ""]
    for i, p in enumerate(prompts):
        lines += [f"**Prompt:** `{_one_line(p)}`", "", "| model | continuation |", "| --- | --- |"]
        lines += [f"| {r.name} | {_one_line(r.generations[i])} |" for r in results]
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _task_note(results: Sequence[ModelResult]) -> str:
    counts = {task: int(m["n"]) for r in results for task, m in r.tasks.items() if "n" in m}
    return ", ".join(f"{task}: {n} documents" for task, n in counts.items())


def _one_line(s: str) -> str:
    return s.replace("\n", "⏎").replace("|", "\\|").replace("`", "'")
