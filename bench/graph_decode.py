"""Capture cost and pruned decode speed under CUDA graphs, on a transformers Qwen3 (issues 14, 16).

For a GPU machine where vLLM cannot be installed: the lent H200 here reaches no package registry,
and the CUDA vLLM wheel (with the torch it pins) is far over what can be carried to it.
bench/gpu.sh measures the real thing (vLLM compiled mode + CUDA graphs, ``actprune serve``) on a
pod that has a registry. This script keeps what can be measured without vLLM, and says so:

* the decode step of a transformers ``Qwen3ForCausalLM`` (its own decoder layers, a KV cache at
  fixed addresses, greedy argmax), captured as one CUDA graph and replayed, as vLLM replays its
  decode graphs;
* ``capture``: the same graph with actprune's capture ops in it: ``actprune::stash_layer`` after
  every decoder layer and ``actprune::end_step`` after the last, the very ops, buffers and fold
  the vLLM plugin runs (``actprune.server.ops``), wired as ``actprune.server.capture`` wires
  them (inputs of ``down_proj`` and ``o_proj``, the residual stream between layers). Step time
  on vs off in interleaved rounds per batch size; then checks: replays with capture on give the
  same greedy tokens as without; replays while unarmed (as vLLM's warm-up is) change nothing;
  the accumulators after armed replays equal float64 sums of the very activations, logged from
  inside the same graph;
* ``decode``: dense vs MLP-pruned widths (20 %, 50 % of neurons), step time against the ideal
  given by the weight bytes a decode step reads (memory-bound at these batches).

What this does not measure: vLLM's kernels, scheduler and sampler, and its Python per step
(the capture's per-step host work is outside the graph here too). Distillation speed is
bench/distill_speed.py.

    python bench/graph_decode.py --json out.json        # on a GPU: Qwen3-1.7B's shape, bf16
    python bench/graph_decode.py --tiny --device cpu    # the checks on a CPU (eager, no graph)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from actprune.core.tensor.accumulate import PACKED_FIELDS, new_packed_channels
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.schema import DEFAULT_NEAR_ZERO
from actprune.server import ops  # importing it registers torch.ops.actprune.*
from actprune.server.ops import StepBuffers
from torch import nn

HOOKS = "actprune.bench.graph_decode"
# Qwen3-1.7B: 28 layers of hidden 2048, 16 query heads / 8 KV heads of 128, MLP 6144, tied
# embeddings of 151936 tokens (1.72 B parameters)
FULL = dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
            intermediate_size=6144, vocab_size=151936)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            intermediate_size=128, vocab_size=512)


def qwen3(shape: dict[str, int], device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-weight Qwen3ForCausalLM of ``shape``, built on ``device``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**shape, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    return model.to(dtype).eval()


class StaticKV:
    """Keys and values of every layer, (B, KV heads, S, D), at fixed addresses, written at the
    device position ``pos`` (1,) int64: transformers' ``Cache.update``, the one method a
    decoder layer calls, with no host value in it (a CUDA graph replays it as it is)."""

    def __init__(self, cfg: Any, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer_idx].index_copy_(2, self.pos, key)  # key, value: (B, KV, 1, D)
        self.v[layer_idx].index_copy_(2, self.pos, value)
        return self.k[layer_idx], self.v[layer_idx]


class DecodeStep:
    """One greedy decode step of B sequences, every input and output at a fixed address: ``ids``
    (B, 1) in, the argmax written back to ``ids``, ``logits`` (B, V) out, positions advanced on
    the device. Called eagerly, or captured once and replayed (``graph``)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int) -> None:
        p = next(model.parameters())
        self.model, self.batch = model, batch
        self.kv = StaticKV(model.config, batch, max_len, p.device, p.dtype)
        self.ids = torch.zeros(batch, 1, dtype=torch.int64, device=p.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.int64, device=p.device)
        self.keys = torch.arange(max_len, device=p.device)
        self.mask = torch.zeros(1, 1, 1, max_len, dtype=torch.bool, device=p.device)  # keys a query sees
        self.logits = torch.zeros(batch, model.config.vocab_size, dtype=p.dtype, device=p.device)

    def reset(self, pos: int, token: int = 1) -> None:
        """Start again at position ``pos`` (the cache past it is stale: masked out)."""
        self.kv.pos.fill_(pos)
        self.positions.fill_(pos)
        self.ids.fill_(token)

    @torch.no_grad()
    def __call__(self) -> None:
        m = self.model.model
        self.mask.copy_((self.keys <= self.kv.pos).view(1, 1, 1, -1))
        h = m.embed_tokens(self.ids)  # (B, 1, H)
        pe = m.rotary_emb(h, self.positions)
        for layer in m.layers:
            out = layer(h, attention_mask=self.mask, position_ids=self.positions, past_key_values=self.kv,
                        position_embeddings=pe, cache_position=self.kv.pos)
            h = out[0] if isinstance(out, tuple) else out
        self.logits.copy_(self.model.lm_head(m.norm(h))[:, -1])
        self.ids.copy_(self.logits.argmax(-1, keepdim=True))
        self.kv.pos.add_(1)
        self.positions.add_(1)

    def graph(self, capture: GraphCapture | None = None) -> Callable[[], None]:
        """The step, with ``capture``'s hooks in it when given (enabled only around it), as
        ``as_graph`` makes it: a replayable CUDA graph, on a CPU the eager step. The warm-up
        steps change state that is the caller's to reset."""
        if capture is None:
            return as_graph(self, self.ids.device)

        def hooked() -> None:
            with capture.enabled():
                self()

        return as_graph(hooked, self.ids.device)


def as_graph(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``fn`` captured as a CUDA graph, after warm-up calls on a side stream (they compile the
    capture's fold); on a CPU, ``fn`` itself."""
    if device.type != "cuda":
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


class GraphCapture:
    """actprune's capture ops on a transformers Qwen3, wired as ``actprune.server.capture`` wires
    them on vLLM's model: pre-hooks hold the inputs of ``mlp.down_proj`` and
    ``self_attn.o_proj``; one ``stash_layer`` after each layer (here the layer's output is the
    whole residual stream: transformers adds the residual inside the layer); ``end_step`` after
    the last. ``log`` (steps, B, ΣC) float32, when given: every tap also written, from inside the
    graph, at the device step counter, for the exactness check."""

    def __init__(self, model: nn.Module, rows: int, log_steps: int = 0) -> None:
        p = next(model.parameters())
        layers = list(model.model.layers)
        taps = [lin for ly in layers for lin in (ly.mlp.down_proj, ly.self_attn.o_proj)]  # CHANNEL_KINDS order
        self.widths = [lin.in_features for lin in taps]
        fields, counts, gid, _ = new_packed_channels(self.widths, p.device)
        self.armed = torch.zeros((), dtype=torch.float32, device=p.device)
        threshold = torch.tensor(DEFAULT_NEAR_ZERO, dtype=torch.float32, device=p.device)
        hidden = model.config.hidden_size
        # a step of ``rows`` tokens always fits (on a CPU beside the rows still waiting)
        n, long_rows = StepBuffers.sizes(rows, 1 << 30, p.device.type == "cpu")
        self.bufs = StepBuffers.new(fields, counts, gid, self.armed, threshold, rows=n, long_rows=long_rows,
                                    n_layers=len(layers), hidden=hidden)
        self.bufs.warm_up()
        offsets = [0, *itertools.accumulate(self.widths)][:-1]
        self.log = torch.zeros(log_steps, rows, sum(self.widths), device=p.device) if log_steps else None
        self.step = torch.zeros(1, dtype=torch.int64, device=p.device)
        self.registry = HookRegistry()
        self.registry.disable(HOOKS)  # on only inside ``enabled()``
        phase = self.bufs.phase

        def stream_in(module: nn.Module, args: tuple[Any, ...]) -> None:
            torch.ops.actprune.stash_layer([], None, args[0].reshape(-1, hidden), None, phase, [], [], 0, -1, 0, False)

        self.registry.pre_hook(HOOKS, layers[0], stream_in)
        for j, layer in enumerate(layers):
            held: list[torch.Tensor | None] = [None, None]
            for k, lin in enumerate(taps[2 * j:2 * j + 2]):
                self.registry.pre_hook(HOOKS, lin, self._hold(held, k))
            self.registry.post_hook(HOOKS, layer, self._stash(held, [2 * j, 2 * j + 1], offsets, j + 1, hidden))

        def end(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            torch.ops.actprune.end_step(out.reshape(-1, hidden), phase)
            self.step.add_(1)

        self.registry.post_hook(HOOKS, layers[-1], end)

    @staticmethod
    def _hold(held: list[torch.Tensor | None], k: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            held[k] = args[0]  # (B, 1, C)

        return hook

    def _stash(self, held: list[torch.Tensor | None], groups: list[int], offsets: list[int], slot: int,
               hidden: int) -> Callable[..., None]:
        offs = [offsets[g] for g in groups]

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            taps = [x.reshape(-1, x.shape[-1]) for x in held]  # (T, C_k)
            torch.ops.actprune.stash_layer(taps, None, out.reshape(-1, hidden), None, self.bufs.phase, offs, groups,
                                           slot, -1, 0, False)
            if self.log is not None:
                for x, off in zip(taps, offs, strict=True):
                    self.log[:, :x.shape[0], off:off + x.shape[1]].index_copy_(0, self.step, x[None].float())

        return hook

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        self.registry.enable(HOOKS)
        try:
            yield
        finally:
            self.registry.disable(HOOKS)

    def errors(self, armed_steps: slice) -> dict[str, float]:
        """The accumulators against float64 sums of the logged activations of ``armed_steps``:
        the largest error of each field relative to its column's scale, and the token count's."""
        self.bufs.flush()
        x = self.log[armed_steps].reshape(-1, self.log.shape[-1]).double()  # (n, ΣC)
        ax = x.abs()
        thr = float(torch.tensor(DEFAULT_NEAR_ZERO, dtype=torch.float32))  # the fold compares in float32
        ref = {"sum": (x.sum(0), ax.sum(0)), "sum_sq": ((x * x).sum(0), (x * x).sum(0)),
               "sum_abs": (ax.sum(0), ax.sum(0)), "max_abs": (ax.amax(0), ax.amax(0)),
               "mean": (x.mean(0), ax.mean(0)), "m2": (((x - x.mean(0)) ** 2).sum(0), (x * x).sum(0)),
               "near_zero": ((ax <= thr).sum(0).double(), torch.full_like(ax[0], x.shape[0]))}
        got = dict(zip(PACKED_FIELDS, self.bufs.fields, strict=True))
        err = {f: float(((got[f].double() - r).abs() / s.clamp(min=1e-30)).max()) for f, (r, s) in ref.items()}
        err["count"] = float((self.bufs.counts - x.shape[0]).abs().max())
        err["block_count"] = float((self.bufs.blocks[1] - x.shape[0]).abs().max())
        return err


def _timer(device: torch.device) -> Callable[[Callable[[], None], int], float]:
    def seconds_per_step(run: Callable[[], None], n: int) -> float:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(n):
                run()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3 / n
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        return (time.perf_counter() - t0) / n

    return seconds_per_step


def tokens_after(step: DecodeStep, run: Callable[[], None], n: int, pos: int) -> torch.Tensor:
    """(B, n) greedy tokens of ``n`` runs from position ``pos``."""
    step.reset(pos)
    out = []
    for _ in range(n):
        run()
        out.append(step.ids.clone())
    return torch.cat(out, 1).cpu()


def decoder_matches(model: nn.Module, tokens: int = 12) -> float:
    """Largest |logit| difference between the step, fed a sequence token by token, and the model's
    own forward over the whole sequence (the decoder is transformers' Qwen3, faithfully driven)."""
    step = DecodeStep(model, 2, tokens + 1)
    ids = torch.randint(0, model.config.vocab_size, (2, tokens), device=step.ids.device)
    step.reset(0)
    got = []
    for t in range(tokens):
        step.ids.copy_(ids[:, t:t + 1])
        step.kv.pos.fill_(t)
        step.positions.fill_(t)
        step()
        got.append(step.logits.float().clone())
    with torch.no_grad():
        ref = model(ids).logits.float()  # (2, tokens, V)
    return float((torch.stack(got, 1) - ref).abs().max() / ref.abs().max())


def _ratio(off: list[float], on: list[float]) -> dict[str, float]:
    per_round = [a / b for a, b in zip(off, on, strict=True)]  # on/off throughput of each round
    return {"step_ms_off": round(1e3 * statistics.median(off), 4), "step_ms_on": round(1e3 * statistics.median(on), 4),
            "ratio": round(statistics.median(off) / statistics.median(on), 4),
            "ratio_lo": round(min(per_round), 4), "ratio_hi": round(max(per_round), 4)}


def capture_part(model: nn.Module, batches: list[int], args: argparse.Namespace) -> dict[str, Any]:
    device = next(model.parameters()).device
    timer, res = _timer(device), {}
    for b in batches:
        step = DecodeStep(model, b, args.pos + args.steps + 8)
        off = step.graph()
        cap = GraphCapture(model, rows=b)
        cap.armed.fill_(1.0)
        sides = {"off": off, "on": step.graph(cap)}
        if device.type == "cuda":  # the same capture with torch's copies instead of the stash kernel
            ops.STASH_KERNEL = False
            sides["on, torch copies"] = step.graph(cap)
            ops.STASH_KERNEL = True
        ref = tokens_after(step, off, 8, args.pos)
        same = all(torch.equal(ref, tokens_after(step, run, 8, args.pos)) for run in sides.values())
        times: dict[str, list[float]] = {n: [] for n in sides}
        for r in range(args.rounds):  # interleaved, the order alternating
            for n in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                step.reset(args.pos)
                times[n].append(timer(sides[n], args.steps))
        row = res[str(b)] = {"same_tokens": same, "tok_s_off": round(b / statistics.median(times["off"]), 1)}
        for n in sides:
            if n != "off":
                row[n] = {**_ratio(times["off"], times[n]), "tok_s": round(b / statistics.median(times[n]), 1)}
                print(f"capture  B={b:3d}  {n:16s} off {row[n]['step_ms_off']:.3f} ms  on {row[n]['step_ms_on']:.3f} "
                      f"ms  on/off {row[n]['ratio']:.3f} ({row[n]['ratio_lo']:.3f}-{row[n]['ratio_hi']:.3f})  "
                      f"same tokens {same}", flush=True)
        del step, off, sides, cap
    return res


def exactness_part(model: nn.Module, batch: int, unarmed: int, armed: int) -> dict[str, float]:
    """Replays unarmed (as vLLM's warm-up runs are), then armed; the accumulators against the
    activations the same graph logged."""
    step = DecodeStep(model, batch, unarmed + armed + 16)
    cap = GraphCapture(model, rows=batch, log_steps=unarmed + armed + 8)  # + the warm-up steps
    run = step.graph(cap)
    for field in (*cap.bufs.fields, cap.bufs.counts, cap.bufs.blocks):
        field.zero_()  # what the warm-up and capture steps folded while armed is 0 ...
    cap.bufs.discard()
    cap.step.zero_()
    step.reset(4)
    for i in range(unarmed + armed):
        if i == unarmed:
            cap.armed.fill_(1.0)
        run()
    err = cap.errors(slice(unarmed, unarmed + armed))
    print("exactness", json.dumps(err), flush=True)
    return err


def weight_params(model: nn.Module) -> int:
    """Parameters a decode step reads whole: every linear (the tied lm_head too) and norm; the
    embedding is read one row per token."""
    return sum(mod.weight.numel() for mod in model.modules()
               if isinstance(mod, nn.Linear) or (hasattr(mod, "weight") and mod.weight.dim() == 1))


def decode_part(shape: dict[str, int], batches: list[int], args: argparse.Namespace) -> dict[str, Any]:
    variants = {"dense": 1.0, "mlp20": 0.8, "mlp50": 0.5}
    models = {n: qwen3({**shape, "intermediate_size": int(shape["intermediate_size"] * f) // 64 * 64 or 64},
                       args.device, getattr(torch, args.dtype), seed=1) for n, f in variants.items()}
    reads = {n: weight_params(m) for n, m in models.items()}
    timer, res = _timer(torch.device(args.device)), {}
    for b in batches:
        steps = {n: DecodeStep(m, b, args.pos + args.steps + 8) for n, m in models.items()}
        runs = {n: s.graph() for n, s in steps.items()}
        times: dict[str, list[float]] = {n: [] for n in models}
        for r in range(args.rounds):
            for n in (list(models) if r % 2 == 0 else list(models)[::-1]):
                steps[n].reset(args.pos)
                times[n].append(timer(runs[n], args.steps))
        dense = statistics.median(times["dense"])
        row = {}
        for n in models:
            t = statistics.median(times[n])
            speedup, ideal = dense / t, reads["dense"] / reads[n]
            row[n] = {"step_ms": round(1e3 * t, 4), "tok_s": round(b / t, 1), "speedup": round(speedup, 4),
                      "ideal": round(ideal, 4), "of_ideal": round(speedup / ideal, 4)}
            print(f"decode   B={b:3d}  {n:6s} {1e3 * t:.3f} ms  speedup {speedup:.3f} (ideal {ideal:.3f}: "
                  f"{speedup / ideal:.3f} of it)", flush=True)
        res[str(b)] = row
        del steps, runs
    return {"weight_params_m": {n: round(v / 1e6, 1) for n, v in reads.items()}, "batches": res}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (the CPU check)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per round")
    ap.add_argument("--pos", type=int, default=128, help="position decoding starts at (the prompt's length)")
    ap.add_argument("--parts", nargs="+", default=["capture", "exact", "decode"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    shape = TINY if args.tiny else FULL
    model = qwen3(shape, args.device, getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters())
    machine = (torch.cuda.get_device_name() if args.device == "cuda" else "CPU") + f", {os.cpu_count()} CPUs"
    res: dict[str, Any] = {"machine": machine, "torch": torch.__version__, "params_m": round(params / 1e6, 1),
                           "dtype": args.dtype, "pos": args.pos, "steps": args.steps, "rounds": args.rounds,
                           "load_avg_before": round(os.getloadavg()[0], 2)}
    print(json.dumps(res), flush=True)
    res["decoder_vs_forward"] = decoder_matches(model)
    print(f"decoder vs the model's forward: max |Δlogit| / max |logit| = {res['decoder_vs_forward']:.2e}", flush=True)
    if "capture" in args.parts:
        res["capture"] = capture_part(model, args.batches, args)
    if "exact" in args.parts:
        res["exact"] = exactness_part(model, batch=max(args.batches[:2]), unarmed=3, armed=9)
    if "decode" in args.parts:
        del model
        res["decode"] = decode_part(shape, args.batches, args)
    res["load_avg_after"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
