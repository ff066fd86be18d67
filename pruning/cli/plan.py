"""`actprune plan`: stats file + checkpoint directory -> plan.json.

Every flag is a field of :class:`PlanRequest` (``--mlp-ratio`` is ``mlp_ratio``), generated from
the model so the CLI and ``POST /prune/plan`` can never drift apart.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any

from actprune.core.errors import UsageError

__all__ = ["configure", "parse_layers", "parse_weights", "request_from_args", "run"]

# request fields filled from the --layer-sensitivity file rather than flags of their own
_FROM_SENSITIVITY_FILE = ("head_sensitivity", "sensitivity_at")


def _request_fields() -> dict[str, Any]:
    from actprune.core.wire.plan_request import PlanRequest

    return PlanRequest.model_fields


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stats", required=True, type=Path, help="stats file (safetensors)")
    parser.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument("-o", "--output", required=True, type=Path, help="where to write plan.json")
    for name, field in _request_fields().items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or name} (default: {field.get_default(call_default_factory=True)})"
        ann = field.annotation
        if name in _FROM_SENSITIVITY_FILE:
            continue
        if ann is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
        elif name == "layer_sensitivity":
            parser.add_argument(flag, dest=name, default=None, metavar="FILE",
                                help="sensitivity JSON from `actprune sensitivity`: per-layer MLP widths from "
                                     "measured loss increases (with --per-layer); with --param-ratio and a file "
                                     "that measured heads too, the budget is allocated across layers and kinds")
        elif name == "keep_layers":
            parser.add_argument(flag, dest=name, default=None, metavar="LAYERS",
                                help="decoder layers kept whole, e.g. 0-3,28,29 (negative: from the end, "
                                     "--keep-layers=-2,-1): never dropped, none of their units removed; ratios and "
                                     "budgets stay shares of the whole model, taken from the other layers")
        elif name == "weights":
            parser.add_argument(flag, dest=name, default=None, metavar="M,V,S",
                                help="importance weights magnitude,variance,sparsity (default: 0.3,0.4,0.3)")
        else:
            choices = typing.get_args(ann) if typing.get_origin(ann) is typing.Literal else None
            parser.add_argument(flag, dest=name, default=None, type=_scalar_type(ann),
                                choices=choices, help=help_text)


def _scalar_type(ann: Any) -> type:
    args = typing.get_args(ann) if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union else (ann,)
    for t in (int, float):
        if t in args:
            return t
    return str


def parse_weights(text: str) -> dict[str, float]:
    """'0.3,0.4,0.3' or 'magnitude=0.3,variance=0.4,sparsity=0.3' -> dict."""
    keys = ("magnitude", "variance", "sparsity")
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if all("=" in p for p in parts):
            return {k.strip(): float(v) for k, v in (p.split("=", 1) for p in parts)}
        if len(parts) == 3:
            return dict(zip(keys, map(float, parts), strict=True))
    except ValueError:
        pass
    raise UsageError(f"--weights: expected three numbers M,V,S (magnitude,variance,sparsity), got {text!r}")


def parse_layers(text: str) -> list[int]:
    """'0-3,28,-1' -> [0, 1, 2, 3, 28, -1]: indices, inclusive ranges A-B of non-negative
    indices, and negative indices counting from the end (checked against the model by the planner)."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        a, dash, b = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            if dash:
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(a))
        except ValueError:
            raise UsageError(f"--keep-layers: {part!r} in {text!r} is not a layer index (7, -1) or a range (0-3)") \
                from None
    return out


def _read_sensitivity(path: str) -> dict[str, Any]:
    """Request fields from a sensitivity file (:func:`sensitivity.request_fields`)."""
    from actprune.pruning.compensate.sensitivity import SENSITIVITY_FORMAT, request_fields

    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--layer-sensitivity {path}: cannot read it ({e})") from None
    if not isinstance(record, dict) or record.get("format") != SENSITIVITY_FORMAT:
        raise UsageError(f"--layer-sensitivity {path}: not a file from `actprune sensitivity` ({SENSITIVITY_FORMAT})")
    try:
        return request_fields(record)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"--layer-sensitivity {path}: malformed ({e})") from None


def request_from_args(args: argparse.Namespace):
    from actprune.core.wire.plan import format_validation_error
    from actprune.core.wire.plan_request import PlanRequest
    from pydantic import ValidationError

    fields = {n: getattr(args, n) for n in _request_fields() if getattr(args, n, None) is not None}
    if isinstance(fields.get("keep_layers"), str):
        fields["keep_layers"] = parse_layers(fields["keep_layers"])
    if isinstance(fields.get("weights"), str):
        fields["weights"] = parse_weights(fields["weights"])
    if isinstance(fields.get("layer_sensitivity"), str):
        sens = _read_sensitivity(fields["layer_sensitivity"])
        if "param_ratio" not in fields:  # head figures only serve the whole-model budget
            sens = {"layer_sensitivity": sens["layer_sensitivity"]}
        fields.update(sens)
    try:
        return PlanRequest(**fields)
    except ValidationError as e:
        raise UsageError(format_validation_error(e)) from e


def run(args: argparse.Namespace) -> int:
    from actprune.core.archs import spec_for_config
    from actprune.core.config import read_config
    from actprune.core.planning.planner import make_plan
    from actprune.core.tensor.checkpoint import ColumnNorms
    from actprune.core.wire.stats import Stats

    request = request_from_args(args)
    if request.removes_nothing:  # a forgotten flag, not a wish for the model itself
        raise UsageError("nothing to remove: give --param-ratio R (a share of all parameters), or --mlp-ratio, "
                         "--head-ratio, --expert-ratio, --drop-layers or --drop-layer-ratio")
    config = read_config(args.model)
    stats = Stats.load(args.stats)
    plan = make_plan(stats, config, request, ColumnNorms(args.model, spec_for_config(config)))
    plan.save(args.output)
    removed = 1 - plan.params_after / plan.params_before
    experts = [(len(lp.experts_keep), w.num_experts) for lp, w in zip(plan.layers, plan.source.widths, strict=True)
               if lp.experts_keep is not None]
    if len(set(experts)) == 1:
        kept = f", {experts[0][0]} of {experts[0][1]} experts kept per sparse layer"
    else:  # per-layer counts: kept per sparse layer, in layer order
        kept = ", experts kept per sparse layer: " + " ".join(f"{k}/{e}" for k, e in experts) if experts else ""
    print(
        f"plan: {plan.params_before:,} -> {plan.params_after:,} parameters ({removed:.1%} removed), "
        f"{len(plan.dropped_layers)} layers dropped, {'uniform' if plan.uniform else 'per-layer'} widths"
        f"{kept} -> {args.output}"
    )
    return 0
