"""`actprune prune`: checkpoint + plan.json -> a sliced checkpoint directory.

``--bias-compensation --stats F`` folds the mean contribution of removed units into output
biases (FLAP); the result then uses the actprune architecture (its modeling files come with
actprune, which loads it without ``--trust-remote-code``; plain transformers needs
``trust_remote_code=True``).
``--refit DATA`` instead refits the kept ``down_proj`` columns and a bias by ridge least squares
on the activations of DATA, layer by layer (:mod:`actprune.pruning.compensate.calibrate`): the pruned MLP
reproduces the dense one's output, not only its mean; in layers that lose heads, the kept
``o_proj`` columns and a bias likewise (``--no-refit-attention``: MLP only). Same architecture. ``--trust-remote-code``
lets ``--refit`` run code the source checkpoint names in ``auto_map``; slicing alone never runs
checkpoint code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actprune.core.errors import UsageError
from actprune.pruning.checkpoint.trust import add_trust_flag
from actprune.pruning.cli import add_device_flag, check_anchor, check_device

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="source Hugging Face checkpoint directory")
    parser.add_argument("--plan", required=True, type=Path, help="plan.json from `actprune plan`")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--bias-compensation", action="store_true",
                        help="fold removed units' mean output into down_proj/o_proj biases (needs --stats)")
    parser.add_argument("--stats", type=Path, default=None, help="stats file, for --bias-compensation")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    g = parser.add_argument_group("MLP refit (generalised bias compensation)")
    g.add_argument("--refit", metavar="DATA", default=None,
                   help="refit kept down_proj columns + bias on DATA: wiki:calibration, FILE.txt or FILE.jsonl")
    g.add_argument("--refit-tokens", type=int, default=32768, help="calibration tokens for --refit")
    g.add_argument("--refit-seq-len", type=int, default=512, help="tokens per packed row for --refit")
    g.add_argument("--refit-ridge", type=_ridge, default=None,
                   help="ridge towards the plain slice, relative to the mean activation power (default 1e-2), "
                        "or 'auto': per layer, the value that reconstructs held-out calibration tokens best")
    g.add_argument("--refit-sequential", choices=("off", "local", "dense"), default="off",
                   help="refit layer by layer with earlier layers already pruned (see docs/plan.md)")
    g.add_argument("--refit-reselect", action="store_true",
                   help="keep the plan's widths but choose the neurons by greedy OBS on the --refit data")
    g.add_argument("--no-refit-attention", dest="refit_attention", action="store_false",
                   help="refit only down_proj; slice o_proj plainly in layers that lose heads")
    g.add_argument("--text-field", default=None, help="JSONL field of --refit data")
    g.add_argument("--refit-anchor", default=None, metavar="SOURCE",
                   help="text of other domains mixed into the refit, so that it holds up when traffic drifts "
                        "(wiki:PART, FILE.txt, FILE.jsonl); see docs/plan.md")
    g.add_argument("--refit-anchor-weight", type=float, default=None,
                   help="share of the refit's least-squares weight on --refit-anchor text (default 0.25)")
    g.add_argument("--refit-reconstruct", type=int, default=0, metavar="PASSES",
                   help="after each MLP refit, train its kept gate/up rows and down_proj towards the dense "
                        "output on the --refit data for this many passes (local reconstruction; 0: off)")
    add_device_flag(g)
    add_trust_flag(g)


def run(args: argparse.Namespace) -> int:
    from actprune.core.wire.plan import Plan
    from actprune.core.wire.stats import Stats
    from actprune.pruning.checkpoint.slicer import slice_checkpoint

    if args.bias_compensation and args.stats is None:
        raise UsageError("--bias-compensation needs --stats (the means of the removed units)")
    if args.stats is not None and not args.bias_compensation:
        raise UsageError("--stats is only used with --bias-compensation")
    if args.refit and args.bias_compensation:
        raise UsageError("--refit fits the bias itself; drop --bias-compensation")
    if args.refit is None and (args.refit_ridge is not None or args.refit_sequential != "off" or args.refit_reselect
                               or args.refit_reconstruct):
        raise UsageError("--refit-ridge / --refit-sequential / --refit-reselect / --refit-reconstruct need --refit DATA")
    if args.refit_reconstruct < 0:
        raise UsageError(f"--refit-reconstruct must be >= 0 passes, got {args.refit_reconstruct}")
    if args.refit_reconstruct and (args.refit_sequential != "off" or args.refit_reselect):
        raise UsageError("--refit-reconstruct starts from the one-pass refit: not with --refit-sequential or "
                         "--refit-reselect")
    if args.refit_anchor is not None and args.refit is None:
        raise UsageError("--refit-anchor needs --refit DATA")
    check_anchor(args.refit_anchor, args.refit_anchor_weight, [args.refit] if args.refit else [])
    if args.refit_tokens < 1 or (isinstance(args.refit_ridge, float) and args.refit_ridge < 0):
        raise UsageError("--refit-tokens must be >= 1 and --refit-ridge >= 0")
    if args.refit:
        check_device(args.device)
    plan = Plan.load(args.plan)
    stats = Stats.load(args.stats) if args.bias_compensation else None
    refit = attn = None
    rows: dict = {}  # gate/up rows of --refit-reconstruct
    if args.refit:
        plan, refit, attn = _refit(args, plan, rows)
    out = slice_checkpoint(args.model, plan, args.output, stats=stats, overwrite=args.overwrite,
                           mlp_refit=refit, attn_refit=attn, mlp_rows=rows)
    print(f"pruned checkpoint: {out} ({plan.params_after:,} parameters, was {plan.params_before:,})")
    return 0


def _ridge(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _refit(args: argparse.Namespace, plan, rows: dict):
    from actprune.pruning.compensate.maths import DEFAULT_RIDGE
    from actprune.pruning.compensate.refit_plan import refit_for_plan

    if args.output.exists() and not args.overwrite:  # fail before the calibration pass, not after
        raise UsageError(f"output {args.output} exists; remove it or pass --overwrite")
    seq = {"off": False}.get(args.refit_sequential, args.refit_sequential)
    return refit_for_plan(args.model, plan, args.refit, tokens=args.refit_tokens,
                          seq_len=args.refit_seq_len, sequential=seq, text_field=args.text_field,
                          reselect=args.refit_reselect, trust_remote_code=args.trust_remote_code,
                          attention=args.refit_attention, anchor=args.refit_anchor,
                          anchor_weight=args.refit_anchor_weight, device=args.device,
                          reconstruct=args.refit_reconstruct, mlp_rows=rows,
                          ridge=DEFAULT_RIDGE if args.refit_ridge is None else args.refit_ridge)
