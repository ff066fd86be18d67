"""Tried, measured, not kept: the stash written by the compiled graph instead of one op call a layer.

Issue 16's `perf` split put much of what capture costs a small decode step in the calls of
``actprune::stash_layer`` from the compiled graph (one a layer: the wrapper's Python, argument
boxing, the dispatcher, the op's Python body). On a CPU whose step buffers hold every step
there is nothing for the op to branch on, so the graph can write the rows itself:
``index_put_`` into the whole buffers at rows ``cursor + arange(T)`` (the cursor read in the
graph: a CPU tensor, no sync), which Inductor fuses into the kernels that produce the
activations — no call, no Python. In process that saves 33–57 % of the capture's cost per step;
in a vLLM worker it made serving *slower* (BENCHMARKS.md, "The graph writes the stash"), so the
capture keeps the op. The product version (a ``stash_in_graph`` capture option, the step's end
in the model's eager post-hook, tests on both paths through a real server) is commit c3b1c64,
reverted by the next one; this script keeps the in-process measurement reproducible.

Three decoders of the capture-profile skeleton (``bench/capture_profile.py``: the benchmark
model's shapes, near-free projections), compiled with torch.compile as vLLM compiles the decoder
stack, one thread: no capture; the real :class:`Capture` (``stash_layer`` a layer, ``end_step``
once a step); the same Capture with its stash hooks writing the rows as graph ops
(``end_step`` unchanged; here it runs after the writes, which the statistics check confirms —
a real design must make that order explicit). First the check that both captures give the same
statistics, bit for bit, over steps of several sizes; then CPU time per step of this thread, in
interleaved blocks (none, op, graph, graph, op, none, ...), medians, the load average before and
after.

    .venv/bin/python bench/stash_in_graph.py [--tokens 1 8 32] [--reps 9] [--calls 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from actprune.core.archs import REGISTRY  # noqa: E402
from actprune.server.capture import Capture, CaptureOptions, ShardInfo  # noqa: E402
from capture_profile import HIDDEN, _Model, _time_block  # noqa: E402  (the skeleton, its timer)

MAX_TOKENS = 256  # every step here fits the buffers beside the rows waiting (they hold 256 + 15)


def stash_rows(b, taps: list[torch.Tensor], offsets: list[int], hidden: torch.Tensor,
               residual: torch.Tensor | None, slot: int) -> None:
    """What ``stash_layer`` does for a step that fits, as graph ops: the taps (T, C_k) into chan
    (N, ΣC) at columns offsets[k], the stream leaving the layer (T, H) into stream (N, L + 1, H)
    at ``slot``; rows cursor .. cursor + T - 1. Indexing the whole buffers, not views of them,
    lets Inductor write in place (a view's update compiles to a copy of the whole buffer)."""
    t = hidden.shape[0]
    rows = torch.arange(t, device=hidden.device) + b.cursor  # (T,) int64
    for x, off in zip(taps, offsets, strict=True):
        cols = torch.arange(off, off + x.shape[-1], device=x.device)  # (C_k,)
        b.chan.index_put_((rows[:, None], cols[None, :]), x.reshape(t, -1).float())
    s = hidden.float() if residual is None else hidden.float() + residual.float()  # (T, H)
    b.stream.index_put_((rows, torch.full_like(rows, slot)), s)


class GraphStashCapture(Capture):
    """The real Capture with its stash hooks writing the rows as graph ops; ``end_step``, the
    fold, the buffers and the accumulators are the Capture's own."""

    def _layer_hook(self, held, groups, slot, router_slot):
        b, offsets = self.bufs, [self.offsets[g] for g in groups]

        def hook(module, args, output):
            hidden, residual = output
            taps = held[:-1]
            for k in range(len(held)):
                held[k] = None
            stash_rows(b, taps, offsets, hidden, residual, slot)

        return hook

    def _stream_in_hook(self):
        b, h, r = self.bufs, self.layout.hidden_arg, self.layout.residual_arg

        def hook(module, args):
            stash_rows(b, [], [], args[h], args[r], 0)

        return hook


def _own_code(model: _Model) -> _Model:
    """Give ``model``'s decoder a forward of its own code object: Dynamo caches graphs per code
    object and does not guard on hooks, so three variants compiled in one process would
    otherwise share the first one's graph."""
    f = type(model.model).forward
    code = f.__code__.replace(co_name=f"forward_{id(model)}")
    model.model.forward = types.MethodType(types.FunctionType(code, f.__globals__, code.co_name), model.model)
    return model


def variants() -> dict[str, tuple[torch.nn.Module, Capture | None]]:
    """name -> (the compiled decoder, its capture)."""
    out: dict[str, tuple[torch.nn.Module, Capture | None]] = {}
    for name, cls in (("none", None), ("op", Capture), ("graph", GraphStashCapture)):
        model = _own_code(_Model())
        cap = None
        if cls is not None:
            cap = cls(model, REGISTRY["Qwen3ForCausalLM"].vllm, CaptureOptions(max_tokens=MAX_TOKENS, stash_mib=1024),
                      ShardInfo(), torch.device("cpu"), HIDDEN)
            cap.armed.fill_(1.0)  # no forward context here: arm by hand, every row counts
            assert cap.bufs.scratch.shape[0] == 0, "every step must fit the buffers"
        out[name] = (torch.compile(model.model, dynamic=True, fullgraph=True), cap)
    return out


def check_equal(vs: dict, steps: list[int]) -> None:
    """The op capture and the graph-written one, fed the same steps, hold the same statistics."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in steps:
            x = torch.randn(t, HIDDEN, generator=gen)
            for k in ("op", "graph"):
                vs[k][0](torch.zeros(1), x)
    caps = {k: vs[k][1] for k in ("op", "graph")}
    for cap in caps.values():
        cap.bufs.flush()  # fold the rows still waiting
    a, b = caps["op"].groups, caps["graph"].groups
    differ = [f"{g}.{f}" for g in a for f in a[g] if not torch.equal(a[g][f], b[g][f])]
    if differ or not any(bool(a[g][f].abs().sum()) for g in a for f in a[g]):
        raise SystemExit(f"the graph-written stash's statistics differ from the op's (or are empty): {differ[:5]}")
    for cap in caps.values():
        cap.reset()
    print(f"statistics equal, byte for byte, after steps of {steps} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--reps", type=int, default=9, help="interleaved blocks per variant")
    ap.add_argument("--calls", type=int, default=20, help="steps per block")
    args = ap.parse_args()
    torch.set_num_threads(1)
    vs = variants()
    check_equal(vs, [1, 8, 3, 16, 32, 5, 1, 40])
    runs = {k: run for k, (run, _) in vs.items()}
    print(f"load average {os.getloadavg()[0]:.1f} at the start; CPU ms of one thread per step, "
          f"medians of {args.reps} interleaved blocks of {args.calls} steps")
    print("| T | no capture | op a layer | by the graph | op − none | graph − none | op − graph: the calls |")
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
                    ms[k].append(_time_block(lambda k=k, x=x: runs[k](torch.zeros(1), x), args.calls) / 1e3)
            med = {k: statistics.median(v) for k, v in ms.items()}
            print(f"| {t} | {med['none']:.2f} | {med['op']:.2f} | {med['graph']:.2f} "
                  f"| {med['op'] - med['none']:.2f} | {med['graph'] - med['none']:.2f} "
                  f"| **{med['op'] - med['graph']:.2f}** |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
