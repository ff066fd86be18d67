"""Independent float64 reference: Hugging Face transformers on the same tokens as the server.

Nothing here uses actprune's accumulators: activations are collected whole and reduced with
numpy, so a bug in the streaming maths cannot hide in both sides of a comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def reference_activations(model_dir: Path, sequences: list[list[int]]) -> dict[str, np.ndarray]:
    """Per layer i: 'mlp.i' (N, I) down_proj inputs, 'attn.i' (N, H*D) o_proj inputs,
    'cos.i' (N,) cosine(residual in, residual out); N = total tokens, float64. An MoE layer
    (Qwen3-MoE's sparse block: a router ``mlp.gate``, no ``mlp.down_proj``) gives
    'router.i' (N, E), its router logits, instead of 'mlp.i'."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    # transformers' default experts kernel (grouped_mm) has no float64 version: loop over experts
    moe = {"experts_implementation": "eager"} if cfg.get("num_experts") or cfg.get("num_local_experts") else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64, **moe).eval()
    acts: dict[str, list[np.ndarray]] = {}
    handles = []

    def grab(key):
        def pre(module, args):
            acts.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).detach().numpy())
        return pre

    def grab_logits(key):
        def post(module, args, out):  # transformers' router: (logits, top-k weights, indices)
            acts.setdefault(key, []).append(out[0].reshape(-1, out[0].shape[-1]).detach().numpy())
        return post

    layers = model.model.layers
    entering: dict[int, torch.Tensor] = {}

    def stream_in(i):
        def pre(module, args, kwargs):
            entering[i] = args[0] if args else kwargs["hidden_states"]
        return pre

    def stream_out(i):
        def post(module, args, kwargs, out):
            h_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(entering[i][0], h_out[0], dim=-1)
            acts.setdefault(f"cos.{i}", []).append(cos.numpy())
        return post

    for i, layer in enumerate(layers):
        if hasattr(layer.mlp, "down_proj"):
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(grab(f"mlp.{i}")))
        else:
            handles.append(layer.mlp.gate.register_forward_hook(grab_logits(f"router.{i}")))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(grab(f"attn.{i}")))
        handles.append(layer.register_forward_pre_hook(stream_in(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(stream_out(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for seq in sequences:
                model(torch.tensor([seq]))
    finally:
        for h in handles:
            h.remove()
    return {k: np.concatenate(v) for k, v in acts.items()}


def close(got: np.ndarray, want: np.ndarray, what: str, rtol: float = 1e-4) -> None:
    scale = float(np.max(np.abs(want))) or 1.0  # relative to the statistic's scale in the layer
    err = float(np.max(np.abs(got - want)))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x scale {scale:.3g}"


def assert_stats_match(stats, ref: dict[str, np.ndarray]) -> None:
    """Every channel statistic and block cosine of a dense model's ``stats`` (a Stats) equals
    the reduction of ``ref``'s rows (:func:`reference_activations`, or a subset of its rows)."""
    n_tokens = ref["cos.0"].shape[0]
    for i in stats.layers:
        assert float(stats.tensors[f"layers.{i}.block.count"]) == n_tokens
        close(float(stats.tensors[f"layers.{i}.block.cos_sum"]) / n_tokens,
              np.mean(ref[f"cos.{i}"]), f"layer {i} mean cosine")
        for kind in ("mlp", "attn"):
            x = ref[f"{kind}.{i}"]  # (N, C) float64
            fig = stats.figures(i, kind)
            assert fig.count == n_tokens == x.shape[0]
            assert fig.mean.shape == (x.shape[1],)
            close(fig.mean, x.mean(0), f"layer {i} {kind} mean")
            close(fig.var, x.var(0), f"layer {i} {kind} variance")
            close(fig.mean_abs, np.abs(x).mean(0), f"layer {i} {kind} mean |x|")
            close(fig.max_abs, np.abs(x).max(0), f"layer {i} {kind} max |x|")
            close(fig.rms, np.sqrt((x * x).mean(0)), f"layer {i} {kind} rms")
            thr = float(stats.meta["near_zero_threshold"])
            want_sparse = (np.abs(x) <= thr).mean(0)
            # a value within float32 rounding of the threshold may land on either side
            assert np.max(np.abs(fig.sparsity - want_sparse)) <= 2.0 / n_tokens
