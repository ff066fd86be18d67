"""Distillation throughput: training tokens per second of `actprune finetune --teacher`.

Builds (once, cached in --dir) a random Qwen3-shaped teacher and a student with the teacher's
shape but a narrower MLP (as a pruned model is), writes a synthetic text corpus, runs the real
recipe (``FinetuneRecipe``: student forward/backward, teacher forward, the mixed KD + LM loss,
AdamW) and times the optimizer steps after ``--warmup`` untimed ones:

    .venv/bin/python bench/distill_speed.py --dir /tmp/actprune-distill --json out.json
    # on a GPU, >= 1B parameters:
    .venv/bin/python bench/distill_speed.py --hidden 2048 --layers 28 --intermediate 6144 \
        --student-intermediate 3072 --vocab 151936 --dtype bfloat16 --bf16 --grad-checkpointing \
        --seq-len 2048 --batch-size 4 --steps 8

tokens/s = steps × batch-size × grad-accum × seq-len ÷ seconds of those steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from actprune.pruning.fixtures.synthetic import build_checkpoint

TEXTS = [
    "The old harbour town lies at the mouth of the river, where fishing boats return at dawn.",
    "Pruning removes neurons, attention heads or whole layers to make a model smaller.",
    "A tour guide explains the history of the castle, built in the twelfth century.",
    "Statistics of activations tell which parts of a network matter for the data.",
]


def build(root: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    shape = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                 num_key_value_heads=max(1, args.hidden // 256), head_dim=64, vocab_size=args.vocab,
                 max_position_embeddings=max(1024, args.seq_len))
    teacher, student = root / "teacher", root / "student"
    if not (teacher / "config.json").is_file():
        build_checkpoint(teacher, arch="qwen3", dtype=args.dtype, intermediate_size=args.intermediate, **shape)
    if not (student / "config.json").is_file():
        build_checkpoint(student, arch="qwen3", dtype=args.dtype, seed=1,
                         intermediate_size=args.student_intermediate, **shape)
    data = root / "corpus.txt"
    rows = (args.warmup + args.steps + 2) * args.batch_size * args.grad_accum
    data.write_text("\n\n".join(TEXTS * max(1, rows * args.seq_len // 50)))
    return teacher, student, data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/actprune-distill"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--student-intermediate", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--dtype", default="float32", help="stored dtype of both checkpoints")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (finetune --bf16)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--kd-hidden", type=float, default=0.0, metavar="BETA",
                    help="with the per-layer hidden-state loss (finetune --kd-hidden): its cost per token")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()

    import torch
    from actprune.pruning.recover.finetune import FinetuneConfig, FinetuneRecipe

    args.dir.mkdir(parents=True, exist_ok=True)
    teacher, student, data = build(args.dir, args)
    total = args.warmup + args.steps
    cfg = FinetuneConfig(model=str(student), teacher=str(teacher), data=str(data), output=str(args.dir / "out"),
                         max_steps=total, warmup_steps=1, lr=1e-5, seq_len=args.seq_len,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, val_fraction=0.0,
                         bf16=args.bf16, grad_checkpointing=args.grad_checkpointing, kd_alpha=0.5, kd_hidden=args.kd_hidden, progress=False,
                         stop_after_steps=args.warmup)
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()  # the untimed warm-up steps (stop_after_steps leaves the loop there)
    recipe.cfg.stop_after_steps = None
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    recipe.train()
    sync()
    seconds = time.perf_counter() - t0
    tokens = args.steps * args.batch_size * args.grad_accum * args.seq_len
    params = sum(p.numel() for p in recipe.model.parameters())
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
        "load_avg": round(os.getloadavg()[0], 2), "student_params_m": round(params / 1e6, 1),
        "teacher_intermediate": args.intermediate, "student_intermediate": args.student_intermediate,
        "dtype": args.dtype, "bf16": args.bf16, "grad_checkpointing": args.grad_checkpointing,
        "vocab": args.vocab, "seq_len": args.seq_len, "kd_hidden": args.kd_hidden,
        "rows_per_step": args.batch_size * args.grad_accum, "timed_steps": args.steps,
        "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
        "last_step": {k: v for k, v in recipe.history[-1].items() if k in ("step", "loss", "lm_loss", "kd_loss", "feature_loss")},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
