"""Generation throughput with capture on and off: same model, same load, one run.

Builds a Qwen3-shaped model of ~150M parameters with random weights (hidden 768, 24 layers,
12 heads x 64, 4 KV heads, MLP 2048), serves it with `actprune serve` in vLLM's default
compiled mode — once with capture (every statistic on), once with `--no-capture` (plain vLLM)
— and sends the same batch of concurrent completions to each, alternating rounds:

    .venv/bin/python bench/capture_overhead.py [--rounds 3] [--concurrency 8] [--max-tokens 64]
        [--eager] [--dtype float32] [--out BENCHMARKS.md]

Prints generated tokens/s for both and the ratio on/off (goal >= 0.97). On a GPU pod, pass
`--hidden 2048 --layers 28 --intermediate 6144` for a >= 1B model (CUDA graphs are on by default
in vLLM's compiled mode there).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.server.process import ServerProcess

PROMPT = ("A tour guide explains the history of the castle, built in the twelfth century, to "
          "visitors who walk along the stone walls, past the cathedral and the market square. ")


def run_load(base: str, concurrency: int, max_tokens: int) -> float:
    """Generated tokens per second for `concurrency` simultaneous completions."""
    model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": PROMPT * 2, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True}

    def one(_: int) -> int:
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(concurrency)))
    return tokens / (time.perf_counter() - t0)


def measure(model: Path, capture: bool, args: argparse.Namespace, log_dir: Path) -> list[float]:
    extra = ["--dtype", args.dtype, "--max-model-len", "1024", "--max-num-seqs", str(args.concurrency)]
    if args.eager:
        extra.append("--enforce-eager")
    if not capture:
        extra.append("--no-capture")
    name = "on" if capture else "off"
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "ACTPRUNE_SNAPSHOT_INTERVAL": "0"}
    with ServerProcess(model, extra, env=env, log_path=log_dir / f"server-{name}.log") as srv:
        run_load(srv.base_url, args.concurrency, 8)  # warm-up
        rates = []
        for r in range(args.rounds):
            rates.append(run_load(srv.base_url, args.concurrency, args.max_tokens))
            print(f"  capture {name:3s} round {r + 1}: {rates[-1]:7.1f} tok/s", flush=True)
        if capture:
            st = httpx.get(f"{srv.base_url}/activations/status", timeout=30).json()
            assert st["tokens_decode"] > 0, "capture counted nothing"
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager instead of compiled mode")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="actprune-overhead-"))
    model = work / f"qwen3-{args.hidden}x{args.layers}"
    if not (model / "config.json").exists():
        build_checkpoint(model, arch="qwen3", dtype=args.dtype, hidden_size=args.hidden,
                         num_hidden_layers=args.layers, intermediate_size=args.intermediate,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=4, head_dim=64)
    cfg = json.loads((model / "config.json").read_text())
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    params = n * (3 * h * i + 2 * h * h + 2 * h * 4 * 64) + 2 * cfg["vocab_size"] * h
    print(f"model: Qwen3-shaped, {params / 1e6:.0f}M parameters, {args.dtype}, "
          f"{'eager' if args.eager else 'compiled'}; load avg {os.getloadavg()[0]:.1f}")
    on = measure(model, True, args, work)
    off = measure(model, False, args, work)
    ratio = statistics.median(on) / statistics.median(off)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "params_m": round(params / 1e6), "dtype": args.dtype, "mode": "eager" if args.eager else "compiled",
        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "tok_s_capture_on": [round(x, 1) for x in on], "tok_s_capture_off": [round(x, 1) for x in off],
        "ratio_on_off_median": round(ratio, 3), "load_avg_end": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
