"""Does vLLM's CPU MoE kernel get faster when experts are removed? (issue 15)

The expert-pruned decode benchmark (``decode_throughput.py --experts``) found that at batch 16
removing half the experts speeds decode up 0.93–1.14×, against a bytes-read ideal of 1.48×.
This script takes the serving stack out of the question: it calls the kernel vLLM's CPU
worker runs for an unquantized MoE layer (``torch.ops._C.cpu_fused_moe``, the portable ``vec``
grouped GEMM of ``CPUUnquantizedExperts`` on a processor without AMX) on the benchmark model's
expert shapes, one call per sparse layer of a step as the model makes them, with
``E`` = 16, 12 and 8 experts (the base, 25 % and 50 % removed) and routing drawn uniformly at
random (the router of a random model spreads tokens nearly evenly). Beside it, the same maths in
plain torch (for each expert picked at least once: its tokens through ``w13``, SiLU-and-mul,
``w2``), which reads exactly the picked experts' weights.

Per configuration: the median time of a step (all layers) over interleaved rounds, the experts
a step reads (distinct picks per layer, from the drawn routing) and their bytes, the
bandwidth that implies, and the speed-up over ``E`` = 16 beside the bytes-read ideal.

    .venv/bin/python bench/moe_kernel.py [--tokens 1 16] [--threads 1] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F


def draw_routing(steps: int, tokens: int, experts: int, top_k: int, gen: torch.Generator):
    """(steps, tokens, top_k) expert ids, each token's k distinct, uniform; weights summing to 1."""
    ids = torch.rand(steps, tokens, experts, generator=gen).argsort(-1)[..., :top_k].to(torch.int32)
    w = torch.rand(steps, tokens, top_k, generator=gen) + 0.5
    return ids, (w / w.sum(-1, keepdim=True)).float()


def torch_moe(x, w13, w2, ids, weights):
    """Reference: only the picked experts' weights are read. x (T, H), w13 (E, 2I, H), w2 (E, H, I)."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = F.linear(x[tok], w13[e])  # (t, 2I)
        gate, up = h.chunk(2, dim=-1)
        out.index_add_(0, tok, F.linear(F.silu(gate) * up, w2[e]) * weights[tok, slot, None])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--moe-intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=12, help="sparse layers a step runs (weights not in cache)")
    p.add_argument("--experts", type=int, nargs="+", default=[16, 12, 8])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16], help="tokens a step (decode batch)")
    p.add_argument("--steps", type=int, default=20, help="steps a round, per configuration")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import vllm._custom_ops as ops  # loads vLLM's CPU kernels (_C)

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    H, inter, k = args.hidden, args.moe_intermediate, args.top_k
    weights = {}
    for E in args.experts:
        layers = []
        for _ in range(args.layers):
            w13 = torch.randn(E, 2 * inter, H, generator=gen) / H ** 0.5
            w2 = torch.randn(E, H, inter, generator=gen) / inter ** 0.5
            layers.append((w13, w2, ops.cpu_prepack_moe_weight(w13, "vec"), ops.cpu_prepack_moe_weight(w2, "vec")))
        weights[E] = layers
    expert_bytes = 3 * H * inter * 4  # fp32
    print(f"# load average {os.getloadavg()[0]:.2f}; {args.threads} thread(s); hidden {H}, expert {inter}, top-{k}, "
          f"{args.layers} layers; one expert {expert_bytes / 1e6:.2f} MB", flush=True)

    # the kernel matches the torch reference (one layer, one step each)
    for E in args.experts:
        for T in args.tokens:
            x = torch.randn(T, H, generator=gen)
            ids, w = draw_routing(1, T, E, k, gen)
            w13, w2, p13, p2 = weights[E][0]
            out = torch.empty_like(x)
            ops.cpu_fused_moe(out, x, p13, p2, None, None, w[0], ids[0], "silu", "vec")
            ref = torch_moe(x, w13, w2, ids[0], w[0])
            assert torch.allclose(out, ref, rtol=1e-3, atol=1e-4), (E, T, (out - ref).abs().max())

    for T in args.tokens:
        x = torch.randn(T, H, generator=gen)
        routing = {E: draw_routing(args.steps * args.layers, T, E, k, gen) for E in args.experts}
        times: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            order = args.experts if r % 2 == 0 else args.experts[::-1]  # interleaved, alternating
            for impl in ("vllm", "torch"):
                for E in order:
                    ids, w = routing[E]
                    out = torch.empty_like(x)
                    t0 = time.perf_counter()
                    for s in range(args.steps):
                        for li, (w13, w2, p13, p2) in enumerate(weights[E]):
                            i = s * args.layers + li
                            if impl == "vllm":
                                ops.cpu_fused_moe(out, x, p13, p2, None, None, w[i], ids[i], "silu", "vec")
                            else:
                                torch_moe(x, w13, w2, ids[i], w[i])
                    times.setdefault((impl, E), []).append((time.perf_counter() - t0) / args.steps)
        print(f"\ntokens a step: {T}")
        print("| kernel | experts | experts read / layer | MB read / step | ms / step (min–max) | GB/s "
              "| speed-up | bytes-read ideal | ÷ ideal |")
        print("|---|---|---|---|---|---|---|---|---|")
        base_E = args.experts[0]
        read = {E: torch.tensor([ids.unique().numel() for ids in routing[E][0]]).float().mean().item()
                for E in args.experts}
        for impl in ("vllm", "torch"):
            base = statistics.median(times[(impl, base_E)])
            for E in args.experts:
                t = times[(impl, E)]
                med = statistics.median(t)
                mb = read[E] * args.layers * expert_bytes / 1e6
                ideal = read[base_E] / read[E]
                print(f"| {impl} | {E} | {read[E]:.2f} | {mb:.0f} | {med * 1e3:.2f} ({min(t) * 1e3:.2f}–"
                      f"{max(t) * 1e3:.2f}) | {mb / 1e3 / med:.1f} | {base / med:.2f}× | {ideal:.2f}× "
                      f"| {base / med / ideal:.2f} |")
    print(f"\n# load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
