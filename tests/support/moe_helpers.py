"""Tiny Qwen3-MoE helpers shared by the expert-pruning tests: a float64 transformers load, and
the original model with some experts masked out of routing (the reference a sliced model must
equal)."""

from __future__ import annotations

from pathlib import Path

import torch
from actprune.core.wire.plan import Plan
from transformers import AutoModelForCausalLM

__all__ = ["DENSE", "SPARSE", "assert_sliced_equals_masked", "load_f64", "masked_original", "tiny_moe"]

SPARSE, DENSE = [0, 2], [1]


def tiny_moe(root: Path, norm_topk_prob: bool = True, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random MoE (sparse, dense, sparse; 8 experts of 64, top-2) and its stats file
    recorded offline by ``actprune record``'s recorder."""
    from actprune.core.config import read_config
    from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
    from actprune.pruning.data import tokenize
    from actprune.pruning.fixtures.synthetic import build_checkpoint
    from actprune.pruning.record import budget, record
    from pruning_helpers import SENTENCES

    ckpt = build_checkpoint(root / "moe", arch="qwen3_moe", seed=seed, num_hidden_layers=3, mlp_only_layers=DENSE,
                            norm_topk_prob=norm_topk_prob)
    tok = load_tokenizer(ckpt)
    stats = record(load_causal_lm(ckpt), budget(tokenize(tok, SENTENCES), 64, None), model_name="moe",
                   config=read_config(ckpt), progress=False)
    return ckpt, stats.save(root / "stats.safetensors")


def load_f64(ckpt: Path) -> torch.nn.Module:
    """transformers' model in float64. The default experts kernel (grouped_mm) has no float64
    version: loop over experts. An actprune-architecture checkpoint loads through actprune's own
    classes (registered here; the checkpoint's copy of them never runs)."""
    from actprune.core.tensor.modeling import register_classes

    register_classes()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float64, experts_implementation="eager")
    # the actprune architecture builds each layer from its own config copy, made before loading
    # (modeling_actprune.py passes the attention implementation on, not the experts'): set it there
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            experts.config._experts_implementation = "eager"
    return model.eval()


def masked_original(ckpt: Path, plan: Plan) -> torch.nn.Module:
    """The original model in float64, each sparse layer's removed experts' router logits set to
    -inf (transformers' own routing otherwise: float32 softmax, top-k, renormalised if
    ``norm_topk_prob``), a dense layer's removed neurons zeroed in its down_proj."""
    model = load_f64(ckpt)
    for lp in plan.layers:
        if lp.experts_keep is None:
            down = model.model.layers[lp.index].mlp.down_proj
            gone = sorted(set(range(down.in_features)) - set(lp.mlp_keep))
            with torch.no_grad():
                down.weight[:, gone] = 0.0
            continue
        router = model.model.layers[lp.index].mlp.gate
        mask = torch.full((router.num_experts,), float("-inf"), dtype=torch.float64)
        mask[lp.experts_keep] = 0.0

        def forward(h, router=router, mask=mask):
            logits = torch.nn.functional.linear(h.reshape(-1, router.hidden_dim), router.weight) + mask  # (T, E)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            top, idx = torch.topk(probs, router.top_k, dim=-1)  # (T, k)
            if router.norm_topk_prob:
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), idx

        router.forward = forward
    return model


def assert_sliced_equals_masked(ckpt: Path, pruned: torch.nn.Module, plan: Plan) -> float:
    """The sliced model's logits on the shared test texts equal the masked original's (float32
    routing softmax over E' logits vs over E with -inf: rounding of the sums only) and differ
    from the unmasked original's (the removed experts mattered); returns the largest |Δ|."""
    from pruning_helpers import TEXTS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = tok(TEXTS, return_tensors="pt", padding=True)["input_ids"]  # (B, T)
    with torch.no_grad():
        got = pruned(input_ids=ids).logits  # (B, T, V)
        want = masked_original(ckpt, plan)(input_ids=ids).logits
        original = load_f64(ckpt)(input_ids=ids).logits
    worst = float((got - want).abs().max())
    assert worst < 1e-5, worst
    assert float((got - original).abs().max()) > 1e-2
    return worst
