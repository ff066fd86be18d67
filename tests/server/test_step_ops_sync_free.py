"""The capture's step path never waits for the device (a CUDA-graph requirement, docs/capture.md).

No GPU here: the ops' Python bodies run on CPU tensors under a dispatch mode that records every
aten call, and none of them may read a value on the host (``.item()``, ``.tolist()``, ``bool()``
of a tensor: ``aten::_local_scalar_dense``) or make a shape from data (``nonzero``,
``masked_select``, boolean indexing). Both paths of every op run: a step short enough for the
step buffers and a longer one, folded tap by tap."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import vllm.forward_context as fc
from actprune.core.tensor.accumulate import new_packed_channels, new_packed_routers
from actprune.server import forward, ops
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_assert_async")


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name.startswith("index.") and any(  # x[mask]: a shape made from data
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
            name = "masked_select (boolean index)"
        self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("buffer_rows", [8, 2], ids=["stashed", "tap-by-tap"])
def test_step_ops_never_read_device_values_on_the_host(monkeypatch, buffer_rows):
    monkeypatch.setattr(ops, "_compiled", lambda fn: fn)  # eager: every aten call is seen
    padded = torch.tensor([False, False, False, True])
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context", lambda: SimpleNamespace(is_padding=padded))
    fields, counts, gid, _ = new_packed_channels([3, 2])
    router_fields, _ = new_packed_routers([3])
    bufs = ops.StepBuffers.new(fields, counts, gid, torch.tensor(1.0), torch.tensor(0.1), rows=buffer_rows,
                               long_rows=8, n_layers=1, hidden=4, router_fields=router_fields, top_k=2,
                               renormalize=True)
    bufs = ops.StepBuffers(**{**bufs.__dict__, "cursor": None})  # a GPU's: no row cursor to read
    h, r, x = torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 5)
    with _Recorder() as rec:  # a layer with two channel taps and a router
        torch.ops.actprune.stash_layer([], None, h, None, *bufs.stash_args(), [], [], 0, -1, 2, True)
        torch.ops.actprune.stash_layer([x[:, :3], x[:, 3:]], x[:, :3], h, r, *bufs.stash_args(), [0, 3], [0, 1],
                                       1, 0, 2, True)
        torch.ops.actprune.end_step(h, *bufs.end_args())
    assert rec.calls, "the recorder saw nothing"
    assert not [c for c in rec.calls if c.split(".")[0] in SYNCING], rec.calls
    assert float(counts[0]) == float(counts[1]) == float(router_fields[0][0]) == 3.0  # and the step was folded


def test_step_path_source_has_no_host_reads():
    # .tolist() / .cpu() of a CPU tensor make no aten call the recorder could see (the row
    # cursor, a CPU tensor read only where the buffers are on a CPU, is read in _pending alone)
    import inspect

    from actprune.core.tensor import accumulate
    from actprune.server import stash_kernel

    bodies = [ops.stash_layer, ops.end_step, ops._fold_rows, ops._fold_math, forward.valid_rows,
              stash_kernel.usable, stash_kernel.stash_rows, accumulate.fold_channels, accumulate.merge_channels, accumulate.fold_packed,
              accumulate.fold_blocks, accumulate.fold_routers, accumulate.route]
    for fn in bodies:
        src = inspect.getsource(fn)
        for bad in (".item(", ".tolist(", ".cpu(", ".numpy(", "nonzero(", 'to("cpu")'):
            assert bad not in src, f"{fn.__name__} calls {bad}"
