"""One GPU kernel for a layer's stash: its taps and the residual stream, copied in one launch.

Why: in a CUDA-graph decode step, time goes to kernels, not bytes. Done with torch, a layer's
stash is one copy per tap (``_foreach_copy_`` takes the fast path only when every destination
is contiguous, which rows of the (N, ΣC) step buffer are not once T > 1), and vLLM's stream,
hidden + residual in float32, is three more (two casts and an add): 4 to 5 kernels a layer,
~2-3 µs each however few the bytes. On a Qwen3-1.7B shape under CUDA graphs on an H200 that
was 240-450 µs a step at batch 8-32, 4-8 % of the step (BENCHMARKS.md, issue 16, GPU). This
kernel does the same writes, bit for bit, in one launch a layer.

Program (row, column block): row ``row`` of up to two taps (a channel tap and another channel
tap or an MoE layer's router logits) and of the stream, ``BLOCK`` columns of each:

    taps  x_k (T, C_k) any float dtype  ->  d_k (T, C_k) float32 views of the step buffers
    stream hidden (T, H) [+ residual (T, H)], summed in float32  ->  s (T, H) float32

``float32(h) + float32(r)`` rounds once, as ``torch.add(h.float(), r.float())`` does. The
caller passes views (row strides any, column stride 1); ``usable`` says when that holds.
Runs on a CPU under ``TRITON_INTERPRET=1`` (the tests); the capture uses it on CUDA only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # columns per program: 4 KiB of float32 written per tap and row


@triton.jit
def _stash_kernel(x0, d0, c0, sx0, sd0, x1, d1, c1, sx1, sd1, h, r, s, width, sh, sr, ss,
                  N_TAPS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 on large models
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if N_TAPS > 0:
        m = col < c0
        tl.store(d0 + row * sd0 + col, tl.load(x0 + row * sx0 + col, mask=m).to(tl.float32), mask=m)
    if N_TAPS > 1:
        m = col < c1
        tl.store(d1 + row * sd1 + col, tl.load(x1 + row * sx1 + col, mask=m).to(tl.float32), mask=m)
    m = col < width
    v = tl.load(h + row * sh + col, mask=m).to(tl.float32)
    if HAS_RESIDUAL:
        v = v + tl.load(r + row * sr + col, mask=m).to(tl.float32)
    tl.store(s + row * ss + col, v, mask=m)


def usable(srcs: list[Tensor], dsts: list[Tensor], hidden: Tensor, residual: Tensor | None, dst: Tensor) -> bool:
    """The kernel covers this stash: at most two taps, every tensor 2-D (T, ·) with column
    stride 1, destinations float32, sources of one device."""
    if len(srcs) > 2:
        return False
    tensors = [*srcs, *dsts, hidden, dst] + ([residual] if residual is not None else [])
    return (all(t.dim() == 2 and t.stride(1) == 1 for t in tensors)
            and all(d.dtype == torch.float32 for d in (*dsts, dst)))


def stash_rows(srcs: list[Tensor], dsts: list[Tensor], hidden: Tensor, residual: Tensor | None, dst: Tensor) -> None:
    """dsts[k] <- float32(srcs[k]); dst <- float32(hidden) [+ float32(residual)]; one launch.
    All (T, ·); ``usable`` must hold."""
    t, width = hidden.shape
    taps = [(x, d, x.shape[1], x.stride(0), d.stride(0)) for x, d in zip(srcs, dsts, strict=True)]
    blank = (hidden, dst, 0, 0, 0)  # an absent tap: never read (N_TAPS)
    (x0, d0, c0, sx0, sd0), (x1, d1, c1, sx1, sd1) = (taps + [blank, blank])[:2]
    r = residual if residual is not None else hidden
    cols = max(width, c0, c1)
    if t == 0 or cols == 0:
        return
    _stash_kernel[(t, triton.cdiv(cols, BLOCK))](
        x0, d0, c0, sx0, sd0, x1, d1, c1, sx1, sd1, hidden, r, dst, width, hidden.stride(0), r.stride(0),
        dst.stride(0), N_TAPS=len(taps), HAS_RESIDUAL=residual is not None, BLOCK=BLOCK)
