"""Merge the figures of one `bench/gpu.sh` run into ``gpu.json`` and a markdown section.

    .venv/bin/python bench/gpu_report.py --out runs/gpu/20261202T0100Z

Reads, in ``--out``: ``steps.tsv`` (step, status, seconds: written by gpu.sh),
``capture_overhead.json`` (bench/capture_overhead.py), ``decode.json``
(bench/decode_throughput.py), ``distill.json`` (bench/distill_speed.py), ``machine.txt``.
A step that failed or timed out is named as such; its figures are absent, never guessed.
Writes ``gpu.json`` (everything) and ``gpu.md``, a section to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FILES = {"capture": "capture_overhead.json", "decode": "decode.json", "distill": "distill.json",
         # gpu.sh --no-vllm: bench/graph_decode.py and bench/graph_capture_cost.py
         "graph_capture": "graph_capture.json", "graph_cost": "graph_cost.json", "graph_decode": "graph_decode.json"}


def read(out: Path) -> dict[str, Any]:
    steps = {}
    tsv = out / "steps.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        name, status, seconds = line.split("\t")
        steps[name] = {"status": status, "seconds": int(seconds)}
    figures = {s: json.loads((out / f).read_text()) for s, f in FILES.items() if (out / f).is_file()}
    machine = (out / "machine.txt").read_text().strip() if (out / "machine.txt").is_file() else "unknown"
    return {"machine": machine, "steps": steps, **figures}


def _missing(res: dict[str, Any], step: str) -> str:
    st = res["steps"].get(step)
    return f"not measured ({st['status']} after {st['seconds']} s)" if st else "not measured (not run)"


def markdown(res: dict[str, Any]) -> str:
    lines = ["## GPU run (`bench/gpu.sh`)", "", f"Machine: {res['machine']}.", ""]
    lines += ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {s['status']} | {s['seconds']} |" for n, s in res["steps"].items()]
    if "graph" in res["steps"]:  # gpu.sh --no-vllm
        return "\n".join(lines + graph_markdown(res)) + "\n"
    lines += ["", "### Capture overhead, compiled + CUDA graphs", ""]
    if c := res.get("capture"):
        lines += [f"{c['params_m']}M parameters, {c['dtype']}, {c['tokens']} tokens per completion, "
                  f"{c['rounds']} interleaved rounds (medians).", "",
                  "| mode | workload | capture on (tok/s) | capture off (tok/s) | on/off (wall) | on/off (CPU time) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {mode} | {w} | {f['tok_s_on']:.1f} | {f['tok_s_off']:.1f} | **{f['ratio_wall']:.3f}** "
                  f"| {f['ratio_cpu']:.3f} |" for mode, ws in c["modes"].items() for w, f in ws.items()]
    else:
        lines.append(_missing(res, "capture"))
    lines += ["", "### Decode: pruned vs dense in `actprune serve`", ""]
    if d := res.get("decode"):
        base, params = d["medians"]["base"], d["params"]
        lines += [f"{d['dtype']}, {d['mode']}, {d['tokens']} tokens per request.", "",
                  f"| model | params | ideal | batch 1 tok/s | speed-up | batch {d['batch']} tok/s | speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in d["medians"].items():
            # an MoE run gives the ideal per batch size (parameters read per step), else parameters
            ideal, ideal_n = d.get("ideals", {}).get(name, (params["base"] / params[name],) * 2)
            shown = f"{ideal:.2f}×" if abs(ideal - ideal_n) < 5e-3 else f"{ideal:.2f}× (batch {d['batch']}: {ideal_n:.2f}×)"
            lines.append(f"| {name} | {params[name] / 1e6:.0f} M | {shown} | {m['b1']:.1f} | "
                         f"{m['b1'] / base['b1']:.2f}× | {m['bN']:.1f} | {m['bN'] / base['bN']:.2f}× |")
    else:
        lines.append(_missing(res, "decode"))
    return "\n".join(lines + distill_markdown(res)) + "\n"


def distill_markdown(res: dict[str, Any]) -> list[str]:
    lines = ["", "### Distillation throughput (`actprune finetune --teacher`)", ""]
    if t := res.get("distill"):
        lines += [f"Student {t['student_params_m']}M parameters (MLP {t['student_intermediate']} of the "
                  f"teacher's {t['teacher_intermediate']}), {t['dtype']}, bf16 autocast {t['bf16']}, "
                  f"{t['rows_per_step']} rows of {t['seq_len']} tokens per step, {t['timed_steps']} timed steps: "
                  f"**{t['tokens_per_s']} tokens/s**."]
    else:
        lines.append(_missing(res, "distill"))
    return lines


def graph_markdown(res: dict[str, Any]) -> list[str]:
    """The sections of a --no-vllm run: a transformers Qwen3 decode step replayed as a CUDA graph."""
    lines = ["", "### Capture under CUDA graphs, transformers Qwen3 decode step (no vLLM)", ""]
    if g := res.get("graph_capture"):
        lines += [f"{g['params_m']}M parameters, {g['dtype']}, {g['steps']} steps from position {g['pos']}, "
                  f"{g['rounds']} interleaved rounds (medians; spread: lowest-highest round).", "",
                  "| batch | off (tok/s) | on (tok/s) | on/off | torch copies: on/off | same tokens |",
                  "|---|---|---|---|---|---|"]
        for b, row in g["capture"].items():
            on, copies = row["on"], row.get("on, torch copies")  # the second: captured on a GPU only
            copies_ratio = f"{copies['ratio']:.3f}" if copies else "-"
            lines.append(f"| {b} | {row['tok_s_off']:.1f} | {on['tok_s']:.1f} | **{on['ratio']:.3f}** "
                         f"({on['ratio_lo']:.3f}-{on['ratio_hi']:.3f}) | {copies_ratio} | {row['same_tokens']} |")
        if e := g.get("exact"):
            worst = max(v for f, v in e.items() if f not in ("count", "block_count"))
            lines += ["", f"Exactness (graph replays, unarmed then armed): largest relative error {worst:.1e}, "
                          f"token counts off by {e['count']:.0f} (groups) and {e['block_count']:.0f} (blocks)."]
    else:
        lines.append(_missing(res, "graph"))
    lines += ["", "### The capture's pieces, each alone in a CUDA graph (µs per step)", ""]
    if c := res.get("graph_cost"):
        batches = list(c["batches"])
        lines += ["| piece | " + " | ".join(f"B = {b}" for b in batches) + " |", "|---" * (len(batches) + 1) + "|"]
        for piece in c["batches"][batches[0]]:
            lines.append(f"| {piece} | " + " | ".join(f"{c['batches'][b][piece]['us']:.1f}" for b in batches) + " |")
    else:
        lines.append(_missing(res, "cost"))
    lines += ["", "### Pruned vs dense decode in the same graph-replayed step", ""]
    if d := res.get("graph_decode", {}).get("decode"):
        lines += ["| batch | model | ms/step | speed-up | ideal (weight bytes) | of ideal |", "|---|---|---|---|---|---|"]
        lines += [f"| {b} | {n} | {m['step_ms']:.3f} | {m['speedup']:.3f} | {m['ideal']:.3f} | {m['of_ideal']:.3f} |"
                  for b, row in d["batches"].items() for n, m in row.items()]
    else:
        lines.append(_missing(res, "gdecode"))
    return lines + distill_markdown(res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    res = read(args.out)
    (args.out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "gpu.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
