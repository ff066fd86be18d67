"""Where the capture's time goes in a CUDA-graph decode step (issue 16, GPU path).

Each piece of the capture's per-step work, captured alone in a CUDA graph and replayed, on the
step buffers of a Qwen3 shape (``GraphCapture`` of bench/graph_decode.py: the ops and buffers
the vLLM plugin runs):

* ``stash``: the L + 1 ``actprune::stash_layer`` calls of a step (the stream entering the first
  layer; each layer's two taps and the stream leaving it), as transformers gives them (the
  layer's output is the stream), and as vLLM does (hidden + residual, added in the op); with
  torch's copies and with the one-launch kernel (``actprune.server.stash_kernel``) a GPU uses;
* ``fold``: the end-of-step fold of the step's T rows into the accumulators, compiled as served
  (dynamic shapes, one compile for every T), compiled for this T alone, and eager;
* ``replay``: a graph of one tiny kernel, the floor of any replay.

Prints µs per step and GPU kernels per piece (torch profiler over one eager call); on a CPU the
pieces run eagerly (no graph), for the tests.

    python bench/graph_capture_cost.py --json cost.json        # on a GPU: Qwen3-1.7B's shape
    python bench/graph_capture_cost.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from actprune.server import ops
from graph_decode import FULL, TINY, GraphCapture, _timer, as_graph, qwen3


def kernels(fn: Callable[[], None], device: torch.device) -> int | None:
    """GPU kernels one eager call of ``fn`` launches (None on a CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def pieces(model: torch.nn.Module, b: int) -> dict[str, Callable[[], None]]:
    """The capture's per-step pieces for a step of ``b`` tokens, each a callable."""
    cap = GraphCapture(model, rows=b)  # its hooks stay disabled: the pieces call the ops themselves
    bufs, p = cap.bufs, next(model.parameters())
    cap.armed.fill_(1.0)
    cfg = model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    offsets = [sum(cap.widths[:g]) for g in range(len(cap.widths))]
    taps = [torch.randn(b, w, dtype=p.dtype, device=p.device) for w in cap.widths]  # (T, C) each
    h, r = (torch.randn(b, hidden, dtype=p.dtype, device=p.device) for _ in range(2))  # (T, H)

    def stash(residual: torch.Tensor | None, kernel: bool = True) -> Callable[[], None]:
        def run() -> None:
            ops.STASH_KERNEL = kernel  # read as the ops run: at capture, for a graph
            torch.ops.actprune.stash_layer([], None, h, residual, bufs.phase, [], [], 0, -1, 0, False)
            for j in range(layers):
                g = [2 * j, 2 * j + 1]
                torch.ops.actprune.stash_layer(taps[2 * j:2 * j + 2], None, h, residual, bufs.phase,
                                               [offsets[x] for x in g], g, j + 1, -1, 0, False)
            ops.STASH_KERNEL = True
        return run

    def fold_args() -> tuple:
        return (bufs.chan[:b], bufs.stream[:b], bufs.routers[:b], bufs.fields, bufs.counts, bufs.router_fields,
                bufs.gid, bufs.blocks, bufs.valid[:b], bufs.threshold, bufs.top_k, bufs.renormalize)

    bufs.valid[:b].fill_(True)
    static = torch.compile(ops._fold_math, dynamic=False, fullgraph=True)
    return {
        "stash, torch copies (transformers: stream = output)": stash(None, kernel=False),
        "stash, torch copies (vLLM: hidden + residual)": stash(r, kernel=False),
        "stash, one kernel a layer (transformers)": stash(None),
        "stash, one kernel a layer (vLLM)": stash(r),
        "fold, compiled, dynamic T (as served)": lambda: bufs._fold(b),
        "fold, compiled for this T": lambda: static(*fold_args()),
        "fold, eager": lambda: ops._fold_math(*fold_args()),
        "replay floor (one tiny kernel)": lambda: bufs.phase.fill_(ops.STEP_DONE),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = qwen3(TINY if args.tiny else FULL, args.device, dtype)
    timer = _timer(device)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                           "torch": torch.__version__, "batches": {}}
    for b in args.batches:
        row = {}
        for name, fn in pieces(model, b).items():
            n_kernels = kernels(fn, device)
            run = as_graph(fn, device)
            us = 1e6 * min(timer(run, args.replays) for _ in range(3))
            row[name] = {"us": round(us, 2), "kernels": n_kernels}
            print(f"B={b:3d}  {name:52s} {us:9.2f} µs  {n_kernels} kernels", flush=True)
        res["batches"][str(b)] = row
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
