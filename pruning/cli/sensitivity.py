"""`actprune sensitivity`: measure each layer's loss increase when its MLP alone is pruned (and,
if the plan removes heads, when its heads alone are: the input of the whole-model budget,
``plan --param-ratio --layer-sensitivity``, see ``actprune compress``).

    actprune plan --stats stats.safetensors --model M/ --mlp-ratio 0.2 -o uniform.json
    actprune sensitivity --model M/ --plan uniform.json --data traffic.jsonl --text-field prompt -o sens.json
    actprune plan --stats stats.safetensors --model M/ --mlp-ratio 0.2 --per-layer \\
        --layer-sensitivity sens.json -o plan.json
    actprune prune --model M/ --plan plan.json --refit traffic.jsonl --text-field prompt -o pruned/

Each layer of the (uniform) plan is pruned alone, its kept down_proj columns refitted, and the
loss on probe rows of DATA compared with the dense model's (actprune.pruning.compensate.sensitivity).
``plan --layer-sensitivity`` then removes more from the layers that cost least.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from actprune.core.errors import UsageError
from actprune.pruning.checkpoint.trust import add_trust_flag
from actprune.pruning.cli import add_device_flag, check_device

__all__ = ["configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="source checkpoint (the plan's)")
    p.add_argument("--plan", required=True, type=Path, help="plan.json: normally uniform, at the target ratio")
    p.add_argument("--data", default="wiki:calibration", help="wiki:calibration, FILE.txt or FILE.jsonl")
    p.add_argument("--text-field", default=None, help="JSONL field of --data")
    p.add_argument("--tokens", type=int, default=32768, help="calibration tokens for the refits")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    p.add_argument("--probe-rows", type=int, default=8, help="rows (of --data) the loss is measured on")
    p.add_argument("--ridge", type=float, default=None, help="refit ridge (default 1e-2; see actprune prune)")
    p.add_argument("-o", "--output", required=True, type=Path, help="sensitivity JSON to write")
    add_device_flag(p)
    add_trust_flag(p)


def run(args: argparse.Namespace) -> int:
    from actprune.core.wire.plan import Plan
    from actprune.pruning.compensate.maths import DEFAULT_RIDGE
    from actprune.pruning.compensate.sensitivity import noise_note, sensitivity_for_plan

    if args.tokens < 1 or args.probe_rows < 1 or (args.ridge is not None and args.ridge < 0):
        raise UsageError("--tokens and --probe-rows must be >= 1, --ridge >= 0")
    device = check_device(args.device)
    plan = Plan.load(args.plan)
    if plan.dropped_layers:
        raise UsageError("the plan drops layers; measure sensitivity on an MLP-only plan")
    out = sensitivity_for_plan(args.model, plan, args.data, args.output, tokens=args.tokens,
                               seq_len=args.seq_len, probe_rows=args.probe_rows, text_field=args.text_field,
                               trust_remote_code=args.trust_remote_code, device=device,
                               ridge=DEFAULT_RIDGE if args.ridge is None else args.ridge)
    heads = any(len(lp.heads_keep) < w.num_attention_heads for lp, w in zip(plan.layers, plan.source.widths, strict=True))
    how = "--param-ratio" if heads else "--mlp-ratio R --per-layer"
    record = json.loads(out.read_text())
    note = noise_note(record["deltas"], record["delta_se"])
    print(f"wrote {out}" + (f" (MLP Δ: {note})" if note else "") +
          f"; use it with: actprune plan ... {how} --layer-sensitivity {out}")
    return 0
