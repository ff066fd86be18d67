"""The stash as one op call a layer, or written in the compiled graph: exactness and CPU cost.

Issue 16's `perf` split put most of what the capture still costs a batch-8 decode step in the
calls of ``actprune::stash_layer`` from the compiled graph (one a layer: the wrapper's Python,
argument boxing, the dispatcher, the op's Python body), not in the copies they make. Here the
same stash, written by the compiled graph itself:
``index_put_`` into the same step buffers at rows ``cursor + arange(T)`` (``cursor``: the rows
already waiting, read on the device inside the graph, no host read), which Inductor fuses into
the kernels that produce the tapped activations — no call, no Python, no copy kernel of its own.

Three decoders of the capture-profile skeleton (``bench/capture_profile.py``: the benchmark
model's shapes, near-free projections), compiled with torch.compile as vLLM compiles the
decoder stack (the model around it eager, as vLLM runs it), one thread: no capture; the real
:class:`Capture` with ``stash_in_graph=False`` (one ``stash_layer`` call a layer, ``end_step`` in
the graph); and the same Capture as a CPU runs it by default, its buffers holding every step
(the graph writes the rows, ``actprune.server.ops.stash_rows``; ``finish_step`` runs in the
model's post-hook, eagerly, folding every FOLD_ROWS rows as ``end_step`` does). First the check that
both captures give the same statistics, bit for bit, over steps of several sizes; then CPU time
per step of this thread, in interleaved blocks (none, op, in-graph, in-graph, op, none, ...),
medians, the load average before and after.

    .venv/bin/python bench/stash_in_graph.py [--tokens 1 8 32] [--reps 9] [--calls 20]

A GPU keeps the op (its stash is one Triton kernel a layer, replayed in a CUDA graph with no
Python; see docs/capture.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from actprune.core.archs import REGISTRY  # noqa: E402
from actprune.server.capture import Capture, CaptureOptions, ShardInfo  # noqa: E402
from capture_profile import HIDDEN, _Model  # noqa: E402  (the skeleton)


def _own_code(model: _Model) -> _Model:
    """Give ``model``'s decoder a forward of its own code object: Dynamo caches graphs per code
    object and does not guard on hooks, so three variants compiled in one process would
    otherwise share the first one's graph."""
    f = type(model.model).forward
    code = f.__code__.replace(co_name=f"forward_{id(model)}")
    model.model.forward = types.MethodType(types.FunctionType(code, f.__globals__, code.co_name), model.model)
    return model


def variants() -> dict[str, tuple[_Model, Capture | None]]:
    out: dict[str, tuple[_Model, Capture | None]] = {}
    # steps of up to 256 tokens: the default 1 GiB of a CPU holds them all; the same buffers
    # either way, the stash written by the graph or by one stash_layer call a layer
    for name, in_graph in (("none", None), ("op", False), ("in-graph", None)):
        model = _own_code(_Model())
        cap = None
        if name != "none":
            cap = Capture(model, REGISTRY["Qwen3ForCausalLM"].vllm,
                          CaptureOptions(max_tokens=256, stash_in_graph=in_graph), ShardInfo(), torch.device("cpu"),
                          HIDDEN)
            cap.armed.fill_(1.0)  # no forward context here: arm by hand, every row counts
            assert cap.in_graph == (name == "in-graph"), name
        # as vLLM: the decoder stack compiled, the model around it (and its hooks) eager
        model.model = torch.compile(model.model, dynamic=True, fullgraph=True)
        out[name] = (model, cap)
    return out


def check_equal(vs: dict, steps: list[int]) -> None:
    """The op capture and the in-graph one, fed the same steps, hold the same statistics."""
    gen = torch.Generator().manual_seed(0)
    runs = {k: vs[k][0] for k in ("op", "in-graph")}
    with torch.no_grad():
        for t in steps:
            x = torch.randn(t, HIDDEN, generator=gen)
            for run in runs.values():
                run(torch.zeros(1), x)
    caps = {k: vs[k][1] for k in runs}
    for cap in caps.values():
        cap.bufs.flush()  # fold the rows still waiting
    a, b = caps["op"].groups, caps["in-graph"].groups
    differ = [f"{g}.{f}" for g in a for f in a[g] if not torch.equal(a[g][f], b[g][f])]
    if differ or not any(bool(a[g][f].abs().sum()) for g in a for f in a[g]):
        raise SystemExit(f"the in-graph stash's statistics differ from the op's (or are empty): {differ[:5]}")
    for cap in caps.values():
        cap.reset()
    print(f"statistics equal, byte for byte, after steps of {steps} tokens")


def _block(fn, calls: int) -> float:
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--reps", type=int, default=9, help="interleaved blocks per variant")
    ap.add_argument("--calls", type=int, default=20, help="steps per block")
    args = ap.parse_args()
    torch.set_num_threads(1)
    vs = variants()
    check_equal(vs, [1, 8, 3, 16, 32, 5, 1, 40])
    runs = {k: m for k, (m, _) in vs.items()}
    print(f"load average {os.getloadavg()[0]:.1f} at the start; CPU ms of one thread per step, "
          f"medians of {args.reps} interleaved blocks of {args.calls} steps")
    print("| T | no capture | op a layer | in the graph | op − none | in-graph − none | op − in-graph: the calls |")
    print("|---|---|---|---|---|---|---|")
    order = list(runs)
    with torch.no_grad():
        for t in args.tokens:
            x = torch.randn(t, HIDDEN)
            for run in runs.values():  # compile for this size, warm up
                for _ in range(3):
                    run(torch.zeros(1), x)
            ms: dict[str, list[float]] = {k: [] for k in runs}
            for r in range(args.reps):
                for k in (order if r % 2 == 0 else order[::-1]):
                    ms[k].append(_block(lambda k=k, x=x: runs[k](torch.zeros(1), x), args.calls))
            med = {k: statistics.median(v) for k, v in ms.items()}
            print(f"| {t} | {med['none']:.2f} | {med['op']:.2f} | {med['in-graph']:.2f} "
                  f"| {med['op'] - med['none']:.2f} | {med['in-graph'] - med['none']:.2f} "
                  f"| **{med['op'] - med['in-graph']:.2f}** |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
