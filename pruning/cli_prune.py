"""`actprune prune`: checkpoint + plan.json -> a sliced checkpoint directory.

``--bias-compensation --stats F`` folds the mean contribution of removed units into output
biases (FLAP); the result then uses the actprune architecture (``trust_remote_code=True``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actprune.client.cli import UserError

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="source Hugging Face checkpoint directory")
    parser.add_argument("--plan", required=True, type=Path, help="plan.json from `actprune plan`")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--bias-compensation", action="store_true",
                        help="fold removed units' mean output into down_proj/o_proj biases (needs --stats)")
    parser.add_argument("--stats", type=Path, default=None, help="stats file, for --bias-compensation")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from actprune.client.wire.plan import Plan, PlanError
    from actprune.client.wire.stats import Stats, StatsFormatError
    from actprune.pruning.slicer import SliceError, slice_checkpoint

    if args.bias_compensation and args.stats is None:
        raise UserError("--bias-compensation needs --stats (the means of the removed units)")
    if args.stats is not None and not args.bias_compensation:
        raise UserError("--stats is only used with --bias-compensation")
    try:
        plan = Plan.load(args.plan)
        stats = Stats.load(args.stats) if args.bias_compensation else None
        out = slice_checkpoint(args.model, plan, args.output, stats=stats, overwrite=args.overwrite)
    except (PlanError, StatsFormatError, SliceError) as e:
        raise UserError(str(e)) from e
    print(f"pruned checkpoint: {out} ({plan.params_after:,} parameters, was {plan.params_before:,})")
    return 0
