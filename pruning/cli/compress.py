"""`actprune compress`: a checkpoint, its stats and calibration text -> a checkpoint with
``--param-ratio`` of its parameters removed from heads, KV groups and MLP neurons, every kept
output projection refitted: of the candidate ways to spend the budget (the allocation across
kinds, the same with heads capped at their measured share, MLP neurons only, and MLP neurons
only with the first and last layers kept whole), the one with the
lowest loss on held-out rows of ``--data`` (:mod:`actprune.pruning.candidates`).

    actprune compress --model M/ --stats stats.safetensors --data traffic.jsonl --text-field prompt \\
        --param-ratio 0.25 -o M-compressed/

The same as, one by one (the files land in ``--work``, default ``OUT.steps``)::

    actprune plan --stats stats.safetensors --model M/ --param-ratio 0.25 -o uniform.json
    actprune sensitivity --model M/ --plan uniform.json --data traffic.jsonl -o sensitivity.json
    actprune plan --stats stats.safetensors --model M/ --param-ratio 0.25 \\
        --layer-sensitivity sensitivity.json -o plan.json                 # candidate "budget"
    actprune plan --stats stats.safetensors --model M/ --param-ratio 0.25 --head-cap S \\
        --layer-sensitivity sensitivity.json -o plan-heads-capped.json    # S: the measured share
    actprune plan --stats stats.safetensors --model M/ --mlp-ratio R --per-layer \\
        --layer-sensitivity sensitivity.json -o plan-mlp.json             # R: as many parameters
    actprune plan --stats stats.safetensors --model M/ --mlp-ratio R --keep-layers 0-3,28,29 \\
        -o uniform-ends.json                                              # 16+ layers: first 1/8, last 1/16
    actprune sensitivity --model M/ --plan uniform-ends.json --data traffic.jsonl -o sensitivity-ends.json
    actprune plan --stats stats.safetensors --model M/ --mlp-ratio R --per-layer --keep-layers 0-3,28,29 \\
        --layer-sensitivity sensitivity-ends.json -o plan-mlp-ends.json   # candidate "mlp-ends"
    actprune plan --stats stats.safetensors --model M/ --mlp-ratio R --per-layer --keep-layers 0-3,28,29 \\
        --layer-sensitivity sensitivity-ends.json --sensitivity-exponent 0.5 -o plan-mlp-ends-even.json
    actprune plan ... the same with --sensitivity-exponent 2 -o plan-mlp-ends-bold.json
    actprune prune --model M/ --plan plan-mlp.json --refit traffic.jsonl -o M-compressed/  # each
    actprune eval --model M/ --model M-compressed/ --data validation.txt  # text the fit did not read

(each plan file records the exact request; compress validates on rows of ``--data`` after those
the sensitivity and refit read). Resumable: rerun the same command and finished steps and
candidates are skipped (:mod:`actprune.pruning.compress`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actprune.core.errors import UsageError
from actprune.pruning.candidates import CANDIDATES, check_names
from actprune.pruning.checkpoint.trust import add_trust_flag
from actprune.pruning.cli import add_device_flag, check_anchor, check_device
from actprune.pruning.cli.plan import parse_layers

__all__ = ["configure", "run"]

# PlanRequest fields compress passes through (the budget and its constraints)
_PLAN_FLAGS = {
    "param_ratio": (float, "fraction of all parameters removed (this or --mlp-ratio)"),
    "strategy": (str, "unit score inside a layer (default wifv)"),
    "head_mode": (str, "kv_groups (default) or query_heads"),
    "width_multiple": (int, "kept MLP widths are multiples of this"),
    "tp_size": (int, "tensor-parallel size the result must support"),
    "min_mlp_width": (int, "minimum MLP neurons kept per layer"),
    "min_kv_heads": (int, "minimum KV heads kept per layer"),
    "head_cap": (float, "most of a layer's query heads the budget may take (0: MLP neurons only; "
                        "default twice the measured share)"),
    "keep_layers": (str, "decoder layers kept whole, e.g. 0-3,28,29 (negative: from the end, "
                                  "--keep-layers=-2,-1); the budget is taken from the other layers"),
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="source Hugging Face checkpoint directory")
    p.add_argument("--stats", required=True, type=Path, help="stats file of this model (unit scores)")
    p.add_argument("--data", required=True, help="calibration text: wiki:calibration, FILE.txt or FILE.jsonl")
    p.add_argument("--text-field", default=None, help="JSONL field of --data")
    p.add_argument("-o", "--output", required=True, type=Path, help="output checkpoint directory")
    p.add_argument("--work", type=Path, default=None, help="where the step files go (default OUT.steps)")
    for name, (typ, help_text) in _PLAN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_text)
    p.add_argument("--mlp-ratio", type=float, default=None,
                   help="instead of --param-ratio: fraction of the MLP neurons removed, and nothing else (the "
                        "parameters they hold, among the MLP-only candidates)")
    p.add_argument("--tokens", type=int, default=32768, help="calibration tokens for sensitivity and refit")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    p.add_argument("--probe-rows", type=int, default=8, help="rows of --data the sensitivity loss is measured on")
    p.add_argument("--val-rows", type=int, default=8,
                   help="rows of --data after those the fit reads, held out to choose the candidate")
    p.add_argument("--val-data", action="append", default=[], metavar="SOURCE",
                   help="text of another domain the result must keep serving (wiki:PART, FILE.txt, FILE.jsonl with a "
                        "'text' or 'messages' field; repeatable): candidates are chosen by their mean loss above the "
                        "dense model's over --data's held-out rows and the first --val-rows rows of each")
    p.add_argument("--candidates", default=None, metavar="NAMES",
                   help="comma-separated candidates to build and choose among (default: every one that applies: "
                        + ", ".join(CANDIDATES) + "); e.g. mlp-ends,mlp-ends-even skips the whole-model "
                        "sensitivity pass and four refits")
    p.add_argument("--ridge", type=float, default=1e-2, help="refit ridge towards the plain slice")
    p.add_argument("--refit-anchor", default=None, metavar="SOURCE",
                   help="text of other domains mixed into the refits, so that they hold up when traffic drifts "
                        "(wiki:PART, FILE.txt, FILE.jsonl; not a --val-data source); see docs/plan.md")
    p.add_argument("--refit-anchor-weight", type=float, default=None,
                   help="share of the refits' least-squares weight on --refit-anchor text (default 0.25)")
    p.add_argument("--reconstruct", type=int, default=0, metavar="PASSES",
                   help="after each MLP refit, train its kept gate/up rows and down_proj towards the dense output "
                        "on the fit rows for this many passes (local reconstruction, docs/plan.md; 0: off)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory this run did not make")
    add_device_flag(p)
    add_trust_flag(p)


def run(args: argparse.Namespace) -> int:
    from actprune.pruning.compress import CompressConfig, compress

    if (args.param_ratio is None) == (args.mlp_ratio is None):
        raise UsageError("give --param-ratio (the fraction of all parameters to remove) or --mlp-ratio (of the MLP "
                         "neurons), one of them")
    if args.param_ratio is not None and not 0 < args.param_ratio < 1:  # before --data is packed
        raise UsageError(f"--param-ratio must be in (0, 1), got {args.param_ratio}")
    if args.tokens < 1 or args.probe_rows < 1 or args.val_rows < 1 or args.seq_len < 2 or args.ridge < 0 \
            or args.reconstruct < 0:
        raise UsageError("--tokens, --probe-rows and --val-rows must be >= 1, --seq-len >= 2, --ridge and "
                         "--reconstruct >= 0")
    check_anchor(args.refit_anchor, args.refit_anchor_weight, [args.data, *args.val_data])
    device = check_device(args.device)
    candidates = None
    if args.candidates is not None:
        try:
            candidates = check_names(tuple(n.strip() for n in args.candidates.split(",") if n.strip()))
        except ValueError as e:
            raise UsageError(f"--candidates: {e}") from None
    request = {name: getattr(args, name) for name in _PLAN_FLAGS}
    if args.mlp_ratio is not None:
        request["param_ratio"], candidates = _mlp_only(args, candidates)
    if request["keep_layers"] is not None:  # parsed here, not by argparse: its message names the part
        request["keep_layers"] = parse_layers(request["keep_layers"])
    out = compress(CompressConfig(
        model=args.model, stats=args.stats, data=args.data, output=args.output, request=request, work=args.work,
        text_field=args.text_field, tokens=args.tokens, seq_len=args.seq_len, probe_rows=args.probe_rows,
        val_rows=args.val_rows, val_data=tuple(args.val_data), candidates=candidates, ridge=args.ridge, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
        anchor=args.refit_anchor, anchor_weight=args.refit_anchor_weight, device=device, reconstruct=args.reconstruct,
    ))
    print(f"compressed checkpoint: {out}")
    return 0


def _mlp_only(args: argparse.Namespace, candidates: tuple[str, ...] | None) -> tuple[float, tuple[str, ...]]:
    """--mlp-ratio as compress's budget: (the param_ratio those neurons hold, the MLP-only
    candidates asked for; by default the ends layout and its twins where the model has one —
    whenever compress chose an MLP-only layout on SmolLM2 since they exist, it was one of them
    (BENCHMARKS.md) — else the whole-depth layout and its twins)."""
    from actprune.core.archs.shape import model_shape
    from actprune.core.config import read_config
    from actprune.pruning.candidates import MLP_ONLY, OWN_DELTA, ends_offered, mlp_share

    if not 0 < args.mlp_ratio < 1:
        raise UsageError(f"--mlp-ratio must be in (0, 1), got {args.mlp_ratio}")
    other = [n for n in candidates or () if n not in MLP_ONLY]
    if other:
        raise UsageError(f"--candidates {','.join(other)}: they take attention heads too, not with --mlp-ratio "
                         f"(its candidates: {', '.join(MLP_ONLY)})")
    if args.head_cap is not None:
        raise UsageError("--head-cap is for --param-ratio: --mlp-ratio takes no head")
    try:
        shape = model_shape(read_config(args.model))
        ratio = mlp_share(shape, args.mlp_ratio)
    except ValueError as e:
        raise UsageError(f"--mlp-ratio: {e}") from None
    if candidates is None:
        ends = ends_offered(shape, args.keep_layers)
        candidates = OWN_DELTA if ends else tuple(n for n in MLP_ONLY if n not in OWN_DELTA)
    print(f"--mlp-ratio {args.mlp_ratio:g}: --param-ratio {ratio!r} (those neurons' share of the parameters), "
          f"candidates {','.join(candidates)}", flush=True)
    return ratio, candidates

