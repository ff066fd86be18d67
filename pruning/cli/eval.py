"""`actprune eval`: perplexity, KL against the first model and generations, with a report.

    actprune eval --model original/ --model pruned/ --model recovered/ --data wiki:heldout -o eval/

Writes eval/results.json, eval/report.md and PNG plots beside it.
"""

from __future__ import annotations

import argparse

from actprune.pruning.checkpoint.trust import add_trust_flag

__all__ = ["configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True,
                   help="checkpoint directory; repeat, the first is the reference (original)")
    p.add_argument("--data", default="wiki:heldout", help="FILE.jsonl, FILE.txt or wiki:heldout")
    p.add_argument("--text-field", default=None, help="JSONL field holding the text")
    p.add_argument("--prompts", default=None, help=".txt (one per line) or .jsonl with 'prompt'")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per scored row")
    p.add_argument("--max-tokens", type=int, default=100_000, help="score at most this many tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("-o", "--output", required=True, help="report directory")
    add_trust_flag(p)


def run(args: argparse.Namespace) -> int:
    from actprune.core.errors import UsageError

    for name in ("seq_len", "max_tokens", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if len(set(args.model)) != len(args.model):
        raise UsageError("--model: the same checkpoint is given twice")

    from actprune.pruning.checkpoint.hf_io import load_tokenizer
    from actprune.pruning.data import load_texts, pack, tokenize
    from actprune.pruning.evaluate.perplexity import evaluate_models, load_prompts
    from actprune.pruning.evaluate.report import write_report

    tok = load_tokenizer(args.model[0], trust_remote_code=args.trust_remote_code)
    texts = load_texts(args.data, args.text_field, tok)
    rows = pack(tokenize(tok, texts), args.seq_len, tok.eos_token_id)
    rows = rows[: max(1, args.max_tokens // args.seq_len)]  # (N, L)
    prompts = load_prompts(args.prompts)
    results = evaluate_models(args.model, rows, prompts, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, trust_remote_code=args.trust_remote_code)
    meta = {"data": args.data, "text_field": args.text_field, "seq_len": args.seq_len,
            "rows": len(rows)}
    report = write_report(args.output, results, prompts, meta)
    for r in results:
        print(f"{r.name:>24}  ppl {r.perplexity:10.3f}  KL {r.kl_vs_first:.4f}")
    print(f"report: {report}")
    return 0
