"""Time and size of a full stats snapshot at Qwen3-32B shapes, on the real serialization path.

64 layers, 25600 MLP neurons, 64 heads x 128 attention channels. The accumulators live in a
real :class:`actprune.server.capture.Capture` built over a skeleton of the model on the meta
device (no weights), filled with random values; then the exact steps of
``GET /activations/stats?format=safetensors`` run: worker snapshot -> shard bytes -> assembly
in the API process -> stats-file bytes; and the JSON summary of ``GET /activations/stats``.

    .venv/bin/python bench/stats_snapshot.py [--tp 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from actprune.core.summary import summarize
from actprune.server.adapters import VllmAdapter
from actprune.server.capture import Capture, CaptureOptions, ShardInfo
from actprune.server.snapshot import assemble
from torch import nn

LAYERS, HIDDEN, MLP, HEADS, HEAD_DIM = 64, 5120, 25600, 64, 128


class _Linear(nn.Module):
    """Stands in for vLLM's RowParallelLinear: only the partition attributes are read."""

    def __init__(self, total: int, tp_rank: int, tp: int) -> None:
        super().__init__()
        self.input_size, self.input_size_per_partition, self.tp_rank = total, total // tp, tp_rank


def skeleton(tp_rank: int, tp: int) -> nn.Module:
    model = nn.Module()
    model.model = nn.Module()
    layers = nn.ModuleList()
    for _ in range(LAYERS):
        layer = nn.Module()
        layer.mlp, layer.self_attn = nn.Module(), nn.Module()
        layer.mlp.down_proj = _Linear(MLP, tp_rank, tp)
        layer.self_attn.o_proj = _Linear(HEADS * HEAD_DIM, tp_rank, tp)
        layers.append(layer)
    model.model.layers = layers
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    caps = []
    counts = {}  # ranks of one TP group see the same tokens: equal counts per group
    for r in range(args.tp):
        cap = Capture(skeleton(r, args.tp), VllmAdapter("Qwen3ForCausalLM"), CaptureOptions(max_tokens=8),
                      ShardInfo(tp_rank=r, tp_size=args.tp), torch.device("cpu"), HIDDEN)
        for name, st in cap.groups.items():
            for t in st.values():
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * 1000)
            st["count"].copy_(counts.setdefault(name, st["count"].clone()))
        caps.append(cap)
    meta = {"model": "Qwen/Qwen3-32B", "architecture": "Qwen3ForCausalLM", "config_hash": "bench",
            "near_zero_threshold": 1e-3, "head_dim": HEAD_DIM}
    times_file, times_json = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        shards = [c.snapshot() for c in caps]  # worker side
        stats = assemble(shards, meta)  # API process
        body = stats.to_bytes()
        times_file.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        summary = summarize(stats, k=10, head_dim=HEAD_DIM)
        text = summary.model_dump_json()
        times_json.append(time.perf_counter() - t0)
    print(json.dumps({
        "tp": args.tp,
        "file_seconds_median": round(statistics.median(times_file), 3),
        "file_mb": round(len(body) / 2**20, 1),
        "json_summary_seconds_median": round(statistics.median(times_json), 3),
        "json_summary_kb": round(len(text) / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
