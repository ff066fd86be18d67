"""Helpers for pruning tests: stats recorded on tiny checkpoints in transformers, hand-made
stats, and the masked reference (the original model with pruned units' weights set to zero)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from actprune.core.archs import REGISTRY
from actprune.core.tensor.accumulate import (
    export_state,
    new_block_state,
    new_channel_state,
    update_block,
    update_channels,
)
from actprune.core.tensor.hf_model import HfModel
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.plan import Plan
from actprune.core.wire.stats import Stats, config_hash

TEXTS = [
    "The old harbour town lies at the mouth of the river.",
    "Pruning removes neurons, attention heads or whole layers.",
    "What is the capital of France? Paris is the capital.",
]
# Shapes with room for GQA choices: 8 query heads in 4 KV groups, 4 layers.
SHAPE = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96)


SENTENCES = [
    "The old harbour town lies at the mouth of the river.",
    "Visitors walk along the stone walls, past the cathedral and the market square.",
    "Pruning removes neurons, attention heads or whole layers to make a model smaller.",
    "The museum opens at nine in the morning and closes at six in the evening.",
    "Rivers, mountains and forests cover most of the northern province.",
    "Please book a table for two at the restaurant near the bridge.",
]


def write_calibration_text(path: Path, lines: int) -> Path:
    """A small calibration .txt for the CLI passes (refit, sensitivity): ``lines`` documents."""
    path.write_text("\n\n".join(f"The museum number {k} opens at nine and the harbour town lies by the river."
                                 for k in range(lines)))
    return path


def load(model_dir: Path, **kw) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()


def input_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(TEXTS, return_tensors="pt", padding=True)["input_ids"]  # (B, T)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


def record_stats(model_dir: Path, threshold: float = 0.02) -> Stats:
    """Run the model on TEXTS in transformers and fill a Stats, as the server would."""
    model = load(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    hooks, tensors = HookRegistry(), {}
    layers = model.model.layers
    states = {}
    for i, layer in enumerate(layers):
        states[i] = {
            "mlp": new_channel_state(layer.mlp.down_proj.in_features),
            "attn": new_channel_state(layer.self_attn.o_proj.in_features),
            "block": new_block_state(),
            "in": None,
        }

        def channel(kind, i=i):
            def fn(_module, args):
                x = args[0].reshape(-1, args[0].shape[-1])  # (B*T, C)
                update_channels(states[i][kind], x, torch.ones(x.shape[0], dtype=torch.bool), threshold)

            return fn

        def block_in(_m, args, kwargs, i=i):
            states[i]["in"] = (args[0] if args else kwargs["hidden_states"]).reshape(-1, cfg["hidden_size"])

        def block_out(_m, _args, _kwargs, out, i=i):
            h = (out[0] if isinstance(out, tuple) else out).reshape(-1, cfg["hidden_size"])  # (B*T, H)
            update_block(states[i]["block"], states[i]["in"], h, torch.ones(h.shape[0], dtype=torch.bool))

        hooks.pre_hook("stats", layer.mlp.down_proj, channel("mlp"))
        hooks.pre_hook("stats", layer.self_attn.o_proj, channel("attn"))
        hooks.pre_hook("stats", layer, block_in, with_kwargs=True)
        hooks.post_hook("stats", layer, block_out, with_kwargs=True)
    ids = input_ids(model_dir)
    logits(model, ids)
    hooks.remove_all()
    for i, st in states.items():
        for kind in ("mlp", "attn", "block"):
            for f, a in export_state(st[kind]).items():
                tensors[f"layers.{i}.{kind}.{f}"] = a
    meta = {
        "format": "actprune.stats", "format_version": "1", "model": str(model_dir),
        "architecture": cfg["architectures"][0], "config_hash": config_hash(cfg),
        "tensor_parallel_size": 1, "near_zero_threshold": threshold,
        "tokens_prefill": int(ids.numel()), "tokens_decode": 0,
    }
    stats = Stats(tensors=tensors, meta=meta)
    stats.validate()
    return stats


def masked_reference(model_dir: Path, plan: Plan, stats: Stats | None = None) -> torch.nn.Module:
    """The original model with every unit the plan removes zeroed (a dropped layer: its o_proj
    and down_proj zeroed, so it passes the residual through). With ``stats``, FLAP's constant
    ``W[:, removed] @ mean[removed]`` is added to the outputs of down_proj / o_proj."""
    model = load(model_dir)
    d = plan.source.head_dim
    hooks = HookRegistry()
    with torch.no_grad():
        for lp in plan.layers:
            layer = model.model.layers[lp.index]
            down, o = layer.mlp.down_proj, layer.self_attn.o_proj
            if lp.drop:
                down.weight.zero_()
                o.weight.zero_()
                continue
            gone_n = sorted(set(range(down.in_features)) - set(lp.mlp_keep))
            gone_h = sorted(set(range(o.in_features // d)) - set(lp.heads_keep))
            gone_c = [h * d + j for h in gone_h for j in range(d)]
            for lin, gone, kind in ((down, gone_n, "mlp"), (o, gone_c, "attn")):
                if stats is not None and gone:
                    mean = torch.from_numpy(stats.tensors[f"layers.{lp.index}.{kind}.mean"][gone])
                    extra = (lin.weight[:, gone].double() @ mean.double()).float()  # (hidden,)
                    hooks.post_hook("flap", lin, lambda _m, _a, out, extra=extra: out + extra)
                lin.weight[:, gone] = 0.0
    model._test_hooks = hooks  # keep the registry alive with the model
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())





def stats_from_samples(config: dict, samples, blocks: list[float] | None = None, threshold: float = 0.05) -> Stats:
    """A Stats whose groups summarise ``samples(layer, kind, width) -> (N, C)`` arrays exactly;
    ``blocks[i]`` is layer i's mean cosine. Lets planner tests set scores by hand, no model."""
    n_layers = config["num_hidden_layers"]
    q_width = config["num_attention_heads"] * config["head_dim"]
    tensors: dict[str, np.ndarray] = {}
    for i in range(n_layers):
        for kind, width in (("mlp", config["intermediate_size"]), ("attn", q_width)):
            x = np.asarray(samples(i, kind, width), dtype=np.float64)  # (N, C)
            mean = x.mean(0)
            group = {
                "count": np.asarray(float(x.shape[0])), "mean": mean, "m2": ((x - mean) ** 2).sum(0),
                "sum": x.sum(0), "sum_sq": (x * x).sum(0), "sum_abs": np.abs(x).sum(0),
                "max_abs": np.abs(x).max(0).astype(np.float32), "near_zero": (np.abs(x) <= threshold).sum(0) * 1.0,
            }
            tensors.update({f"layers.{i}.{kind}.{f}": np.asarray(v) for f, v in group.items()})
        cos = 0.5 if blocks is None else blocks[i]
        tensors[f"layers.{i}.block.cos_sum"] = np.asarray(cos * 10.0)
        tensors[f"layers.{i}.block.count"] = np.asarray(10.0)
    meta = {
        "format": "actprune.stats", "format_version": "1", "model": "synthetic",
        "architecture": config["architectures"][0], "config_hash": config_hash(config),
        "tensor_parallel_size": 1, "near_zero_threshold": threshold, "tokens_prefill": 1000, "tokens_decode": 24,
    }
    stats = Stats(tensors=tensors, meta=meta)
    stats.validate()
    return stats


# The tiny test models share the Llama module layout: the registry's view walks any of their layers.
VIEW = HfModel(None, REGISTRY["LlamaForCausalLM"])


def finetune_cfg(model, data, out, **kw):
    """A FinetuneConfig for the tiny checkpoints and the ``pr_jsonl`` records: small rows and
    batches, a quarter held out, 6 steps, no progress bars; ``kw`` wins."""
    from actprune.pruning.recover.finetune import FinetuneConfig

    base = dict(model=str(model), data=str(data), output=str(out), text_field="response",
                lr=3e-3, warmup_steps=2, batch_size=2, seq_len=32, val_fraction=0.25,
                max_steps=6, progress=False)
    return FinetuneConfig(**{**base, **kw})
