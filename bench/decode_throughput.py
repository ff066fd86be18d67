"""Decode throughput of MLP-pruned vs unpruned models served by ``actprune serve``.

Builds (once, cached in --dir) a random fp32 Qwen3-shaped model of ~150M parameters (hidden
1024, 12 layers, MLP 3072, 16 query heads × 64, 8 KV heads), serves it, sends a few texts and
pulls the captured stats from the server, plans 25 % and 50 % MLP pruning (uniform → stock
Qwen3 architecture) and 50 % with per-layer widths (→ actprune architecture), slices, and serves
every checkpoint at once. Then, in interleaved rounds so that the load of a shared machine hits
every model alike — each measured with the others stopped (SIGSTOP; ``--no-freeze-idle``) —
streams greedy completions and times the decode phase (tokens after the
first), at batch 1 and at --batch concurrent requests, and the CPU time the whole server process
group spends per generated token (steadier than wall time when the machine is shared).

    .venv/bin/python bench/decode_throughput.py --dir /tmp/actprune-decode

``--source DIR --checkpoint NAME=PRUNED`` serves checkpoints pruned elsewhere (the output of
``actprune compress``: any mix of widths, heads, KV groups and layers) beside their source, as
they are; parameters are counted from the safetensors headers for every model.

Ideal speed-up = parameters before ÷ after (decode streams every weight once per step).
Goal (issue #4): measured speed-up ≥ 0.9 × ideal.

Mixture of experts (issue 15): ``--experts E --top-k K --moe-intermediate M`` builds a Qwen3-MoE
(every layer sparse) instead and prunes 25 % / 50 % of its experts (uniform, and per-layer
counts). A decode step reads only the experts its tokens are routed to, so the ideal is a ratio of
*bytes read per step*: non-expert parameters + Σ over layers and experts of
P(expert e is in the top-k of at least one of the step's B tokens) × one expert's parameters,
with P = 1 − (1 − fₑ)^B from each server's own captured routing frequencies fₑ over the measured
traffic (tokens of a step taken as independent: every request has its own prompt). At batch 1
that is the active bytes — expert pruning barely changes them, so the ideal is ≈ 1× — and as B
grows it tends to the total bytes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
from actprune.client.http import Client
from actprune.core.tensor.checkpoint import ShardIndex
from machine import group_cpu_seconds, others_frozen, settle

SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=8, head_dim=64, max_position_embeddings=4096)
SERVER_ARGS = ["--max-model-len", "1024", "--max-num-seqs", "16",
               "--max-num-batched-tokens", "1024"]
# name -> plan request fields (None: the unpruned model)
VARIANTS: dict[str, dict | None] = {
    "base": None,
    "mlp25": {"strategy": "magnitude", "mlp_ratio": 0.25, "width_multiple": 64},
    "mlp50": {"strategy": "magnitude", "mlp_ratio": 0.5, "width_multiple": 64},
    "mlp50-per-layer": {"strategy": "magnitude", "mlp_ratio": 0.5, "width_multiple": 64, "per_layer": True},
}
# plans of the MoE run (--experts): fractions of the routed experts removed
MOE_VARIANTS: dict[str, dict | None] = {
    "base": None,
    "experts25": {"expert_ratio": 0.25},
    "experts50": {"expert_ratio": 0.5},
    "experts50-per-layer": {"expert_ratio": 0.5, "per_layer": True},
}
TEXTS = [
    "The old harbour town lies at the mouth of the river, where fishing boats return at dawn.",
    "Pruning removes neurons, attention heads or whole layers to make a model smaller.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "Visitors walk along the stone walls, past the cathedral and the market square.",
] * 4


# ---- setup --------------------------------------------------------------------------------
def build_source(root: Path, shape: dict | None = None, dtype: str = "float32") -> Path:
    """The random model, built once in ``root`` (a Qwen3-MoE when ``shape`` has ``num_experts``)."""
    from actprune.pruning.fixtures.synthetic import build_checkpoint

    shape = shape or SHAPE
    src = root / ("base-moe" if shape.get("num_experts") else "base")
    if not (src / "config.json").is_file():
        build_checkpoint(src, arch="qwen3_moe" if shape.get("num_experts") else "qwen3", dtype=dtype, **shape)
    return src


def server(model: Path, log: Path, compiled: bool, extra: tuple[str, ...] = ()):
    from actprune.server.process import ServerProcess

    args = [*SERVER_ARGS, *extra, *([] if compiled else ["--enforce-eager"])]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "ACTPRUNE_SNAPSHOT_DIR": str(log.parent / f"snap-{log.stem}"),
           "ACTPRUNE_SNAPSHOT_INTERVAL": "0"}
    return ServerProcess(model, args, env=env, log_path=log, startup_timeout=1200)


def prune_all(src: Path, base_url: str, root: Path, wanted: list[str] | None = None,
              variants: dict[str, dict | None] = VARIANTS) -> dict[str, Path]:
    """Stats captured by the base server -> plans -> sliced checkpoints: name -> checkpoint."""
    from actprune.core.planning.planner import make_plan
    from actprune.core.tensor.checkpoint import ColumnNorms
    from actprune.core.wire.plan_request import PlanRequest
    from actprune.pruning.checkpoint.slicer import slice_checkpoint

    for text in TEXTS:
        httpx.post(base_url + "/v1/completions", timeout=300,
                   json={"model": str(src), "prompt": text, "max_tokens": 1}).raise_for_status()
    with Client(base_url) as client:
        stats = client.stats()
    cfg = json.loads((src / "config.json").read_text())
    out = {}
    for name, fields in variants.items():
        if fields is None or (wanted is not None and name not in wanted):
            continue
        plan = make_plan(stats, cfg, PlanRequest(**fields), ColumnNorms.of(src))
        ckpt = root / name
        if not (ckpt / "config.json").is_file():
            slice_checkpoint(src, plan, ckpt, progress=False)
        out[name] = ckpt
    return out


# ---- measuring ----------------------------------------------------------------------------
def stream_stamps(base_url: str, model: str, tokens: int, prompt: str) -> list[float]:
    """One streamed greedy completion of ``tokens`` tokens: the arrival time of each chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True}
    stamps = []
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    return stamps


def decode_rate(base_url: str, model: str, tokens: int, prompt: str = "The museum opens at nine") -> tuple[float, float]:
    """One streamed greedy completion: (decode tokens/s after the first token, seconds)."""
    t0 = time.perf_counter()
    stamps = stream_stamps(base_url, model, tokens, prompt)
    return stream_rate(stamps, model), stamps[-1] - t0  # stream_rate refuses fewer than 2 chunks


MIN_STEP_S = 1e-4  # no engine decodes a token in less: shorter gaps are chunks read in one go


class ReadInOneGo(RuntimeError):
    """A stream's chunks arrived together: the client was not reading, no rate can be had."""


def retried(fn, tries: int = 3):
    """``fn()``, called again when a stream was read in one go (the benchmark's own client was
    starved of CPU for a moment, on a small machine); the last refusal is raised."""
    for attempt in range(tries):
        try:
            return fn()
        except ReadInOneGo as e:
            if attempt == tries - 1:
                raise
            print(f"  {e}; measuring that stream again", flush=True)


def stream_rate(stamps: list[float], model: str = "model") -> float:
    """Decode tokens/s from the arrival times of a stream's chunks, after the first. Chunks that
    sat in the socket while the client was not reading arrive together, and their span says
    nothing about the decode (once: 40,000 tok/s on a tiny model): refused, not reported."""
    if len(stamps) < 2:
        raise RuntimeError(f"{model}: got {len(stamps)} streamed chunks")
    span, n = stamps[-1] - stamps[0], len(stamps) - 1
    if span < n * MIN_STEP_S:
        raise ReadInOneGo(f"{model}: {n + 1} chunks arrived within {1e3 * span:.2f} ms, read in one go "
                           "(the client was not reading): no decode rate from that; rerun on a quieter machine")
    return n / span


def batch_rate(base_url: str, model: str, tokens: int, batch: int) -> float:
    """``batch`` concurrent streamed completions: decode tokens/s of all of them together."""
    with ThreadPoolExecutor(batch) as pool:
        t0 = time.perf_counter()
        # a prompt of its own per request: identical greedy requests would be routed alike, and
        # an MoE step would read only the experts of one sequence
        # the batch's figure is its wall time, not each stream's rate: with many streams on a
        # small machine a client thread may read its chunks in one go, which says nothing
        # about the server
        runs = list(pool.map(lambda i: stream_stamps(base_url, model, tokens, f"{i}. {TEXTS[i % len(TEXTS)]}"),
                             range(batch)))
    return batch * tokens / (time.perf_counter() - t0) if runs else 0.0


def _one_stream(srv, tokens: int) -> tuple[float, float]:
    """(decode tokens/s, tokens per CPU-second of the server's process group) of one stream."""
    cpu0 = group_cpu_seconds(srv.proc.pid)
    rate = decode_rate(srv.base_url, srv.model, tokens)[0]
    return rate, tokens / (group_cpu_seconds(srv.proc.pid) - cpu0)


def warm_up(servers: dict[str, object], batch: int, freeze: bool = True) -> None:
    """First requests pay one-off costs, batched ones too: each server alone, then the machine
    left to settle (:func:`settle`)."""
    for name, srv in servers.items():
        with others_frozen(servers, name, freeze):
            decode_rate(srv.base_url, srv.model, 8)
            if batch > 1:
                batch_rate(srv.base_url, srv.model, 8, batch)
    settle(0.1 + 0.15 * len(servers))  # an idle vLLM server polls: ~0.12 cores each, measured


def measure(servers: dict[str, object], rounds: int, tokens: int, batch: int,
            freeze: bool = True) -> dict[str, dict[str, float]]:
    res: dict[str, dict[str, list[float]]] = {n: {"b1": [], "bN": [], "cpu": []} for n in servers}
    for r in range(rounds):
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        for name in order:
            srv = servers[name]
            with others_frozen(servers, name, freeze):
                rate, per_cpu = retried(functools.partial(_one_stream, srv, tokens))
                res[name]["b1"].append(rate)
                res[name]["cpu"].append(per_cpu)
                if batch > 1:
                    res[name]["bN"].append(batch_rate(srv.base_url, srv.model, tokens, batch))
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {res[n]['b1'][-1]:.1f} tok/s ({res[n]['cpu'][-1]:.1f} per CPU-s)" for n in servers), flush=True)
    return {n: {k: statistics.median(v) if v else float("nan") for k, v in d.items()} for n, d in res.items()}


def moe_read_per_step(config: dict, stats, batch: int) -> float:
    """Parameters a decode step of ``batch`` independent tokens reads from an MoE checkpoint:
    every non-expert parameter, and each expert of each sparse layer with the probability that
    at least one token picks it, 1 − (1 − fₑ)^batch, fₑ = topk_count / count of the server's
    captured stats (``stats``) — the expected active bytes at batch 1, the total as batch grows."""
    import numpy as np
    from actprune.core.archs import model_shape

    shape = model_shape(config)
    read = float(shape.params())
    for i, layer in enumerate(shape.layers):
        if layer.num_experts is None:
            continue
        router = stats.router(i)
        freq = np.asarray(router["topk_count"], dtype=np.float64) / max(float(router["count"]), 1.0)
        expert = 3 * shape.hidden_size * layer.intermediate_size
        read -= layer.num_experts * expert  # all experts counted above, then only the touched ones
        read += expert * float(np.sum(1.0 - (1.0 - np.clip(freq, 0.0, 1.0)) ** batch))
    return read


def moe_ideals(servers: dict, checkpoints: dict[str, Path], batch: int) -> dict[str, tuple[float, float]]:
    """name -> ideal decode speed-up over the base at batch 1 and at ``batch``: the ratio of
    parameters read per step (:func:`moe_read_per_step`), from each server's captured routing."""
    read = {}
    for name, srv in servers.items():
        with Client(srv.base_url) as client:
            stats = client.stats()
        config = json.loads((checkpoints[name] / "config.json").read_text())
        read[name] = (moe_read_per_step(config, stats, 1), moe_read_per_step(config, stats, batch))
    return {n: (read["base"][0] / r1, read["base"][1] / rn) for n, (r1, rn) in read.items()}


def report(medians, params: dict[str, int], batch: int, load: tuple[float, ...],
           ideals: dict[str, tuple[float, float]] | None = None) -> str:
    """``params``: name -> parameter count (the base model's included). ``ideals``: name ->
    (ideal speed-up at batch 1, at ``batch``) where it is not the parameter ratio (MoE)."""
    base = medians["base"]
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average before "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "",
        f"| model | params | ideal speed-up | batch 1 tok/s | speed-up | ÷ ideal "
        f"| batch 1 tok per CPU-s | speed-up | ÷ ideal | batch {batch} tok/s | speed-up | ÷ ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in medians.items():
        after = params[name]
        ideal, ideal_n = (ideals or {}).get(name, (params["base"] / after,) * 2)
        s1, sc, sn = m["b1"] / base["b1"], m["cpu"] / base["cpu"], m["bN"] / base["bN"]
        shown = f"{ideal:.2f}×" if abs(ideal - ideal_n) < 5e-3 else f"{ideal:.2f}× (batch {batch}: {ideal_n:.2f}×)"
        lines.append(
            f"| {name} | {after / 1e6:.1f} M | {shown} | {m['b1']:.1f} | {s1:.2f}× | {s1 / ideal:.2f} "
            f"| {m['cpu']:.1f} | {sc:.2f}× | {sc / ideal:.2f} "
            f"| {m['bN']:.1f} | {sn:.2f}× | {sn / ideal_n:.2f} |"
        )
    return "\n".join(lines)


def checkpoints_given(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Path]:
    """``--checkpoint NAME=DIR`` -> {NAME: DIR}; they are pruned from ``--source``, which they
    need. Errors go through ``ap.error`` (one line, exit 2)."""
    out: dict[str, Path] = {}
    for item in args.checkpoint:
        name, sep, d = item.partition("=")
        if not sep or not name or not d:
            ap.error(f"--checkpoint {item!r}: expected NAME=DIR")
        if name == "base" or name in out or name in VARIANTS or name in MOE_VARIANTS:
            ap.error(f"--checkpoint {item!r}: the name {name!r} is taken")
        if not (Path(d) / "config.json").is_file():
            ap.error(f"--checkpoint {item!r}: {d} has no config.json")
        out[name] = Path(d)
    if out and args.source is None:
        ap.error("--checkpoint needs --source, the checkpoint it was pruned from")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/actprune-decode"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--batch", type=int, default=4, help="concurrent requests for the batched figure")
    ap.add_argument("--compiled", action="store_true",
                    help="torch.compile (and CUDA graphs on a GPU); default: --enforce-eager")
    ap.add_argument("--hidden", type=int, default=SHAPE["hidden_size"])
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    ap.add_argument("--intermediate", type=int, default=SHAPE["intermediate_size"])
    ap.add_argument("--dtype", default="float32", help="of the checkpoints and the servers")
    ap.add_argument("--experts", type=int, default=0,
                    help="a Qwen3-MoE with this many experts per layer, expert-pruned (0: dense Qwen3, MLP-pruned)")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (with --experts)")
    ap.add_argument("--moe-intermediate", type=int, default=512, help="neurons of one expert (with --experts)")
    ap.add_argument("--variants", default=None,
                    help="pruned variants to serve beside the base, comma-separated (default: all of "
                    f"{', '.join(v for v in VARIANTS if v != 'base')}; with --experts "
                    f"{', '.join(v for v in MOE_VARIANTS if v != 'base')})")
    ap.add_argument("--server-args", default="",
                    help="more vLLM flags for every server, e.g. '--gpu-memory-utilization 0.2'")
    ap.add_argument("--source", type=Path, default=None,
                    help="serve and prune this Qwen3 checkpoint instead of building one (shape flags ignored)")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                    help="serve this pruned checkpoint of --source beside it, as it is (e.g. the output of "
                    "actprune compress); repeatable; with it no variant is pruned unless --variants names it")
    ap.add_argument("--json", type=Path, default=None, help="also write the medians here")
    ap.add_argument("--no-freeze-idle", dest="freeze_idle", action="store_false",
                    help="leave the other servers running while one is measured (default: SIGSTOP them)")
    args = ap.parse_args()
    given = checkpoints_given(ap, args)
    args.dir.mkdir(parents=True, exist_ok=True)
    shape = {**SHAPE, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
             "intermediate_size": args.intermediate, "num_attention_heads": args.hidden // 64,
             "num_key_value_heads": max(1, args.hidden // 128)}
    if args.experts:
        shape.update(num_experts=args.experts, num_experts_per_tok=args.top_k,
                     moe_intermediate_size=args.moe_intermediate)
    src = args.source or build_source(args.dir, shape, args.dtype)
    from actprune.core.archs import model_shape

    layers = model_shape(json.loads((src / "config.json").read_text())).layers
    moe = any(s.num_experts is not None for s in layers)  # transformers 5 says num_local_experts
    variants = MOE_VARIANTS if moe else VARIANTS
    extra = ("--dtype", args.dtype, *args.server_args.split())
    default = "" if given else ",".join(variants)
    wanted = [v for v in (args.variants or default).split(",") if v and v != "base"]
    ideals = None
    with ExitStack() as stack:
        print("starting the base server ...", flush=True)
        servers = {"base": stack.enter_context(server(src, args.dir / "base.log", args.compiled, extra))}
        pruned = prune_all(src, servers["base"].base_url, args.dir, wanted, variants) if wanted else {}
        pruned.update(given)
        for name, ckpt in pruned.items():
            print(f"starting {name} ...", flush=True)
            servers[name] = stack.enter_context(server(ckpt, args.dir / f"{name}.log", args.compiled, extra))
        if moe:  # the routing frequencies of the ideal: those of the measured traffic alone
            for srv in servers.values():
                with Client(srv.base_url) as client:
                    client.reset()
        warm_up(servers, args.batch, args.freeze_idle)
        load = os.getloadavg()  # as the rounds begin
        medians = measure(servers, args.rounds, args.tokens, args.batch, args.freeze_idle)
        if moe:
            ideals = moe_ideals(servers, {"base": src, **pruned}, args.batch)
    # stored parameters, from the headers: the same count for the pruned variants and the given ones
    params = {n: ShardIndex(d).parameters() for n, d in {"base": src, **pruned}.items()}
    print(report(medians, params, args.batch, load, ideals))
    if args.json:
        args.json.write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_avg_before": load[0],
            "dtype": args.dtype, "mode": "compiled" if args.compiled else "eager", "batch": args.batch,
            "tokens": args.tokens, "params": params, "medians": medians,
            **({"ideals": ideals} if ideals else {})}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
