"""The GPU stash kernel writes what torch's copies write, bit for bit (actprune.server.stash_kernel).

No GPU here: the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, on CPU tensors).
The variable must be set before Triton is first imported, so the checks run in a fresh Python
(``_CHECKS`` below) and this test reads its verdict. Two levels:

* the kernel alone against ``dst.copy_(x.float())`` / ``h.float() + r.float()``: 0, 1 or 2 taps,
  with and without a residual, bfloat16 and float32, sources with row strides of a wider tensor,
  destinations inside the step buffers (and nothing outside them written);
* ``stash_layer`` / ``end_step`` with the kernel forced on (``_stash_kernel_for``, CUDA-only in
  service) against the same steps through the torch copies: every accumulator equal, bit for bit,
  on steps of 1 and 6 rows, a router among the taps of an MoE-like layer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_CHECKS = r'''
import torch
from actprune.core.tensor.accumulate import new_packed_channels, new_packed_routers
from actprune.server import ops, stash_kernel as k

torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float32):
    for n_taps in (0, 1, 2):
        for has_r in (False, True):
            t, h_width, widths = 5, 40, [1500, 7]
            chan, stream = torch.zeros(9, 3000), torch.zeros(9, 3, h_width)
            wide = [torch.randn(t, c + 11, dtype=dtype) for c in widths]
            srcs = [w[:, 3:3 + c] for w, c in zip(wide, widths)][:n_taps]  # row stride c + 11
            offs = [0, 2000]
            dsts = [chan[2:2 + t, o:o + x.shape[1]] for o, x in zip(offs, srcs)]
            h = torch.randn(t, h_width, dtype=dtype)
            r = torch.randn(t, h_width, dtype=dtype) if has_r else None
            dst = stream[2:2 + t, 1]
            assert k.usable(srcs, dsts, h, r, dst)
            k.stash_rows(srcs, dsts, h, r, dst)
            case = (dtype, n_taps, has_r)
            for d, x in zip(dsts, srcs):
                assert torch.equal(d, x.float()), case
            assert torch.equal(dst, h.float() + r.float() if has_r else h.float()), case
            untouched = torch.ones_like(chan, dtype=torch.bool)
            for o, x in zip(offs, srcs):
                untouched[2:2 + t, o:o + x.shape[1]] = False
            assert not chan[untouched].any(), case
            stream[2:2 + t, 1] = 0
            assert not stream.any(), case
assert not k.usable([torch.zeros(2, 3)] * 3, [torch.zeros(2, 3)] * 3, torch.zeros(2, 4), None, torch.zeros(2, 4))
assert not k.usable([torch.zeros(3, 2).t()], [torch.zeros(2, 3)], torch.zeros(2, 4), None, torch.zeros(2, 4))

def run(kernel):
    ops._stash_kernel_for = (lambda hidden: k) if kernel else (lambda hidden: None)
    fields, counts, gid, _ = new_packed_channels([6, 4, 5])
    router_fields, _ = new_packed_routers([5])
    bufs = ops.StepBuffers.new(fields, counts, gid, torch.tensor(1.0), torch.tensor(0.3), rows=24, long_rows=0,
                               n_layers=2, hidden=8, router_fields=router_fields, top_k=2, renormalize=True)
    g = torch.Generator().manual_seed(1)
    for t in (1, 6, 1, 6, 6):
        x = [torch.randn(t, w, generator=g).bfloat16() for w in (6, 4, 5)]
        hs = [torch.randn(t, 8, generator=g).bfloat16() for _ in range(5)]
        torch.ops.actprune.stash_layer([], None, hs[0], None, bufs.phase, [], [], 0, -1, 2, True)
        torch.ops.actprune.stash_layer(x[:2], None, hs[1], hs[2], bufs.phase, [0, 6], [0, 1], 1, -1, 2, True)
        torch.ops.actprune.stash_layer(x[2:], x[0][:, :5], hs[3], hs[4], bufs.phase, [10], [2], 2, 0, 2, True)
        torch.ops.actprune.end_step(hs[3], bufs.phase)
    bufs.flush()
    return [f.clone() for f in (*fields, counts, *router_fields, bufs.blocks)]

for a, b in zip(run(True), run(False)):
    assert torch.equal(a, b), (a, b)
assert float(run(True)[7][0]) == 20.0  # counts: every step folded
print("stash kernel checks passed")
'''


def test_stash_kernel_writes_what_torch_copies_write():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "stash kernel checks passed" in proc.stdout
