"""REAP's statistic (Cerebras, "REAP: Router-weighted Expert Activation Pruning"): per routed
expert e, the sum over the tokens whose top-k holds e of ``g_e(x) · ‖f_e(x)‖₂`` — the routing
weight the expert's output is scaled by times the norm of that output. Divided by the expert's
``topk_count`` it is REAP's saliency: the mean size of what e adds to the layer's output when it
is picked.

Only the offline recorder can compute it: vLLM runs the experts as one fused kernel whose
per-expert outputs never leave it (docs/moe.md). The routing is re-derived from the router
logits exactly as :func:`~actprune.core.tensor.accumulate.update_router` does (float64 softmax,
top-k of the logits, renormalised when ``norm_topk_prob``), so the weights are those of the
``weight_sum`` beside it; each expert's output is recomputed for its tokens (one more pass over
the routed experts per batch) in at least float32, its norm summed in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .accumulate import route

__all__ = ["ExpertFn", "update_reap"]

# (expert e, its tokens' inputs (n, H)) -> that expert's outputs (n, H), before routing weights
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def update_reap(
    reap_sum: torch.Tensor,
    x: torch.Tensor,
    logits: torch.Tensor,
    valid: torch.Tensor,
    top_k: int,
    renormalize: bool,
    expert: ExpertFn,
) -> None:
    """Add Σ routing weight × ‖expert output‖ per expert into ``reap_sum`` (E,) float64.
    x: (T, H) the experts' input; logits: (T, E) the router's; valid: (T,) bool."""
    _, top_i, w = route(logits, valid, top_k, renormalize)  # (T, k) expert ids, (T, k) float64 weights
    picked = top_i.masked_fill(~valid.view(-1, 1), -1)  # (T, k): -1 for padding rows
    for e in torch.unique(picked[picked >= 0]).tolist():
        rows, slot = (picked == e).nonzero(as_tuple=True)  # (n,), (n,): a token picks e at most once
        out = expert(e, x[rows])  # (n, H)
        norms = torch.linalg.vector_norm(out.double(), dim=-1)  # (n,)
        reap_sum[e] += (w[rows, slot] * norms).sum()
