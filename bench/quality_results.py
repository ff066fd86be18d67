"""Results of bench/quality.py: the config suites, the results file (JSONL, appended to, so a
rerun only computes what is missing) and its tables as markdown. No torch: reads JSON only."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["RATIOS", "STRATEGIES", "append", "load_results", "markdown", "suite"]

RATIOS = (0.1, 0.2, 0.3, 0.4)
STRATEGIES = ("importance", "magnitude", "variance", "sparsity", "wifv", "wanda_sp")


def suite(name: str) -> list[str]:
    if name == "table":
        return [f"{s}|{r}|{c}|uniform" for c in ("none", "bias") for s in (*STRATEGIES, "random", "weight")
                for r in RATIOS]
    if name == "issue7":
        pub = [f"{s}|{r}|{c}|uniform" for r in RATIOS
               for s, c in (("wanda_sp", "none"), ("wifv", "bias"), ("magnitude", "none"), ("importance", "none"))]
        return pub + ["wifv|0.2|bias|per_layer"] + [f"obs|{r}|refit|uniform" for r in RATIOS]
    return [k for k in name.split(",") if k]


def load_results(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def append(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def markdown(path: Path) -> str:
    res = load_results(path)
    dense = res["dense"]
    lines = [f"dense perplexity: wiki {dense['wiki']:.2f}, ood {dense['ood']:.2f}", "",
             "| strategy | compensation | allocation | " + " | ".join(f"{int(r * 100)} %" for r in RATIOS) + " |",
             "|---|---|---|" + "---|" * len(RATIOS)]
    groups: dict[tuple, dict[float, dict]] = {}
    lines_dirs: list[str] = []
    for r in res.values():
        if r["key"].startswith("dir:"):
            lines_dirs.append(f"| `{r['key'][4:]}` | {_x(r['wiki'] / dense['wiki'])} ({r['wiki']:.2f}) | "
                              f"{_x(r['ood'] / dense['ood'])} ({r['ood']:.2f}) |")
        elif r["key"] != "dense":
            groups.setdefault((r["strategy"], r["comp"], r["alloc"], r["key"].partition("ridge=")[2]), {})[r["ratio"]] = r
    for (s, c, a, ridge), by in sorted(groups.items()):
        cells = []
        for ratio in RATIOS:
            r = by.get(ratio)
            cells.append("–" if r is None else f"{_x(r['wiki'] / dense['wiki'])} / {_x(r['ood'] / dense['ood'])}")
        comp = f"{c} (ridge {ridge})" if ridge else c
        lines.append(f"| {s} | {comp} | {a} | " + " | ".join(cells) + " |")
    if lines_dirs:
        lines += ["", "| checkpoint | wiki ×dense (ppl) | ood ×dense (ppl) |", "|---|---|---|", *lines_dirs]
    return "\n".join(lines)


def _x(v: float) -> str:
    return f"{v:.2f}×" if v < 100 else f"{v:.0e}×"
