"""Generation latency of ``actprune serve`` while its expensive routes are busy (issue 12, finding 5).

Builds (once, cached in --dir) a small random fp32 Qwen3-shaped model, serves it with
``actprune serve`` (capture on, eager), and times one greedy completion at a time
(``--tokens`` generated tokens each) in interleaved rounds: "quiet" rounds with nothing else
going on, and "loaded" rounds during which one thread polls ``GET /activations/stats`` (the JSON
summary) every second and another asks ``POST /prune/plan`` (the default ``wifv`` strategy, which
reads weight norms) back to back. Interleaving lets the shared machine's own load hit both kinds
of round alike. Prints the median latency of each kind, their ratio (goal ≤ 1.10), the median of
the per-round ratios (each loaded round against the quiet round before it), the work the
background threads got done (and any 429 or error), and the load average before and after.

    .venv/bin/python bench/route_load.py --dir /tmp/actprune-route-load
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from actprune.server.process import ServerProcess

SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=1024)
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "8",
               "--max-num-batched-tokens", "512"]
PROMPT = "The old harbour town lies at the mouth of the river, where fishing boats return at dawn."


def build_model(root: Path) -> Path:
    from actprune.pruning.fixtures.synthetic import build_checkpoint

    model = root / "model"
    if not (model / "config.json").is_file():
        build_checkpoint(model, arch="qwen3", dtype="float32", **SHAPE)
    return model


class Background:
    """The load of a "loaded" round: stats polled every second, plans back to back."""

    def __init__(self, base: str, load: str = "both") -> None:
        self.base, self.load = base, load
        self.stop = threading.Event()
        self.answers: Counter[str] = Counter()  # "stats 200", "plan 200", "plan 429", ...
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Background:
        self.stop.clear()
        targets = {"both": [self._poll, self._plan], "stats": [self._poll], "plans": [self._plan],
                   "snapshots": [self._snapshots]}[self.load]
        self._threads = [threading.Thread(target=t, daemon=True) for t in targets]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join()

    def _poll(self) -> None:
        with httpx.Client(base_url=self.base, timeout=120) as c:
            while not self.stop.is_set():
                started = time.monotonic()
                self.answers[f"stats {c.get('/activations/stats', params={'k': 10}).status_code}"] += 1
                self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def _snapshots(self) -> None:  # for comparison: the snapshot RPC alone, back to back
        with httpx.Client(base_url=self.base, timeout=120) as c:
            while not self.stop.is_set():
                r = c.get("/activations/stats", params={"format": "safetensors"})
                self.answers[f"snapshot {r.status_code}"] += 1

    def _plan(self) -> None:
        with httpx.Client(base_url=self.base, timeout=300) as c:
            while not self.stop.is_set():
                r = c.post("/prune/plan", json={"mlp_ratio": 0.25, "head_ratio": 0.5})
                self.answers[f"plan {r.status_code}"] += 1


def completion_latency(client: httpx.Client, model: str, tokens: int) -> float:
    started = time.perf_counter()
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": tokens,
                                             "temperature": 0.0, "ignore_eos": True})
    r.raise_for_status()
    return time.perf_counter() - started


def run(base: str, rounds: int, per_round: int, tokens: int, load: str = "both") -> dict:
    latencies: dict[str, list[float]] = {"quiet": [], "loaded": []}
    round_medians: dict[str, list[float]] = {"quiet": [], "loaded": []}
    background = Background(base, load)
    with httpx.Client(base_url=base, timeout=300) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        for _ in range(3):  # warm-up; gives the stats tokens, so plans do not answer 409
            completion_latency(c, model, tokens)
        first = c.post("/prune/plan", json={"mlp_ratio": 0.25, "head_ratio": 0.5})  # reads the norms once
        first.raise_for_status()
        for i in range(2 * rounds):
            kind = "loaded" if i % 2 else "quiet"
            if kind == "loaded":
                with background:
                    time.sleep(0.5)  # the first poll and plan are under way
                    timed = [completion_latency(c, model, tokens) for _ in range(per_round)]
            else:
                timed = [completion_latency(c, model, tokens) for _ in range(per_round)]
            latencies[kind] += timed
            round_medians[kind].append(statistics.median(timed))
    quiet, loaded = (statistics.median(latencies[k]) for k in ("quiet", "loaded"))
    # each loaded round against the quiet round just before it: steadier when the machine's own
    # load drifts over minutes
    paired = statistics.median(b / a for a, b in zip(round_medians["quiet"], round_medians["loaded"], strict=True))
    return {"load": load, "requests_per_kind": len(latencies["quiet"]), "tokens_per_request": tokens,
            "median_quiet_s": round(quiet, 4), "median_loaded_s": round(loaded, 4),
            "ratio": round(loaded / quiet, 3), "paired_ratio": round(paired, 3),
            "background_answers": dict(background.answers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/actprune-route-load"))
    ap.add_argument("--rounds", type=int, default=6, help="rounds of each kind, interleaved")
    ap.add_argument("--per-round", type=int, default=5, help="completions timed per round")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per completion")
    ap.add_argument("--load", choices=["both", "stats", "plans", "snapshots"], default="both",
                    help="background of the loaded rounds (both: stats polled and plans back to back, "
                    "the issue's case; snapshots: safetensors downloads back to back)")
    args = ap.parse_args()
    model = build_model(args.dir)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "ACTPRUNE_SNAPSHOT_DIR": str(args.dir / "snapshots"),
           "ACTPRUNE_SNAPSHOT_INTERVAL": "0"}
    load_before = os.getloadavg()
    with ServerProcess(model, SERVER_ARGS, env=env, log_path=args.dir / "server.log") as srv:
        result = run(srv.base_url, args.rounds, args.per_round, args.tokens, args.load)
    result.update(load_average_before=[round(x, 2) for x in load_before],
                  load_average_after=[round(x, 2) for x in os.getloadavg()], cpus=os.cpu_count(),
                  model_shape=SHAPE)
    print(json.dumps(result, indent=1))
    print(f"median latency: quiet {result['median_quiet_s'] * 1000:.0f} ms, loaded "
          f"{result['median_loaded_s'] * 1000:.0f} ms, ratio {result['ratio']:.3f} (paired rounds "
          f"{result['paired_ratio']:.3f}; goal <= 1.10); "
          f"load average {load_before[0]:.2f} before")


if __name__ == "__main__":
    main()
