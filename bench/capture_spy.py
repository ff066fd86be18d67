"""The capture's share of a real vLLM worker's forward steps, sampled with py-spy.

Starts ``actprune serve`` on the benchmark model of ``capture_overhead.py`` (compiled mode),
sends greedy completions B at a time, records the ``VLLM::Worker`` process with ``py-spy
record`` and prints, of the samples inside ``execute_model`` (the forward steps; idle polling
left out), the share under each capture frame. py-spy: ``.venv/bin/python -m pip install
py-spy``. To profile an older version, put its code first on ``PYTHONPATH`` (the server
inherits it).

    .venv/bin/python bench/capture_spy.py --workdir /tmp/overhead [--batches 1 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_overhead import build_model, prompt_ids  # noqa: E402
from machine import worker_pid  # noqa: E402

CAPTURE_FRAMES = ("stash_layer", "end_step", "_fold_rows", "_fold_math", "_tap_hook", "valid_rows",
                  "stash_channels", "stash_stream", "fold_step", "_fold_step_math",  # before 2026-12-02
                  "observe_channels", "observe_block", "observe_router", "_on_step", "_after_step")


def shares(raw: Path) -> tuple[int, Counter, Counter]:
    """(samples inside execute_model, frame -> samples under it, "capture" -> under any, and
    the innermost frame -> samples: where a worker with capture off spends the same step)."""
    total, under, leaf = 0, Counter(), Counter()
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = [f.split(" (")[0] for f in stack.split(";")]
        if "execute_model" not in " ".join(frames):
            continue
        total += int(n)
        leaf[frames[-1]] += int(n)
        hit = {f for f in frames if f in CAPTURE_FRAMES}
        for f in hit:
            under[f] += int(n)
        if hit:
            under["capture"] += int(n)
    return total, under, leaf


def main() -> int:
    from actprune.server.process import ServerProcess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/actprune-overhead"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--off", action="store_true", help="the same server with --no-capture: the baseline's "
                    "samples and innermost frames, to compare with capture on")
    ap.add_argument("--top", type=int, default=0, help="also print the N innermost frames with most samples")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.hidden, args.layers, args.intermediate, args.dtype, args.experts = 768, 24, 2048, "float32", 0
    model, _, vocab = build_model(args)
    spy = str(Path(sys.executable).parent / "py-spy")
    server_args = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "32",
                   "--max-num-batched-tokens", "2048", *(["--no-capture", "--no-enable-prefix-caching"] if args.off else [])]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "ACTPRUNE_SNAPSHOT_INTERVAL": "0",
           "ACTPRUNE_SNAPSHOT_DIR": str(args.workdir / "snapshots-spy")}
    with ServerProcess(model, server_args, env=env, log_path=args.workdir / "server-spy.log",
                       startup_timeout=1800) as srv:
        worker = worker_pid(srv)
        body = {"model": srv.model, "max_tokens": 100, "temperature": 0.0, "ignore_eos": True}

        def one(i: int) -> None:
            httpx.post(f"{srv.base_url}/v1/completions", json={**body, "prompt": prompt_ids(16, i, vocab)},
                       timeout=600).raise_for_status()

        for b in args.batches:
            with cf.ThreadPoolExecutor(b) as pool:
                list(pool.map(one, range(b)))  # warm-up
                raw = args.workdir / f"spy-b{b}{'-off' if args.off else ''}.txt"
                rec = subprocess.Popen([spy, "record", "-p", worker, "-d", str(args.seconds), "-r", "50",
                                        "-f", "raw", "-o", str(raw), "--nonblocking"])
                end, requests = time.time() + args.seconds + 2, 0
                while time.time() < end:
                    list(pool.map(one, range(b)))
                    requests += b
                rec.wait()
            total, under, leaf = shares(raw)
            print(f"B={b}{' (capture off)' if args.off else ''}: {total} samples in execute_model "
                  f"({total / args.seconds:.1f}/s); " + ", ".join(
                f"{k} {100 * v / total:.1f} %" for k, v in under.most_common()), flush=True)
            per = 1000 / (requests * body["max_tokens"])  # samples per 1000 generated tokens
            for frame, n in leaf.most_common(args.top):
                print(f"    {100 * n / total:5.1f} %  {n * per:6.1f} per 1k tokens  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
