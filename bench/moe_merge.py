"""Tried and not adopted: merging removed experts into kept ones instead of dropping them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_merge.py

M-SMoE / HC-SMoE style: each removed expert joins the kept expert it is most similar to (cosine
of the flattened expert weights, or of the router rows), and each group becomes one expert whose
weights are the members' average weighted by their router frequency (``topk_count`` on the
calibration tokens); the removed experts leave routing as when dropping (router logits at −inf).
Compared with dropping on a tiny random Qwen3-MoE (sparse, dense, sparse; 8 experts of 64,
top-2) and on "upcycled" variants (every expert = expert 0 plus Gaussian noise of the given
scale, so that similar experts exist): KL(original ‖ pruned) per token and the MSE of the logits
on held-out Wikipedia, calibration on ``wiki:calibration``; experts kept by router-weighted
frequency, the same set for both. Results in docs/moe.md ("Tried"): merging was worse than
dropping in every row, so actprune does not ship it. Tiny models with random weights say
little about trained experts; this script is where a pod run on a real MoE would start.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from actprune.core.config import read_config
from actprune.core.planning.planner import make_plan
from actprune.core.wire.plan import Plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import Stats
from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
from actprune.pruning.data import tokenize, wiki_texts
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.pruning.record import budget, record


def _pruned(model: torch.nn.Module, plan: Plan, stats: Stats | None, sim: str = "weights") -> torch.nn.Module:
    """``model`` with each sparse layer's removed experts masked out of routing; with ``stats``,
    merged first into their most similar kept expert (frequency-weighted average)."""
    m = copy.deepcopy(model)
    for lp in plan.layers:
        if lp.experts_keep is None:
            continue
        mlp = m.model.layers[lp.index].mlp
        e_all = mlp.gate.weight.shape[0]
        gone = [e for e in range(e_all) if e not in lp.experts_keep]
        if stats is not None:
            with torch.no_grad():
                _merge(mlp, lp.experts_keep, gone, stats.router(lp.index)["topk_count"], sim)
        mask = torch.zeros(e_all)  # (E,)
        mask[gone] = float("-inf")
        r = mlp.gate

        def forward(h, r=r, mask=mask):
            logits = torch.nn.functional.linear(h.reshape(-1, r.hidden_dim), r.weight) + mask  # (T, E)
            top, idx = torch.topk(torch.softmax(logits, dtype=torch.float, dim=-1), r.top_k, dim=-1)
            if r.norm_topk_prob:
                top = top / top.sum(-1, keepdim=True)
            return logits, top.to(logits.dtype), idx

        r.forward = forward
    return m


def _merge(mlp: torch.nn.Module, keep: list[int], gone: list[int], freq: np.ndarray, sim: str) -> None:
    ex = mlp.experts
    flat = torch.cat([ex.gate_up_proj.flatten(1), ex.down_proj.flatten(1)], 1)  # (E, 3·I·H)
    v = torch.nn.functional.normalize(flat if sim == "weights" else mlp.gate.weight, dim=1)
    groups = {k: [k] for k in keep}
    for r in gone:
        groups[max(keep, key=lambda k: float(v[r] @ v[k]))].append(r)
    for k, members in groups.items():
        w = torch.tensor([max(float(freq[e]), 1e-9) for e in members])
        w = w / w.sum()  # (n,)
        ex.gate_up_proj[k] = torch.einsum("n,nij->ij", w, ex.gate_up_proj[members])
        ex.down_proj[k] = torch.einsum("n,nij->ij", w, ex.down_proj[members])


@torch.no_grad()
def _kl_mse(orig: torch.nn.Module, pruned: torch.nn.Module, rows: list[list[int]]) -> tuple[float, float]:
    kls, mses = [], []
    for ids in rows:
        a = orig(input_ids=torch.tensor([ids])).logits.double()  # (1, T, V)
        b = pruned(input_ids=torch.tensor([ids])).logits.double()
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kls.append(float((la.exp() * (la - lb)).sum(-1).mean()))
        mses.append(float(((a - b) ** 2).mean()))
    return float(np.mean(kls)), float(np.mean(mses))


@torch.no_grad()
def _upcycle(model: torch.nn.Module, noise: float) -> None:
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        ex = getattr(layer.mlp, "experts", None)
        for p in (ex.gate_up_proj, ex.down_proj) if ex is not None else ():
            base = p[0].clone()
            p.copy_(base + noise * base.std() * torch.randn(p.shape, generator=g))


def main() -> None:
    torch.set_num_threads(1)
    root = Path("/tmp/actprune-moe-merge")
    ckpt = root / "moe"
    if not (ckpt / "config.json").exists():
        build_checkpoint(ckpt, arch="qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])
    tok, cfg = load_tokenizer(ckpt), read_config(ckpt)
    calib = budget(tokenize(tok, wiki_texts("calibration")[:64]), 128, 4096)
    held = budget(tokenize(tok, wiki_texts("heldout")[:32]), 128, 2048)
    print("| experts | removed | drop KL / MSE | merge (weights) KL / MSE | merge (router) KL / MSE |")
    print("|---|---|---|---|---|")
    for kind, noise in (("random", None), ("upcycled, noise 0.5", 0.5), ("upcycled, noise 1.0", 1.0)):
        model = load_causal_lm(ckpt, dtype=torch.float32)
        if noise is not None:
            _upcycle(model, noise)
        stats = record(model, calib, model_name="moe", config=cfg, progress=False)
        for ratio in (0.25, 0.5):
            plan = make_plan(stats, cfg, PlanRequest(expert_ratio=ratio, strategy="magnitude"), None)
            cells = [_kl_mse(model, _pruned(model, plan, s, sim), held)
                     for s, sim in ((None, ""), (stats, "weights"), (stats, "router"))]
            print(f"| {kind} | {ratio:.0%} | " + " | ".join(f"{kl:.4f} / {mse:.4f}" for kl, mse in cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
