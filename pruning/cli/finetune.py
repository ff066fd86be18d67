"""`actprune finetune`: recover a pruned checkpoint by fine-tuning or distillation.

    actprune finetune --model pruned/ --teacher original/ --data train.jsonl --text-field response \
        -o recovered/ --max-steps 2000 --save-every 200 --eval-every 100 [--resume]

Sizes not given (``--seq-len``, ``--batch-size``, ``--val-fraction``, ``--epochs``,
``--warmup-steps``) are picked from the data (actprune.pruning.recover.sizing); one printed
line names those that differ from the defaults for a large corpus.

With ``--teacher`` the loss is distillation mixed with the LM loss (see actprune.pruning.
finetune); without it, plain fine-tuning. The output is a normal Hugging Face checkpoint.

Several GPUs, one process each, model and teacher sharded with FSDP2 (actprune.pruning.
distributed); ``--batch-size`` is per process:

    torchrun --nproc-per-node 8 $(which actprune) finetune --fsdp --model pruned/ ...
"""

from __future__ import annotations

import argparse

from actprune.pruning.checkpoint.trust import add_trust_flag

__all__ = ["configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint to train (the pruned model)")
    p.add_argument("--data", required=True, help="FILE.jsonl, FILE.txt or wiki:train")
    p.add_argument("--text-field", default=None, help="JSONL field to train on, e.g. response")
    p.add_argument("--val-data", default=None, help="validation data (default: split off --data)")
    p.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    p.add_argument("--teacher", default=None, help="the unpruned original: distil from it")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: 1, up to 3 when an epoch is under 20 steps")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--schedule", choices=("cosine", "steps"), default="cosine",
                   help="cosine decay, or one learning rate per epoch (--epoch-lrs)")
    p.add_argument("--epoch-lrs", type=float, nargs="+", default=[],
                   help="for --schedule steps, e.g. 2e-5 1e-5 5e-6 (default: halve each epoch)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="default: 100, at most a tenth of the run")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per micro-batch (default: 8, halved until an epoch is >= 4 steps)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per packed row (default: 1024, halved until the data gives 16 rows)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="documents held out (default: 0.05, raised up to 0.25 to fill one row)")
    p.add_argument("--max-val-batches", type=int, default=50, help="validation batches at most")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast where supported")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: at the end)")
    p.add_argument("--early-stop-patience", type=int, default=0,
                   help="stop after N validations without improvement (0: never); the output "
                        "then holds the weights of the best validation")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in -o (not with --fsdp yet)")
    p.add_argument("--device-map", default=None,
                   help="'auto': spread the model over all visible GPUs in one process")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: one process per GPU, model sharded with FSDP2, "
                        "--batch-size per process; --resume/--save-every not supported yet")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters, merged before saving")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the KL term (1: KL only)")
    p.add_argument("--teacher-topk", type=int, default=0, metavar="K",
                   help="run the teacher once over the training rows and keep its top-K next tokens on disk "
                        "(safetensors); training then needs no teacher in memory. Loss: the KL on those K "
                        "tokens plus 'any other' (0: the live teacher, full vocabulary; 64 is a good start)")
    p.add_argument("--kd-hidden", type=float, default=0.0, metavar="BETA",
                   help="add BETA x a per-layer hidden-state loss: each layer's output follows the teacher's on the "
                        "same tokens (mean over layers and tokens of |h_s - h_t|^2 / |h_t|^2; Minitron's "
                        "intermediate-state loss). Keeps the teacher in memory, even with --teacher-topk (0: off)")
    p.add_argument("--local-steps", type=int, default=0, metavar="N",
                   help="before global training, train each layer N steps to reproduce the teacher's layer "
                        "from the teacher's layer input (block-wise distillation; each layer keeps its best "
                        "held-out error). Needs --teacher and the teacher's layer count (0: off)")
    p.add_argument("--local-lr", type=float, default=3e-4, help="learning rate of the local stage")
    p.add_argument("--local-tokens", type=int, default=16384,
                   help="training tokens the local stage uses (it stores 2 x layers x tokens x hidden floats)")
    p.add_argument("--teacher-cache", default=None, metavar="FILE",
                   help="where the top-K file goes (default OUT/cache/teacher_topk.safetensors); reused when it "
                        "matches the data, K, temperature and teacher")
    p.add_argument("--mix-data", default=None, metavar="SOURCE",
                   help="general text (FILE.txt, FILE.jsonl with 'text' or 'messages', wiki:train) mixed into "
                        "the training rows, so the model keeps more of what it knew outside your traffic; "
                        "validation stays on --data")
    p.add_argument("--mix-share", type=float, default=None, metavar="S",
                   help="share of the training tokens --mix-data fills (default 0.25)")
    p.add_argument("--seed", type=int, default=0)
    add_trust_flag(p)


def run(args: argparse.Namespace) -> int:
    from actprune.core.errors import UsageError
    from actprune.pruning.recover.finetune import FinetuneConfig, main

    if args.mix_share is not None and not args.mix_data:
        raise UsageError("--mix-share needs --mix-data SOURCE")
    fields = set(FinetuneConfig.__dataclass_fields__)
    given = {k: v for k, v in vars(args).items() if k in fields and not (k == "mix_share" and v is None)}
    cfg = FinetuneConfig(**given)
    out = main(cfg)
    if out is not None:  # None on ranks other than 0 under --fsdp
        print(f"wrote {out}")
    return 0
