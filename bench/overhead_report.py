"""bench/capture_overhead.py's report: rounds of tokens/s and CPU per token, paired on/off
ratios with a distribution-free interval, replicas pooled per side. Pure: the measurements
arrive as ``{"results": {server: {workload: {"rate": [...], "cpu": [...], "roles": [...]}}},
"load": [...], "foreign": [...]}`` (one entry per round), nothing here starts a server."""

from __future__ import annotations

import argparse
import json
import math
import statistics


def instances(res: dict, side: str) -> list[str]:
    """The servers of one side: ``side`` itself and its replicas ``side #2`` …"""
    return [n for n in res if n == side or n.startswith(f"{side} #")]


def pooled(res: dict, side: str, w: str) -> dict:
    """One side's figures per round, pooled over its instances: the geometric mean of their
    tokens/s and CPU per token, the mean of their CPU by process. With one instance, its own."""
    runs = [res[n][w] for n in instances(res, side)]
    if len(runs) == 1:
        return runs[0]
    gmean = statistics.geometric_mean
    return {"rate": [gmean(xs) for xs in zip(*(r["rate"] for r in runs), strict=True)],
            "cpu": [gmean(xs) for xs in zip(*(r["cpu"] for r in runs), strict=True)],
            "roles": [{k: statistics.fmean(d[k] for d in ds) for k in ds[0]}
                      for ds in zip(*(r["roles"] for r in runs), strict=True)]}


def _spread(xs: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}–{max(xs):{fmt}})"


def median_interval(xs: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval that holds the median of the rounds' population with at
    least ``confidence``: the k-th smallest and k-th largest of n paired ratios, k the largest
    with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2 (the sign test's interval). None when
    n is too small for any (n <= 5 at 95 %). It assumes rounds independent and alike; rounds
    that drift together (the host's speed wandering) make it too narrow, not too wide."""
    xs, n = sorted(xs), len(xs)
    tail, k, below = (1 - confidence) / 2, 0, 0.0
    while k < n // 2 and below + math.comb(n, k) / 2 ** n <= tail:
        below += math.comb(n, k) / 2 ** n
        k += 1
    return (xs[k - 1], xs[n - k]) if k else None


def table(mode: str, m: dict, args: argparse.Namespace) -> list[str]:
    res, load, other = m["results"], m["load"], m["foreign"]
    steady = max(other) <= args.max_other_cpu
    lines = [f"**{mode}** — load average (1 min) before each round and after: {', '.join(f'{x:.1f}' for x in load)}; "
             f"CPU taken by other jobs per round: {', '.join(f'{x:.2f}' for x in other)} cores"
             + ("" if steady else f" (> {args.max_other_cpu}): the wall-clock ratio is withheld"), "",
             "| workload | on tok/s | off tok/s | on/off wall (paired) | its median, 95 % interval "
             "| on CPU ms/token | off CPU ms/token | on/off by CPU time (paired) |",
             "|---|---|---|---|---|---|---|---|"]
    for w in res["on"]:
        on, off = pooled(res, "on", w), pooled(res, "off", w)
        lines.append(_row(w, on, off, steady))
        if "vllm defaults" in res and res["vllm defaults"][w]["rate"]:
            d = pooled(res, "vllm defaults", w)
            lines.append(_row("↳ same, off = plain vLLM defaults (prefix caching on)", on, d, steady))
            lines.append(_row("↳ on = capture with prefix caching on, off = plain vLLM defaults",
                              pooled(res, "on, prefix caching", w), d, steady))
        if "on, variant" in res:
            opts, variant = json.dumps(args.variant), pooled(res, "on, variant", w)
            lines.append(_row(f"↳ on = capture with {opts}", variant, off, steady))
            lines.append(_row(f"↳ on = capture as by default, off = capture with {opts}", on, variant, steady))
        lines += _instance_rows(res, w, steady)
    lines += ["", "What capture adds per generated token, by process (CPU ms, median of on − off over "
              "paired rounds):", "", "| workload | API server | engine core | worker | all |", "|---|---|---|---|---|"]
    for w in res["on"]:
        on, off = pooled(res, "on", w)["roles"], pooled(res, "off", w)["roles"]
        cells = [statistics.median(1e3 * (a[r] - b[r]) for a, b in zip(on, off, strict=True))
                 for r in ("api", "engine", "worker")]
        total = statistics.median(1e3 * (sum(a.values()) - sum(b.values())) for a, b in zip(on, off, strict=True))
        lines.append(f"| {w} | " + " | ".join(f"{x:+.1f}" for x in [*cells, total]) + " |")
    return lines


def _instance_rows(res: dict, w: str, steady: bool) -> list[str]:
    """With replicas: each on instance against the off instance started beside it, and every
    replica against the first of its own side — identical servers, so their ratio is the noise
    floor of one instance per side (the instance effect: where each server's memory and threads
    landed), the yardstick for the pooled row above."""
    ons, offs = instances(res, "on"), instances(res, "off")
    if len(ons) == 1:
        return []
    rows = [_row(f"↳ {a} / {b}", res[a][w], res[b][w], steady) for a, b in zip(ons, offs, strict=True)]
    for side in ("on", "off"):
        rows += [_row(f"↳ {n} / {side} (identical servers)", res[n][w], res[side][w], steady)
                 for n in instances(res, side)[1:]]
    return rows


def _row(label: str, on: dict, off: dict, steady: bool) -> str:
    """One table row: rates, wall ratio (paired rounds), CPU per token, CPU-time ratio."""
    wall = [a / b for a, b in zip(on["rate"], off["rate"], strict=True)]
    cpu = [b / a for a, b in zip(on["cpu"], off["cpu"], strict=True)]  # off CPU/token ÷ on
    ci = median_interval(wall) if steady else None
    return (f"| {label} | {_spread(on['rate'])} | {_spread(off['rate'])} "
            f"| {_spread(wall, '.3f') if steady else 'withheld'} "
            f"| {f'{ci[0]:.3f}–{ci[1]:.3f}' if ci else '–'} "
            f"| {_spread([1e3 * x for x in on['cpu']])} | {_spread([1e3 * x for x in off['cpu']])} "
            f"| {_spread(cpu, '.3f')} |")


def summary(m: dict) -> dict[str, dict[str, float]]:
    """workload -> medians of capture on / off: tok/s, CPU s per token, and on÷off ratios."""
    res, out = m["results"], {}
    for w in res.get("on", {}):
        on, off = pooled(res, "on", w), pooled(res, "off", w)
        out[w] = {
            "tok_s_on": statistics.median(on["rate"]), "tok_s_off": statistics.median(off["rate"]),
            "cpu_s_per_tok_on": statistics.median(on["cpu"]), "cpu_s_per_tok_off": statistics.median(off["cpu"]),
            "ratio_wall": statistics.median(a / b for a, b in zip(on["rate"], off["rate"], strict=True)),
            "ratio_cpu": statistics.median(b / a for a, b in zip(on["cpu"], off["cpu"], strict=True)),
        }
    return out
