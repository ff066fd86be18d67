"""`actprune record`: activation statistics from a local checkpoint and a text file.

    actprune record --model DIR --data FILE.jsonl --text-field text --max-tokens 200000 -o stats.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actprune.pruning.checkpoint.trust import add_trust_flag

__all__ = ["configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--data", required=True, help="FILE.jsonl, FILE.txt or wiki:calibration")
    p.add_argument("--text-field", default=None, help="JSONL field holding the text")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per text at most")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--near-zero-threshold", type=float, default=None,
                   help="|x| at or below this counts as near zero (default 1e-3)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default: as stored)")
    p.add_argument("--device-map", default=None,
                   help='where the model runs: "cuda", "auto" (layers spread over the visible GPUs, for '
                        "a model larger than one), or a transformers device map (default: CPU); each "
                        "layer's statistics accumulate on its own device")
    p.add_argument("-o", "--output", required=True, help="stats file to write (.safetensors)")
    add_trust_flag(p)


def run(args: argparse.Namespace) -> int:
    from actprune.core.errors import UsageError

    for name in ("max_tokens", "max_len", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    import torch
    from actprune.core.wire.schema import DEFAULT_NEAR_ZERO
    from actprune.pruning.checkpoint.hf_io import (
        load_causal_lm,
        load_tokenizer,
        read_config,
    )
    from actprune.pruning.data import load_texts, tokenize
    from actprune.pruning.record import budget, record

    config = read_config(args.model)
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    texts = load_texts(args.data, args.text_field, tok)
    model = load_causal_lm(args.model, getattr(torch, args.dtype) if args.dtype else None,
                           device_map=args.device_map, trust_remote_code=args.trust_remote_code)
    token_lists = budget(tokenize(tok, texts), args.max_len, args.max_tokens)
    if not token_lists:
        raise UsageError(f"--data {args.data}: no tokens to record")
    threshold = DEFAULT_NEAR_ZERO if args.near_zero_threshold is None else args.near_zero_threshold
    stats = record(model, token_lists, model_name=str(Path(args.model).name), config=config,
                   batch_size=args.batch_size, pad_id=tok.pad_token_id,
                   near_zero_threshold=threshold)
    out = stats.save(args.output)
    print(f"recorded {stats.tokens} tokens over {len(stats.layers)} layers -> {out}")
    return 0
