"""`actprune iterate`: gradual pruning, prune → recover → re-collect → prune, while quality holds.

    actprune iterate --model Qwen3-8B/ -o work/ --ratios 0.2 0.3 0.4 --max-ppl-ratio 1.3 \\
        --stats stats.safetensors --train-data traffic.jsonl --text-field response \\
        --finetune-steps 500 --strategy wifv --per-layer

Each ratio is the fraction of the *original* MLP neurons removed after that step. Step 1 plans
from ``--stats`` (e.g. pulled from the server) or records them offline; later steps record
them on the previous step's recovered model. Recovery distils from the original unless
``--no-distil``. The loop stops at the first step whose recovered perplexity on ``--eval-data``
exceeds ``--max-ppl-ratio`` × the original's; the last accepted model is printed. Rerunning the
same command resumes after the last finished step (see actprune.pruning.recover.iterate).
"""

from __future__ import annotations

import argparse
import json

from actprune.core.errors import UsageError
from actprune.pruning.checkpoint.trust import add_trust_flag
from actprune.pruning.cli import check_anchor

__all__ = ["configure", "run"]

_PLAN_FLAGS = ("strategy", "per_layer", "width_multiple", "tp_size", "min_mlp_width", "weights")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the original checkpoint")
    p.add_argument("-o", "--output", required=True, help="work directory (resumable)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4],
                   help="fractions of the original MLP neurons removed after each step (increasing)")
    p.add_argument("--max-ppl-ratio", type=float, default=1.3,
                   help="stop when recovered perplexity exceeds this × the original's")
    g = p.add_argument_group("statistics")
    g.add_argument("--stats", default=None, help="stats of the original for step 1 (default: record)")
    g.add_argument("--calibration", default="wiki:calibration",
                   help="text recorded on each step's model (and refitted on): wiki:calibration, FILE.txt/.jsonl")
    g.add_argument("--calibration-tokens", type=int, default=50_000)
    g.add_argument("--calibration-text-field", default=None, help="JSONL field of --calibration")
    g = p.add_argument_group("plan and prune")
    g.add_argument("--strategy", default=None, help="unit scoring strategy (default: the planner's)")
    g.add_argument("--per-layer", action="store_true", default=None, help="per-layer MLP widths")
    g.add_argument("--width-multiple", type=int, default=None, help="kept widths are multiples of this")
    g.add_argument("--tp-size", type=int, default=None, help="tensor-parallel size the result must support")
    g.add_argument("--min-mlp-width", type=int, default=None)
    g.add_argument("--refit", action="store_true", help="refit kept down_proj columns on --calibration")
    g.add_argument("--refit-anchor", default=None, metavar="SOURCE",
                   help="text of other domains mixed into each --refit (see `actprune prune --help`)")
    g.add_argument("--refit-anchor-weight", type=float, default=None,
                   help="share of the refit's least-squares weight on --refit-anchor text (default 0.25)")
    g.add_argument("--bias-compensation", action="store_true", help="FLAP bias instead of --refit")
    g = p.add_argument_group("recovery")
    g.add_argument("--train-data", default="wiki:train", help="FILE.jsonl, FILE.txt or wiki:train")
    g.add_argument("--text-field", default=None, help="JSONL field to train on, e.g. response")
    g.add_argument("--finetune-steps", type=int, default=100, help="optimizer steps per step (0: none)")
    g.add_argument("--no-distil", dest="distil", action="store_false",
                   help="plain fine-tuning instead of distilling from the original")
    g.add_argument("--finetune-config", default="{}", metavar="JSON",
                   help='other `actprune finetune` options, e.g. \'{"lr": 5e-5, "batch_size": 8}\'')
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", default="wiki:heldout")
    g.add_argument("--eval-text-field", default=None)
    g.add_argument("--eval-tokens", type=int, default=20_000)
    g.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--overwrite", action="store_true", help="discard a run with another configuration")
    add_trust_flag(p)


def run(args: argparse.Namespace) -> int:
    from actprune.pruning.recover.finetune import FinetuneConfig
    from actprune.pruning.recover.iterate import IterateConfig, run_iterate, table

    try:
        finetune = json.loads(args.finetune_config)
    except json.JSONDecodeError as e:
        raise UsageError(f"--finetune-config is not JSON: {e}") from None
    unknown = set(finetune) - set(FinetuneConfig.__dataclass_fields__)
    reserved = {"model", "data", "output", "teacher", "max_steps", "trust_remote_code"} & set(finetune)
    if unknown or reserved:
        raise UsageError(f"--finetune-config: unknown {sorted(unknown)} / set by iterate {sorted(reserved)}")
    check_anchor(args.refit_anchor, args.refit_anchor_weight, [args.calibration, args.eval_data])
    plan = {k: getattr(args, k) for k in _PLAN_FLAGS if getattr(args, k, None) is not None}
    fields = set(IterateConfig.__dataclass_fields__) - {"plan", "finetune"}
    cfg = IterateConfig(**{k: v for k, v in vars(args).items() if k in fields}, plan=plan, finetune=finetune)
    state = run_iterate(cfg)
    print(table(state))
    if state["final"] is None:
        print(f"no step stayed within {cfg.max_ppl_ratio}× the original perplexity; "
              "try smaller ratios or more --finetune-steps")
        return 1
    print(f"accepted model: {state['final']}")
    return 0
