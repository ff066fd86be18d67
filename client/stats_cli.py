"""`actprune stats pull|show`: fetch and merge snapshots from servers; read a stats file.

    actprune stats pull --base-url http://pod-1:8000 --base-url http://pod-2:8000 -o stats.safetensors
    actprune stats show stats.safetensors [--layer 3] [--k 10]

``show`` prints the same figures as the server's JSON summary (:func:`summarize`): per layer,
tokens, MLP mean |x| / std / sparsity averaged over neurons, the share of neurons more than 90%
sparse, the number of heads and the weakest head's mean |x|, and block influence.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from actprune.client.http import ActpruneClientError, ActpruneHTTPError, ClientSettings, amerge_from
from actprune.core.errors import UsageError
from actprune.core.summary import summarize
from actprune.core.wire.api import LayerSummary, SnapshotMeta, Spread, StatsSummary, UnitScore
from actprune.core.wire.stats import Stats, StatsFormatError

__all__ = ["configure", "format_layer", "format_table", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="stats_command", metavar="SUBCOMMAND", required=True)
    pull = sub.add_parser("pull", help="download snapshots from one or more servers and merge them")
    pull.add_argument("--base-url", action="append", required=True, metavar="URL",
                      help="server URL; repeat for several servers of the same model")
    pull.add_argument("-o", "--output", required=True, help="stats file to write (.safetensors)")
    pull.add_argument("--api-key", help="API key (default: $ACTPRUNE_API_KEY, then $VLLM_API_KEY)")
    pull.add_argument("--timeout", type=float, help="seconds per request (default 60)")
    pull.add_argument("--retries", type=int, help="connection retries per server (default 3)")
    show = sub.add_parser("show", help="print a per-layer table of a stats file")
    show.add_argument("file", help="stats file (.safetensors)")
    show.add_argument("--layer", type=int, help="details of one layer: spreads, weakest neurons and heads")
    show.add_argument("--k", type=int, default=10, help="weakest units listed with --layer (default 10)")


def run(args: argparse.Namespace) -> int:
    return _pull(args) if args.stats_command == "pull" else _show(args)


def _pull(args: argparse.Namespace) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    if args.retries is not None and args.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {args.retries}")
    settings = ClientSettings.from_env(api_key=args.api_key, timeout=args.timeout, retries=args.retries)
    try:
        merged = asyncio.run(amerge_from(args.base_url, settings=settings))
    except ActpruneHTTPError as e:
        if e.status_code >= 500:
            print(f"actprune stats pull: {e}", file=sys.stderr)
            return 1
        raise UsageError(str(e)) from e
    except (ActpruneClientError, StatsFormatError, ValueError) as e:
        raise UsageError(str(e)) from e
    path = merged.save(args.output)
    n = len(args.base_url)
    print(
        f"pulled {n} server{'s' if n > 1 else ''}: {merged.meta['model']}, {merged.tokens} tokens, "
        f"{len(merged.layers)} layers -> {path}"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.k < 0:
        raise UsageError(f"--k must be >= 0, got {args.k}")
    summary = summarize(Stats.load(args.file), k=args.k)
    if args.layer is None:
        print(format_table(summary))
        return 0
    by_index = {ls.layer: ls for ls in summary.layers}
    if args.layer not in by_index:
        raise UsageError(f"--layer {args.layer}: {args.file} holds layers {sorted(by_index)}")
    print(format_table(summary, layers=[args.layer]))
    print()
    print(format_layer(by_index[args.layer]))
    return 0


_COLUMNS = (
    # header, width
    ("layer", 5), ("tokens", 10), ("MLP width", 9), ("MLP mean|x|", 11), ("MLP std", 9),
    ("MLP sparsity", 12), (">90% sparse", 11), ("heads", 5), ("min head|x|", 11),
    ("attn sparsity", 13), ("block infl.", 11),
)


def _cached(m: SnapshotMeta) -> str:
    """What a server with prefix caching served from the cache (the stats do not cover it)."""
    if not m.prefix_caching:
        return ""
    n = m.tokens_cached
    return "; prefix caching on: " + ("cached prompt tokens unknown" if n is None else f"{n} more served from the cache, not seen")


def _unsampled(m: SnapshotMeta) -> str:
    """What a sampling capture (step_sample < 1) skipped: the stats cover a random share of steps."""
    n = m.tokens_unsampled
    return f"; {n} more in steps the capture's sampling skipped, not seen" if n else ""


def format_table(summary: StatsSummary, layers: Sequence[int] | None = None) -> str:
    """Header lines about the snapshot, then one row per layer (neuron/head means)."""
    m = summary.meta
    out = [
        f"model {m.model} ({m.architecture}), config_hash {m.config_hash}, TP {m.tensor_parallel_size}",
        f"tokens {summary.tokens} (prefill {m.tokens_prefill}, decode {m.tokens_decode}"
        f"{_cached(m)}{_unsampled(m)}), "
        f"merged from {m.merged_from}, near-zero threshold {m.near_zero_threshold:g}",
        "",
        "  ".join(h.rjust(w) for h, w in _COLUMNS),
    ]
    for ls in summary.layers:
        if layers is not None and ls.layer not in layers:
            continue
        heads, mlp = ls.heads, ls.mlp
        # an MoE layer has no MLP channels: its width column says how many experts it routes to
        width = str(mlp.width) if mlp else f"{ls.experts.num_experts}E" if ls.experts else "-"
        cells = (
            str(ls.layer), str(ls.tokens), width, _g(mlp.mean_abs.mean) if mlp else "-",
            _g(mlp.std.mean) if mlp else "-", _pct(mlp.sparsity.mean) if mlp else "-",
            _pct(mlp.frac_sparse_90) if mlp else "-",
            str(heads.num_heads) if heads else "-",
            _g(heads.least_important[0].score) if heads and heads.least_important else "-",
            _pct(ls.attn.sparsity.mean), _g(ls.block_influence),
        )
        out.append("  ".join(c.rjust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=True)))
    return "\n".join(out)


def format_layer(ls: LayerSummary) -> str:
    """Everything the summary holds about one layer, spreads as min / mean / max."""
    out = [f"layer {ls.layer}: {ls.tokens} tokens, block influence {_g(ls.block_influence)}"]
    if ls.experts is not None:
        e = ls.experts
        out.append(f"experts ({e.num_experts}): expert  frequency  mean weight")
        for j in range(e.num_experts):
            out.append(f"  {j:>6}  {_pct(e.frequency[j]):>9}  {_g(e.mean_weight[j]):>11}")
        out.append(f"  least used (weight per token): {_units(e.least_used)}")
    for name, g in (("MLP neurons", ls.mlp), ("attention channels", ls.attn)):
        if g is None:
            continue
        out += [
            f"{name} ({g.width}), min / mean / max across channels:",
            f"  mean x    {_spread(g.mean)}",
            f"  std       {_spread(g.std)}",
            f"  mean |x|  {_spread(g.mean_abs)}",
            f"  sparsity  {_spread(g.sparsity, pct=True)}",
            f"  >90% sparse: {_pct(g.frac_sparse_90)} of channels; max |x| {_g(g.max_abs)}",
            f"  lowest mean |x|: {_units(g.least_important)}",
        ]
    if ls.heads is None:
        out.append("heads: unknown (the file's metadata has no head_dim)")
    else:
        h = ls.heads
        out.append(f"heads ({h.num_heads} x {h.head_dim}): head  mean|x|  std  sparsity")
        for j in range(h.num_heads):
            out.append(f"  {j:>4}  {_g(h.mean_abs[j]):>9}  {_g(h.std[j]):>9}  {_pct(h.sparsity[j]):>7}")
        out.append(f"  lowest mean |x|: {_units(h.least_important)}")
    return "\n".join(out)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _spread(s: Spread, pct: bool = False) -> str:
    f = _pct if pct else _g
    return f"{f(s.min)} / {f(s.mean)} / {f(s.max)}"


def _units(units: list[UnitScore]) -> str:
    return ", ".join(f"#{u.index} ({_g(u.score)})" for u in units) or "-"
