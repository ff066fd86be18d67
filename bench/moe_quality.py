"""Expert pruning quality of a Qwen3-MoE checkpoint (issue 15), with the shipped commands.

For each ratio of experts removed and each expert strategy and allocation: ``actprune plan``
(from the stats the server captured, and REAP's from ``actprune record`` when given), ``actprune
prune``, then ``actprune eval`` of the pruned model against the original on held-out text
(perplexity, KL to the original) and, with ``--tasks``, lm-eval accuracy. Each pruned checkpoint
is deleted once evaluated (``--keep`` keeps them): a 25 % slice of Qwen3-30B-A3B is 47 GB.
Results go to WORK/results.jsonl (a rerun does only what is missing) and ``--markdown`` prints
the table.

On a pod (not run by this project: there are no MoE weights on its machine; the tiny random
MoE of the tests runs it here):

    actprune serve Qwen/Qwen3-30B-A3B ...            # answer the traffic, then
    actprune stats pull http://127.0.0.1:8000 -o traffic.safetensors
    actprune record --model Qwen3-30B-A3B/ --data traffic.jsonl --device-map auto --dtype bfloat16 \\
        -o rec.safetensors                             # optional: REAP's reap_sum
    python bench/moe_quality.py --model Qwen3-30B-A3B/ --stats traffic.safetensors --reap-stats rec.safetensors \\
        --ratios 0.25 0.5 --data wiki:heldout --tasks arc_easy,hellaswag --work /workspace/moeq
    python bench/moe_quality.py --work /workspace/moeq --markdown
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

STRATEGIES = ("router_weighted", "frequency", "reap")


def configs(args: argparse.Namespace) -> list[dict]:
    out = []
    for ratio in args.ratios:
        for strategy in args.strategies:
            if strategy == "reap" and args.reap_stats is None:
                continue  # reap needs the offline recorder's reap_sum
            for per_layer in (False, True):
                out.append({"ratio": ratio, "strategy": strategy, "per_layer": per_layer})
    return out


def name(c: dict) -> str:
    return f"{c['strategy']}-{c['ratio']:g}{'-per-layer' if c['per_layer'] else ''}"


def actprune(*argv: str) -> None:
    cmd = [sys.executable, "-c", "from actprune.client.cli import main; raise SystemExit(main())", *argv]
    print("$ actprune " + " ".join(argv), flush=True)
    subprocess.run(cmd, check=True)


def run_one(c: dict, args: argparse.Namespace) -> dict:
    work = args.work / name(c)
    work.mkdir(parents=True, exist_ok=True)
    stats = args.reap_stats if c["strategy"] == "reap" else args.stats
    actprune("plan", "--model", str(args.model), "--stats", str(stats), "--expert-ratio", str(c["ratio"]),
             "--expert-strategy", c["strategy"], *(["--per-layer"] if c["per_layer"] else []),
             "-o", str(work / "plan.json"))
    actprune("prune", "--model", str(args.model), "--plan", str(work / "plan.json"), "-o", str(work / "model"))
    actprune("eval", "--model", str(args.model), "--model", str(work / "model"), "--data", args.data,
             "--max-tokens", str(args.max_tokens), *(["--tasks", args.tasks] if args.tasks else []),
             "-o", str(work / "eval"))
    original, pruned = json.loads((work / "eval" / "results.json").read_text())["models"]
    if not args.keep:
        shutil.rmtree(work / "model")
    return {**c, "name": name(c), "params": pruned["parameters"], "params_original": original["parameters"],
            "ppl": pruned["perplexity"], "ppl_original": original["perplexity"], "kl": pruned["kl_vs_first"],
            "tasks": pruned["tasks"], "tasks_original": original["tasks"]}


def markdown(rows: list[dict]) -> str:
    tasks = sorted({t for r in rows for t in r["tasks"]})
    head = "| experts removed | strategy | allocation | parameters | ppl × original | KL to original |"
    lines = [head + "".join(f" {t} acc (original) |" for t in tasks),
             "|---" * (6 + len(tasks)) + "|"]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["strategy"], r["per_layer"])):
        cells = [f"{r['ratio']:.0%}", r["strategy"], "per layer" if r["per_layer"] else "uniform",
                 f"{r['params'] / r['params_original']:.1%}", f"{r['ppl'] / r['ppl_original']:.3f}", f"{r['kl']:.4f}"]
        for t in tasks:
            m, o = r["tasks"].get(t, {}), r["tasks_original"].get(t, {})
            cells.append(f"{m.get('acc', float('nan')):.3f} ± {m.get('acc_stderr', 0):.3f} ({o.get('acc', float('nan')):.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="results.jsonl and the runs' folders")
    ap.add_argument("--model", type=Path, help="the unpruned Qwen3-MoE checkpoint")
    ap.add_argument("--stats", type=Path, help="stats captured by actprune serve (router counts and weights)")
    ap.add_argument("--reap-stats", type=Path, default=None, help="stats from actprune record (reap_sum)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--data", default="wiki:heldout", help="held-out text for perplexity and KL")
    ap.add_argument("--max-tokens", type=int, default=100_000)
    ap.add_argument("--tasks", default=None, help="lm-eval tasks, NAME[,NAME]")
    ap.add_argument("--keep", action="store_true", help="keep the pruned checkpoints")
    ap.add_argument("--markdown", action="store_true", help="print the table of WORK/results.jsonl")
    args = ap.parse_args()
    results = args.work / "results.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    if args.markdown:
        print(markdown(done))
        return 0
    if args.model is None or args.stats is None:
        ap.error("--model and --stats are needed to run (or --markdown to print)")
    for c in configs(args):
        if any(r["name"] == name(c) for r in done):
            continue
        row = run_one(c, args)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.append(row)
    print(markdown(done))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
