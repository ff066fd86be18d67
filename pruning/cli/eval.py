"""`actprune eval`: perplexity, KL against the first model and generations, with a report.

    actprune eval --model original/ --model pruned/ --model recovered/ --data wiki:heldout -o eval/

With ``--tasks actprune_facts[,hellaswag,...]`` also task accuracy through lm-eval
(actprune.pruning.evaluate.harness). Prints the results table; with ``-o`` also writes
eval/results.json, eval/report.md and PNG plots beside it. Without ``--seq-len``, rows are 512 tokens, shorter when the data is small
(one printed line says so).
"""

from __future__ import annotations

import argparse

from actprune.pruning.checkpoint.trust import add_trust_flag

__all__ = ["configure", "run"]

DEFAULT_SEQ_LEN = 512


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True,
                   help="checkpoint directory; repeat, the first is the reference (original)")
    p.add_argument("--data", default="wiki:heldout", help="FILE.jsonl, FILE.txt or wiki:heldout")
    p.add_argument("--text-field", default=None, help="JSONL field holding the text")
    p.add_argument("--prompts", default=None, help=".txt (one per line) or .jsonl with 'prompt'")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per scored row (default: 512, halved until the data fills 4 rows)")
    p.add_argument("--max-tokens", type=int, default=100_000, help="score at most this many tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--tasks", default=None,
                   help="lm-eval tasks, NAME[,NAME]: shipped (actprune_facts, offline), a task "
                        "YAML path with a local dataset, or lm-eval's own (hellaswag, arc_easy: "
                        "downloaded from the Hub)")
    p.add_argument("--task-limit", type=int, default=None, help="at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (task default)")
    p.add_argument("-o", "--output", default=None,
                   help="report directory (default: print the table only, write nothing)")
    add_trust_flag(p)


def run(args: argparse.Namespace) -> int:
    from actprune.core.errors import UsageError

    for name in ("seq_len", "max_tokens", "batch_size", "max_new_tokens", "task_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError("--num-fewshot must be >= 0")
    if len(set(args.model)) != len(args.model):
        raise UsageError("--model: the same checkpoint is given twice")

    from actprune.pruning.checkpoint.hf_io import load_tokenizer
    from actprune.pruning.data import DataError, load_texts, pack, pick_seq_len, tokenize
    from actprune.pruning.evaluate.harness import TaskSuite, parse_tasks
    from actprune.pruning.evaluate.perplexity import evaluate_models, load_prompts
    from actprune.pruning.evaluate.report import results_table, write_report

    suite = None  # resolved first: an unknown task name fails before any model loads
    if args.tasks:
        suite = TaskSuite.load(parse_tasks(args.tasks), batch_size=args.batch_size,
                               limit=args.task_limit, num_fewshot=args.num_fewshot)
    tok = load_tokenizer(args.model[0], trust_remote_code=args.trust_remote_code)
    docs = tokenize(tok, load_texts(args.data, args.text_field, tok))
    n_tokens = sum(len(d) + 1 for d in docs)
    seq_len = pick_seq_len(min(n_tokens, args.max_tokens), args.seq_len, DEFAULT_SEQ_LEN)
    try:
        rows = pack(docs, seq_len, tok.eos_token_id)
    except DataError as e:
        raise DataError(f"--data {args.data}: {e}; add data" + (" or lower --seq-len" if args.seq_len else "")) from e
    if seq_len != (args.seq_len or DEFAULT_SEQ_LEN):
        print(f"small data ({n_tokens:,} tokens): --seq-len {seq_len} (give --seq-len to override)")
    rows = rows[: max(1, args.max_tokens // seq_len)]  # (N, L)
    prompts = load_prompts(args.prompts)
    results = evaluate_models(args.model, rows, prompts, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, trust_remote_code=args.trust_remote_code,
                              tasks=suite)
    print("\n".join(results_table(results)))
    if args.output:
        meta = {"data": args.data, "text_field": args.text_field, "seq_len": seq_len, "rows": len(rows),
                "tasks": suite.names if suite else []}
        print(f"report: {write_report(args.output, results, prompts, meta)}")
    return 0
