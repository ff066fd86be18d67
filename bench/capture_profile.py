"""Where the capture's time goes in one decode step: the real ops on a model-shaped skeleton.

A real :class:`actprune.server.capture.Capture` (every statistic on) is attached to a skeleton
of the benchmark model (Qwen3-shaped: 24 layers, hidden 768, MLP 2048, 12 heads x 64): decoder
layers whose projections are near-free stand-ins, so the time of a step with hooks minus the
time without is the capture's own. The step runs in torch.compile (as vLLM's compiled mode:
the hooks are traced, each op is one call from the compiled code) or eagerly (``--eager``: the
Python hooks run too). One thread, as vLLM's CPU worker. The torch profiler then counts the
calls of each op per step and their time (dispatch, Python body, kernels; the profiler's own
overhead inflates it).

    .venv/bin/python bench/capture_profile.py [--tokens 1 8 32] [--steps 200] [--eager]
    .venv/bin/python bench/capture_profile.py --fold-before REV [--tokens 1 8 32 256] [--reps 9]

The same script measures any version of the capture (it only uses the Capture class), so the
"before" figures of a whole step come from running it on an older commit. ``--fold-before REV``
instead times the per-step fold alone, before and after in the same process: the fold of
commit REV (its ``core/tensor/accumulate.py``, loaded under another name, called as that
commit's ``fold_step`` did) against today's fold of a step's rows (``ops._fold_rows``, what
``end_step`` runs once rows are due), in interleaved blocks, CPU time of
this thread, the load average printed before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from actprune.core.archs import REGISTRY
from actprune.server.capture import Capture, CaptureOptions, ShardInfo
from torch import nn

LAYERS, HIDDEN, MLP, HEADS, HEAD_DIM = 24, 768, 2048, 12, 64


class _Tap(nn.Module):
    """Stands in for RowParallelLinear (the partition attributes capture reads): (T, C) -> (T, H)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.input_size = self.input_size_per_partition = width
        self.tp_rank = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :HIDDEN]


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp, self.self_attn = nn.Module(), nn.Module()
        self.mlp.down_proj = _Tap(MLP)
        self.self_attn.o_proj = _Tap(HEADS * HEAD_DIM)

    def forward(self, positions, hidden, residual):
        # vLLM's layer: (hidden, residual) in and out; cheap element-wise stand-ins in between
        stream = hidden if residual is None else hidden + residual  # (T, H)
        attn_in = stream.repeat(1, HEADS * HEAD_DIM // HIDDEN)  # (T, A)
        h = self.self_attn.o_proj(attn_in)
        mlp_in = torch.cat([h, h, h], 1)[:, :MLP]  # (T, I)
        return self.mlp.down_proj(mlp_in), stream


class _Decoder(nn.Module):
    """Stands in for vLLM's Qwen3Model, the part vLLM compiles."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer() for _ in range(LAYERS))

    def forward(self, positions, hidden):
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = _Decoder()

    def forward(self, positions, hidden):
        return self.model(positions, hidden)


def _time(fn, steps: int) -> float:
    """Median CPU µs of this thread per call over 5 blocks of ``steps`` calls: CPU time, not
    wall time, so that other jobs on a shared machine do not count (their cache pressure does)."""
    return statistics.median(_time_block(fn, steps) for _ in range(5))


def profile(fn, steps: int) -> dict[str, tuple[float, float]]:
    """op name -> (calls per step, µs per step) of the capture's ops: their total time,
    dispatch, Python body and the kernels they run (the ops never nest)."""
    from torch.profiler import profile as prof

    with prof() as p:
        for _ in range(steps):
            fn()
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in p.key_averages():
        if e.key.startswith("actprune::"):
            out[e.key][0] += e.count / steps
            out[e.key][1] += e.cpu_time_total / steps
    return {k: (v[0], v[1]) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eager", action="store_true", help="run the hooks eagerly (vLLM --enforce-eager)")
    ap.add_argument("--fold-before", metavar="REV", help="time the fold alone: commit REV's against today's")
    ap.add_argument("--reps", type=int, default=9, help="interleaved blocks per variant (--fold-before)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.fold_before:
        return fold_before_after(args.fold_before, args.tokens, args.reps)
    bare, hooked = _Model(), _Model()
    cap = Capture(hooked, REGISTRY["Qwen3ForCausalLM"].vllm, CaptureOptions(max_tokens=2048),
                  ShardInfo(), torch.device("cpu"), HIDDEN)
    cap.armed.fill_(1.0)  # no forward context here: arm by hand, every row counts
    print(f"{'eager' if args.eager else 'compiled'}, {LAYERS} layers, 1 thread, "
          f"capture ops {sorted(n for n in dir(torch.ops.actprune) if n[0] != '_' and n != 'name')}")
    base = {t: _measure(bare.model, t, args, profiled=False)[0] for t in args.tokens}
    # Dynamo caches graphs by code object and would hand the hooked model the bare one's graph
    torch._dynamo.reset()
    print("| tokens | step without capture (CPU µs) | with capture (CPU µs) | capture per step (CPU µs) "
          "| op: calls per step, µs per step (profiled) |")
    print("|---|---|---|---|---|")
    for t in args.tokens:
        cost, ops = _measure(hooked.model, t, args, profiled=True)
        detail = "; ".join(f"{k.replace('actprune::', '')}: {c:g}, {us:.0f}" for k, (c, us) in sorted(ops.items()))
        print(f"| {t} | {base[t]:.0f} | {cost:.0f} | **{cost - base[t]:.0f}** | {detail} |", flush=True)


def _measure(decoder: nn.Module, tokens: int, args: argparse.Namespace, profiled: bool):
    """(µs per step, profile) of ``decoder`` on a step of ``tokens`` tokens."""
    run = decoder if args.eager else torch.compile(decoder, dynamic=True, fullgraph=True)
    pos, x = torch.zeros(1), torch.randn(tokens, HIDDEN)
    with torch.no_grad():
        for _ in range(3):  # compile and warm up
            run(pos, x)
        us = _time(lambda: run(pos, x), args.steps)
        ops = profile(lambda: run(pos, x), max(10, args.steps // 5)) if profiled else {}
    return us, ops


def _module_at(rev: str, path: str, name: str):
    """``path`` (a module of this repository) as it was at commit ``rev``, imported as ``name``."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True, capture_output=True,
                         text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # Dynamo re-imports the modules of the code it traces
    spec.loader.exec_module(mod)
    return mod


def _fold_variants(rev: str, tokens: int):
    """{"before": fn, "after": fn}: one step's fold of ``tokens`` rows of every layer, each on its
    own accumulators. Before: commit ``rev``'s maths in one compiled call over all rows, as its
    ``fold_step`` made it. After: today's fold of the rows (``end_step`` calls it when they are due)."""
    from actprune.core.tensor import accumulate
    from actprune.server import forward, ops

    old = _module_at(rev, "core/tensor/accumulate.py", "accumulate_before")
    widths = [MLP, HEADS * HEAD_DIM] * LAYERS
    chan = torch.randn(tokens, sum(widths))  # (T, ΣC)
    streams = torch.randn(tokens, LAYERS + 1, HIDDEN)  # (T, L + 1, H): today's, one slot a boundary
    pairs = torch.stack([streams[:, :-1], streams[:, 1:]], 1)  # (T, in/out, L, H): before, a copy each
    armed, thr = torch.ones(()), torch.tensor(1e-3)
    valid = forward.valid_rows(tokens, armed)

    def math_before(chan, streams, fields, counts, gid, blocks, valid, thr):
        old.fold_packed(fields, counts, gid, chan, valid, thr)
        old.fold_blocks(blocks, streams[:, 0], streams[:, 1], valid)

    before = torch.compile(math_before, dynamic=True, fullgraph=True)
    fb, cb, gb, _ = old.new_packed_channels(widths)
    fa, ca, ga, _ = accumulate.new_packed_channels(widths)
    blocks_b, blocks_a = torch.zeros(2, LAYERS, dtype=torch.float64), torch.zeros(2, LAYERS, dtype=torch.float64)
    routers = torch.zeros(tokens, 0, 1)  # (T, R, E'): a dense model has no router
    router_fields = [torch.zeros(0, dtype=torch.float64)] + [torch.zeros(0, 1, dtype=torch.float64)] * 3
    return {
        "before": lambda: before(chan, pairs, fb, cb, gb, blocks_b, forward.valid_rows(tokens, armed), thr),
        "after": lambda: ops._fold_rows(tokens, chan, streams, routers, valid, fa, ca, router_fields, ga, blocks_a,
                                        thr, 0, False),
    }


def fold_before_after(rev: str, tokens: list[int], reps: int) -> None:
    """Print the table: CPU ms of one step's fold, before and after, medians of ``reps``
    interleaved blocks (before, after, after, before, ...), and the median of the paired ratios."""
    print(f"fold of one step, {LAYERS} layers x ({MLP} + {HEADS * HEAD_DIM}) channels, 1 thread; "
          f"before = {rev}, after = this tree; load average {os.getloadavg()[0]:.1f} at the start")
    print("| T | before (CPU ms) | after (CPU ms) | after / before (median of paired blocks, min–max) |")
    print("|---|---|---|---|")
    for t in tokens:
        fns = _fold_variants(rev, t)
        for fn in fns.values():  # compile and warm up
            for _ in range(3):
                fn()
        calls = max(2, 64 // t)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(reps):
            for k in (("before", "after") if r % 2 == 0 else ("after", "before")):
                times[k].append(_time_block(fns[k], calls))
        ratios = sorted(a / b for a, b in zip(times["after"], times["before"], strict=True))
        print(f"| {t} | {statistics.median(times['before']) / 1e3:.2f} | {statistics.median(times['after']) / 1e3:.2f} "
              f"| **{statistics.median(ratios):.2f}** ({ratios[0]:.2f}–{ratios[-1]:.2f}) |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def _time_block(fn, calls: int) -> float:
    """CPU µs of this thread per call, over ``calls`` calls."""
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls * 1e6


if __name__ == "__main__":
    main()
