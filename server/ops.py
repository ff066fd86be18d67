"""torch.library custom ops that fold activations into preallocated accumulators.

Why custom ops: vLLM compiles the decoder stack with torch.compile. A hook that mutates Python
state breaks Dynamo (``TensorifyScalarRestartAnalysis``); an opaque custom op that updates
tensors passed to it, declared in ``mutates_args``, is traced as a single node, kept in order,
never dead-code-eliminated, and runs eagerly at run time. Scalars travel as 0-d tensors: a
Python float argument becomes a symbolic float under vLLM's full-graph AOT compile and fails
with ``TensorifyScalarRestartAnalysis``. Its Python body reads vLLM's forward
context, so the padding rows of a CUDA-graph batch and vLLM's warm-up passes are masked out.

Ops (all return nothing; the accumulators are updated in place):

    actprune::observe_channels(x (T,C), armed (), <8 channel accumulators>, threshold ())
    actprune::stash_stream(hidden (T,H), residual (T,H) | None, scratch (N,H))
    actprune::observe_block(scratch (N,H), hidden (T,H), residual (T,H), armed (), cos_sum, count)
    actprune::observe_router(logits (T,E), armed (), count, topk_count, weight_sum, prob_sum,
                             top_k, renormalize)
"""

from __future__ import annotations

import functools

import torch
from actprune.core.tensor.accumulate import update_block, update_channels, update_router
from torch import Tensor

__all__ = ["valid_rows"]


def valid_rows(num_tokens: int, armed: Tensor) -> Tensor:
    """(T,) bool: the rows of this step that are real tokens of a real request.

    ``armed`` is a device scalar (1 = capturing): it stays 0 through vLLM's profile and
    warm-up passes and while paused. vLLM marks padding rows in ``is_padding``; that tensor is
    a view of a persistent buffer, so a CUDA graph captured with it reads each replay's mask.
    """
    pad = None
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if is_forward_context_available():
            pad = get_forward_context().is_padding
    except ImportError:  # the offline recorder has no forward context
        pass
    on = armed.to(torch.bool)
    if pad is None:
        return on.expand(num_tokens)
    return torch.logical_and(torch.logical_not(pad[:num_tokens]), on)


@functools.cache
def _fused_update_channels():
    """``update_channels`` compiled once per process: its dozen element-wise passes and
    reductions become one fused kernel, which halves the cost per call on CPU (measured
    256 -> 119 us for 8 tokens x 2048 channels). Sizes are dynamic, so one compile serves
    every layer width and batch size."""
    return torch.compile(update_channels, dynamic=True, fullgraph=True)


@torch.library.custom_op(
    "actprune::observe_channels",
    mutates_args=("count", "mean", "m2", "sum_", "sum_sq", "sum_abs", "max_abs", "near_zero"),
)
def observe_channels(
    x: Tensor,
    armed: Tensor,
    count: Tensor,
    mean: Tensor,
    m2: Tensor,
    sum_: Tensor,
    sum_sq: Tensor,
    sum_abs: Tensor,
    max_abs: Tensor,
    near_zero: Tensor,
    threshold: Tensor,
) -> None:
    x2 = x.reshape(-1, x.shape[-1])  # (T, C)
    state = {
        "count": count, "mean": mean, "m2": m2, "sum": sum_, "sum_sq": sum_sq,
        "sum_abs": sum_abs, "max_abs": max_abs, "near_zero": near_zero,
    }
    _fused_update_channels()(state, x2, valid_rows(x2.shape[0], armed), threshold)


@observe_channels.register_fake
def _(x, armed, count, mean, m2, sum_, sum_sq, sum_abs, max_abs, near_zero, threshold):
    return None


@torch.library.custom_op("actprune::stash_stream", mutates_args=("scratch",))
def stash_stream(hidden: Tensor, residual: Tensor | None, scratch: Tensor) -> None:
    # The residual stream entering a vLLM decoder layer is hidden + residual (vLLM defers
    # the residual add into the next fused add-RMSNorm); layer 0 gets residual=None.
    t = hidden.shape[0]
    if t > scratch.shape[0]:
        raise RuntimeError(
            f"actprune: batch of {t} tokens exceeds the capture scratch buffer "
            f"({scratch.shape[0]} rows); this is a bug, please report it"
        )
    if residual is None:
        scratch[:t].copy_(hidden)
    else:
        torch.add(hidden.float(), residual.float(), out=scratch[:t])


@stash_stream.register_fake
def _(hidden, residual, scratch):
    return None


@torch.library.custom_op("actprune::observe_block", mutates_args=("cos_sum", "count"))
def observe_block(
    scratch: Tensor, hidden: Tensor, residual: Tensor, armed: Tensor, cos_sum: Tensor, count: Tensor
) -> None:
    t = hidden.shape[0]
    h_out = hidden.float() + residual.float()  # (T, H)
    state = {"cos_sum": cos_sum, "count": count}
    update_block(state, scratch[:t], h_out, valid_rows(t, armed))


@observe_block.register_fake
def _(scratch, hidden, residual, armed, cos_sum, count):
    return None


@torch.library.custom_op(
    "actprune::observe_router", mutates_args=("count", "topk_count", "weight_sum", "prob_sum"))
def observe_router(
    logits: Tensor, armed: Tensor, count: Tensor, topk_count: Tensor, weight_sum: Tensor,
    prob_sum: Tensor, top_k: int, renormalize: bool,
) -> None:
    # top_k and renormalize are the model's own (config), constants of the traced graph.
    z = logits.reshape(-1, logits.shape[-1])  # (T, E)
    state = {"count": count, "topk_count": topk_count, "weight_sum": weight_sum, "prob_sum": prob_sum}
    update_router(state, z, valid_rows(z.shape[0], armed), top_k, renormalize)


@observe_router.register_fake
def _(logits, armed, count, topk_count, weight_sum, prob_sum, top_k, renormalize):
    return None
