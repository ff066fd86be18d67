"""What a fold costs a step, by rows per fold, with the caches flushed between steps as a
serving worker's are.

The capture's step buffers on a CPU gather the rows of small steps and fold them together
(``fold_rows``, docs/capture.md). A fold reads and writes every accumulator (seven (ΣC,)
tensors, ~100 bytes a column); in vLLM's worker each step streams the model's weights through
the caches in between, so those accumulators come from memory at every fold; an in-process
benchmark that keeps them hot (``--hot``) measures something else. Here each
simulated step first streams ``--flush-mb`` of memory (a 152M float32 model reads ~600 MB a
step), writes its B rows into the real step buffers, and folds them with the real fold
(``ops._fold_rows``: the channel statistics of every layer and the cosines of the stream) once
``wait`` rows have gathered, in chunks of ``chunk`` rows. Reported: CPU ms of folding per step
(this thread), median of interleaved blocks, with the load average before and after.

What it predicts is the fold alone: in the twenty-sixth session it halved from 16 to 128 rows
a fold at batch 8, and end to end (``bench/capture_overhead.py --variant '{"fold_rows": 16}'``)
128 rows served batch 8 no faster and batch 1 slower (BENCHMARKS.md, issue 16): check a
prediction from here against the servers before changing the default.

    .venv/bin/python bench/fold_rows.py --batch 8 --configs 16:16 64:64 128:128 256:256
    .venv/bin/python bench/fold_rows.py --batch 8 --hot          # no flush: the in-process view
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from actprune.core.tensor.accumulate import new_packed_channels
from actprune.server import ops

LAYERS, HIDDEN, MLP, ATTN = 24, 768, 2048, 12 * 64  # the capture benchmark's model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="rows a step (decode: the batch size)")
    ap.add_argument("--configs", nargs="+", default=["16:16", "64:64", "128:128", "256:256"],
                    help="WAIT:CHUNK: rows that gather before a fold, rows per call of the compiled fold")
    ap.add_argument("--steps", type=int, default=256, help="steps per block")
    ap.add_argument("--blocks", type=int, default=5, help="interleaved blocks per config")
    ap.add_argument("--flush-mb", type=int, default=150, help="memory streamed before each step")
    ap.add_argument("--hot", action="store_true", help="no flush between steps")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as vLLM's CPU worker
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs]

    widths = [MLP, ATTN] * LAYERS
    fields, counts, gid, _ = new_packed_channels(widths)
    most = max(w for w, _ in configs) + args.batch
    chan, stream = torch.randn(most, sum(widths)), torch.randn(most, LAYERS + 1, HIDDEN)
    routers = torch.zeros(most, 0, 1)
    router_fields = [torch.zeros(0, dtype=torch.float64)] + [torch.zeros(0, 1, dtype=torch.float64)] * 3
    valid, blocks, thr = torch.ones(most, dtype=torch.bool), torch.zeros(2, LAYERS, dtype=torch.float64), torch.tensor(1e-3)
    flush = torch.zeros(args.flush_mb << 18)  # float32: MB * 2^20 / 4
    src = torch.randn(args.batch, sum(widths))

    def fold(n: int, chunk: int) -> None:
        ops._fold_rows(n, chan, stream, routers, valid, fields, counts, router_fields, gid, blocks, thr, 0, False, chunk)

    def run(wait: int, chunk: int) -> float:
        pending, spent = 0, 0.0
        for _ in range(args.steps):
            if not args.hot:
                flush.add_(1.0)  # the step's weights pass through the caches
            chan[pending:pending + args.batch].copy_(src)  # the step's stash
            pending += args.batch
            if pending >= wait:
                t0 = time.thread_time()
                fold(pending, chunk)
                spent += time.thread_time() - t0
                pending = 0
        return spent / args.steps * 1e3

    for _, chunk in configs:  # compile every shape first
        fold(chunk, chunk)
    fold(1, 1)
    print(f"load average before: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"B = {args.batch}, {'hot' if args.hot else f'{args.flush_mb} MB streamed'} between steps, "
          f"{LAYERS} layers x ({MLP} + {ATTN}) channels, 1 thread")
    res: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for b in range(args.blocks):
        for c in configs if b % 2 == 0 else configs[::-1]:
            res[c].append(run(*c))
    print("| rows a fold (wait) | rows a call (chunk) | fold CPU ms a step, median (min–max) |")
    print("|---|---|---|")
    for (wait, chunk), v in res.items():
        print(f"| {wait} | {chunk} | {statistics.median(v):.3f} ({min(v):.3f}–{max(v):.3f}) |")
    print(f"load average after: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
