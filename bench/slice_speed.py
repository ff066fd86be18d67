"""Slice time ÷ plain copy time of the same shards, and peak RSS, on Qwen3-32B layer shapes.

Builds (once, cached in --dir) a random bf16 checkpoint with Qwen3-32B's layer geometry — hidden
5120, MLP 25600, 64 query heads × 128, 8 KV heads — and a few layers, one shard per layer. Then,
each in a fresh subprocess so that peak RSS is the work's own: copy the shards with shutil, and
slice them with a plan removing 30 % of MLP neurons and 25 % of KV groups.

    .venv/bin/python bench/slice_speed.py --layers 4 --dir /tmp/actprune-bench

Goal (issue #4): slice ≤ 1.5× copy time; peak RSS far below the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = dict(hidden_size=5120, intermediate_size=25600, num_attention_heads=64, num_key_value_heads=8,
             head_dim=128, vocab_size=8192)


def build(root: Path, layers: int) -> Path:
    """Random bf16 weights, one shard per layer (plus one for embeddings)."""
    import torch
    from actprune.pruning.fixtures.synthetic import tiny_config
    from safetensors.torch import save_file

    src = root / "src"
    if (src / "model.safetensors.index.json").is_file():
        return src
    src.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config("qwen3", num_hidden_layers=layers, **SHAPE)
    cfg["torch_dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    h, i, q, kv = 5120, 25600, 64 * 128, 8 * 128
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def layer(n: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{n}."
        return {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
            p + "self_attn.q_norm.weight": torch.ones(128, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(128, dtype=torch.bfloat16),
            p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
        }

    def globals_() -> dict[str, torch.Tensor]:
        return {"model.embed_tokens.weight": rnd(8192, h), "lm_head.weight": rnd(8192, h),
                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}

    makers = [globals_] + [lambda n=n: layer(n) for n in range(layers)]
    weight_map = {}
    for k, make in enumerate(makers):  # one shard in memory at a time
        tensors = make()
        name = f"model-{k + 1:05d}-of-{len(makers):05d}.safetensors"
        save_file(tensors, src / name, metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src


def make_plan_file(src: Path, out: Path) -> Path:
    from actprune.core.planning.planner import make_plan
    from actprune.core.wire.plan_request import PlanRequest
    from actprune.core.wire.stats import Stats, config_hash

    cfg = json.loads((src / "config.json").read_text())
    rng = np.random.default_rng(0)
    tensors = {}
    for n in range(cfg["num_hidden_layers"]):
        for kind, c in (("mlp", 25600), ("attn", 64 * 128)):
            mean, var = rng.standard_normal(c), rng.random(c)
            group = {"count": np.asarray(100.0), "mean": mean, "m2": var * 100, "sum": mean * 100,
                     "sum_sq": (var + mean**2) * 100, "sum_abs": np.abs(mean) * 100,
                     "max_abs": (np.abs(mean) + 3).astype(np.float32), "near_zero": rng.random(c) * 100}
            tensors.update({f"layers.{n}.{kind}.{f}": np.asarray(v) for f, v in group.items()})
        tensors[f"layers.{n}.block.cos_sum"] = np.asarray(50.0)
        tensors[f"layers.{n}.block.count"] = np.asarray(100.0)
    meta = {"format": "actprune.stats", "format_version": "1", "model": "bench", "architecture": "Qwen3ForCausalLM",
            "config_hash": config_hash(cfg), "tensor_parallel_size": 1, "near_zero_threshold": 0.01,
            "tokens_prefill": 100, "tokens_decode": 0}
    plan = make_plan(Stats(tensors, meta), cfg, PlanRequest(mlp_ratio=0.3, head_ratio=0.25, strategy="magnitude"), None)
    return plan.save(out)


_COPY = """
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for p in sorted(src.glob("*.safetensors")):
    shutil.copyfile(p, dst / p.name)
"""
_IMPORT = """
from actprune.core.wire.plan import Plan
from actprune.pruning.checkpoint.slicer import slice_checkpoint
"""
_SLICE = """
import sys
from actprune.core.wire.plan import Plan
from actprune.pruning.checkpoint.slicer import slice_checkpoint
slice_checkpoint(sys.argv[1], Plan.load(sys.argv[3]), sys.argv[2], progress=False)
"""


# VmHWM, not getrusage: Linux carries ru_maxrss of the forking parent across exec.
_RSS = "\nprint([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1])\n"


def timed(code: str, *argv: str) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of ``python -c code argv`` in a fresh process."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code + _RSS, *argv], check=True, capture_output=True, text=True)
    dt = time.perf_counter() - t
    return dt, int(done.stdout.split()[-1]) / 2**20  # VmHWM is in KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/actprune-bench"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    src = build(args.dir, args.layers)
    plan = make_plan_file(src, args.dir / "plan.json")
    size = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**30
    for p in src.glob("*.safetensors"):  # warm the page cache so both runs read from memory
        p.read_bytes()
    copies, slices, rss_copy, rss_slice = [], [], 0.0, 0.0
    for _ in range(args.repeats):
        for d in ("copy", "sliced"):
            shutil.rmtree(args.dir / d, ignore_errors=True)
        dt, rss_copy = timed(_COPY, str(src), str(args.dir / "copy"))
        copies.append(dt)
        dt, rss_slice = timed(_SLICE, str(src), str(args.dir / "sliced"), str(plan))
        slices.append(dt)
    startup = min(timed(_IMPORT)[0] for _ in range(2))
    out = sum(p.stat().st_size for p in (args.dir / "sliced").glob("*.safetensors")) / 2**30
    copy_t, slice_t = min(copies), min(slices)
    print(f"machine: {platform.processor() or platform.machine()}, {args.layers} layers, checkpoint {size:.2f} GiB "
          f"-> sliced {out:.2f} GiB")
    print(f"copy {copy_t:.1f} s, slice {slice_t:.1f} s (of which {startup:.1f} s interpreter + torch import), "
          f"ratio {slice_t / copy_t:.2f}x, without the import {(slice_t - startup) / copy_t:.2f}x, "
          f"peak RSS: slice {rss_slice:.2f} GiB, copy {rss_copy:.2f} GiB")


if __name__ == "__main__":
    main()
