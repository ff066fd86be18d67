"""What vLLM's forward context says about the step being run, for the capture.

Both readers work outside vLLM too (the offline recorder, tests): without a forward context every
row of an armed step is real, and there is no (prefill, decode) split to give.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["step_tokens", "valid_rows"]


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


def step_tokens() -> tuple[int, int] | None:
    """(prefill, decode) real tokens of the current forward step, or None for a dummy run.

    A request whose query in this step is one token long is counted as decode (a one-token
    prompt chunk is indistinguishable here and rare)."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return None
    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # dual-batch overlap: one dict per micro-batch
        md = md[0] if md else None
    if not md:
        return None
    m = next(iter(md.values()))
    qsl = getattr(m, "query_start_loc_cpu", None)
    if qsl is None:
        qsl = getattr(m, "query_start_loc", None)
    if qsl is None:
        n = int(getattr(m, "num_actual_tokens", 0))
        return (n, 0) if n else None
    q = torch.diff(qsl.to("cpu")).tolist()
    q = [x for x in q if x > 0]
    decode = sum(1 for x in q if x == 1)
    return sum(q) - decode, decode
