"""Gradual pruning vs one-shot at the same recovery budget (issue 14, item 5), on SmolLM2-135M.

Both rows are ``actprune iterate`` runs from the dense model, with the same planner settings
(per-layer MLP widths, ``--refit``), the same recovery (distillation from the original, teacher
top-64 cached on disk, lr ``--lr``) and the same training data — the ``--budget``-token slice of
``wiki:train`` that ``bench/recovery.py`` trains on — and the same number of optimizer steps:

- ``gradual``: 20 → 30 → 40 % of MLP neurons, re-recorded on each recovered model, one epoch of
  the slice after each round (``--budget / 1024`` steps of 4 rows of 256);
- ``oneshot``: 40 % at once, then three epochs of the same slice (three times the steps).

So each sees every training row three times; only the schedule differs. Evaluation as in
``bench/recovery.py`` (never used for a choice): perplexity ÷ dense on held-out Wikipedia and the
three out-of-domain texts of :mod:`texts`, KL(dense ‖ model) on each, lm-eval's
``actprune_facts``. ``oneshot-norecovery`` is the 40 % model before its recovery.

    nice -n 5 .venv/bin/python bench/gradual.py --cache /tmp/rq14 --eval-tokens 2048
    .venv/bin/python bench/gradual.py --cache /tmp/rq14 --eval-tokens 2048 --markdown

Results are appended to ``CACHE/gradual-eEVAL_TOKENS.jsonl``; a rerun does only what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_results import load_results  # noqa: E402
from recovery import (  # noqa: E402
    BATCH,
    DENSE_NAME,
    SEQ_TRAIN,
    TASK,
    budget_data,
    dense_logp,
    eval_rows,
    evaluate_model,
    train,
)

ROWS = ("gradual", "oneshot", "oneshot-norecovery")
SCHEDULES = {"gradual": (0.2, 0.3, 0.4), "oneshot": (0.4,)}


def iterate_args(row: str, args: argparse.Namespace, dense: Path, data: Path, val: Path, out: Path) -> list[str]:
    """The `actprune iterate` command line of one schedule: the same optimizer steps in all."""
    ratios = SCHEDULES[row]
    epoch = args.budget // (SEQ_TRAIN * BATCH)  # steps of one pass over the slice
    steps = epoch * len(SCHEDULES["gradual"]) // len(ratios)
    finetune = {"lr": args.lr, "warmup_steps": max(1, steps // 10), "batch_size": BATCH, "seq_len": SEQ_TRAIN,
                "kd_alpha": 1.0, "teacher_topk": 64, "val_data": str(val), "seed": 0}
    return [str(Path(sys.executable).parent / "actprune"), "iterate", "--model", str(dense), "-o", str(out),
            "--ratios", *map(str, ratios), "--max-ppl-ratio", "1000", "--per-layer", "--refit",
            "--calibration", "wiki:calibration", "--calibration-tokens", str(args.calibration_tokens),
            "--train-data", str(data), "--finetune-steps", str(steps), "--finetune-config", json.dumps(finetune),
            "--eval-tokens", str(args.eval_tokens), "--overwrite"]


def markdown(path: Path) -> str:
    recs = list(load_results(path).values())
    texts = ("wiki", "opticks", "pydoc", "code")
    dense = next((r for r in recs if r["key"] == "dense"), None)
    head = ("| model | slice (tokens, seen 3×) | " + " | ".join(f"{t} ppl ×dense" for t in texts) + " | "
            + " | ".join(f"{t} KL" for t in texts) + f" | {TASK} acc | CPU-min |")
    lines = [head, "|" + "---|" * (len(texts) * 2 + 4)]
    for r in recs:
        ppl = [f"{r[f'{t}_ppl'] / dense[f'{t}_ppl']:.3f} ({r[f'{t}_ppl']:.2f})" if dense else f"{r[f'{t}_ppl']:.2f}"
               for t in texts]
        task = r.get("task")
        acc = f"{task['acc']:.3f} ± {task['acc_stderr']:.3f}" if task else "—"
        cpu = f"{r['train_cpu_s'] / 60:.1f}" if r.get("train_cpu_s") else "—"
        name = r.get("row", r["key"]) + (f" (lr {r['lr']:g})" if "lr" in r else "")
        lines.append(f"| {name} | {r.get('budget', '—')} | " + " | ".join(ppl) + " | "
                     + " | ".join(f"{r[f'{t}_kl']:.4f}" for t in texts) + f" | {acc} | {cpu} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/rq14", help="bench/recovery.py's cache (dense model, data, dense log-probs)")
    p.add_argument("--budget", type=int, default=16384, help="tokens of the training slice (one epoch)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--calibration-tokens", type=int, default=16384, help="recorded and refitted on, per round")
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens per evaluation text")
    p.add_argument("--no-task", action="store_true", help=f"skip lm-eval's {TASK}")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    cache = Path(args.cache)
    path = cache / f"gradual-e{args.eval_tokens}.jsonl"
    if args.markdown:
        print(markdown(path))
        return
    torch.set_num_threads(1)
    from actprune.pruning.checkpoint.hf_io import load_tokenizer

    dense_dir = cache / "models" / DENSE_NAME
    tok = load_tokenizer(str(dense_dir))
    rows = eval_rows(tok, args.eval_tokens)
    ref = dense_logp(cache, dense_dir, rows)
    data, val = budget_data(cache, tok, args.budget)
    done = load_results(path)

    def evaluate(key: str, model_dir: Path, extra: dict) -> None:
        evaluate_model(path, key, model_dir, extra, tok=tok, rows=rows, ref=ref, dense_dir=dense_dir,
                       task=not args.no_task)

    if "dense" not in done:
        evaluate("dense", dense_dir, {})
    for row in filter(None, args.rows.split(",")):
        schedule = "oneshot" if row.startswith("oneshot") else row
        key = f"{row}@{args.budget}|lr={args.lr:g}"
        if key in done:
            continue
        out = cache / "runs" / f"iterate-{schedule}-{args.budget}-lr={args.lr:g}"
        cmd = iterate_args(schedule, args, dense_dir, data, val, out)
        t0 = time.time()
        cost = train(cmd, out)  # iterate resumes a killed run, and is a no-op on a finished one
        state = json.loads((out / "iterate.json").read_text())
        last = state["steps"][-1]
        model_dir = Path(last["pruned"] if row.endswith("norecovery") else last["recovered"])
        evaluate(key, model_dir, {"row": row, "budget": args.budget, "lr": args.lr, "cmd": " ".join(cmd[1:]),
                                  "achieved_ratio": last["achieved_ratio"], "parameters": last["parameters"],
                                  **cost, "wall_s": round(time.time() - t0)})


if __name__ == "__main__":
    main()
