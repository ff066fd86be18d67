"""Streaming accumulators, as pure torch functions that update preallocated buffers in place.

The same functions run inside vLLM (through the custom ops in :mod:`actprune.server.ops`) and
in the offline recorder (plain transformers hooks), so both produce identical stats files.

A *channel group* is the state of one set of channels (MLP neurons at the input of
``down_proj``, or attention channels at the input of ``o_proj``):

    count    ()   float64   tokens seen
    mean     (C,) float64   running mean          } merged with Chan's formula: no
    m2       (C,) float64   sum of sq. deviations } catastrophic cancellation at 1e8+ tokens
    sum      (C,) float64
    sum_sq   (C,) float64
    sum_abs  (C,) float64
    max_abs  (C,) float32
    near_zero(C,) float64   tokens with |x| <= threshold

Nothing here branches on tensor values in Python, so the updates are safe inside torch.compile
graphs and CUDA-graph replays: rows are masked with ``valid`` instead of being sliced away.
"""

from __future__ import annotations

import torch

from actprune.client.wire.stats import GROUP_FIELDS

__all__ = [
    "GROUP_FIELDS",
    "new_block_state",
    "new_channel_state",
    "update_block",
    "reset_state",
    "update_channels",
]


def new_channel_state(width: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    f64 = dict(dtype=torch.float64, device=device)
    return {
        "count": torch.zeros((), **f64),
        "mean": torch.zeros(width, **f64),
        "m2": torch.zeros(width, **f64),
        "sum": torch.zeros(width, **f64),
        "sum_sq": torch.zeros(width, **f64),
        "sum_abs": torch.zeros(width, **f64),
        "max_abs": torch.zeros(width, dtype=torch.float32, device=device),
        "near_zero": torch.zeros(width, **f64),
    }


def new_block_state(device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {
        "cos_sum": torch.zeros((), dtype=torch.float64, device=device),
        "count": torch.zeros((), dtype=torch.float64, device=device),
    }


def update_channels(
    state: dict[str, torch.Tensor], x: torch.Tensor, valid: torch.Tensor, threshold: float
) -> None:
    """Fold a batch into ``state``. x: (T, C) any float dtype; valid: (T,) bool."""
    xf = x.float()  # (T, C)
    v = valid.view(-1, 1)  # (T, 1)
    # torch.where, not multiplication: vLLM's profile run pushes NaN rows through the model
    # and NaN * 0 is still NaN.
    xm = torch.where(v, xf, 0.0)  # (T, C)
    n_b = valid.sum(dtype=torch.float64)  # ()
    s = xm.sum(0, dtype=torch.float64)  # (C,)
    mean_b = s / n_b.clamp(min=1.0)
    d = torch.where(v, xf - mean_b.float(), 0.0)
    m2_b = (d * d).sum(0, dtype=torch.float64)
    absx = xm.abs()

    n_a = state["count"]
    n = n_a + n_b
    delta = mean_b - state["mean"]
    inv_n = 1.0 / n.clamp(min=1.0)
    state["mean"].add_(delta * (n_b * inv_n))
    state["m2"].add_(m2_b + delta * delta * (n_a * n_b * inv_n))
    state["count"].copy_(n)
    state["sum"].add_(s)
    state["sum_sq"].add_((xm * xm).sum(0, dtype=torch.float64))
    state["sum_abs"].add_(absx.sum(0, dtype=torch.float64))
    state["max_abs"].copy_(torch.maximum(state["max_abs"], absx.amax(0)))
    near = torch.logical_and(v, xf.abs() <= threshold)
    state["near_zero"].add_(near.sum(0, dtype=torch.float64))


def update_block(
    state: dict[str, torch.Tensor], h_in: torch.Tensor, h_out: torch.Tensor, valid: torch.Tensor
) -> None:
    """Add the per-token cosine similarity between the residual stream entering (h_in) and
    leaving (h_out) a decoder layer. h_in, h_out: (T, H); valid: (T,) bool."""
    a = h_in.float()
    b = h_out.float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)  # (T,)
    cos = torch.where(valid, cos, 0.0)
    state["cos_sum"].add_(cos.sum(dtype=torch.float64))
    state["count"].add_(valid.sum(dtype=torch.float64))


def reset_state(state: dict[str, torch.Tensor]) -> None:
    for t in state.values():
        t.zero_()
