"""The C++ stash_layer (server/csrc/stash.cpp) against its Python reference (ops.stash_layer,
registered as actprune::stash_layer_slow): the same bytes in the step buffers for every kind of
source the hooks pass, and the registry that tells it where the buffers are."""

from __future__ import annotations

import dataclasses
import gc
import os
import weakref

import pytest
import torch
from actprune.core.tensor.accumulate import new_packed_channels
from actprune.server import ops

WIDTHS, LAYERS, HIDDEN, EXPERTS = [6, 4, 10], 3, 8, 5  # three taps (two layers' worth), 3 layers


def _buffers(rows: int = 12, long_rows: int = 0) -> ops.StepBuffers:
    fields, counts, gid, _ = new_packed_channels(WIDTHS)
    router_fields = [torch.zeros(2, dtype=torch.float64)] + [torch.zeros(2, EXPERTS, dtype=torch.float64)
                                                            for _ in range(3)]
    return ops.StepBuffers.new(fields, counts, gid, torch.tensor(1.0), torch.tensor(0.5), rows=rows,
                               long_rows=long_rows, n_layers=LAYERS, hidden=HIDDEN, router_fields=router_fields,
                               top_k=2, renormalize=True)


def _sources(t: int, dtype: torch.dtype, layout: str, seed: int):
    """taps (T, C_k) each, a router (T, E - 1), hidden and residual (T, H), laid out as `layout`
    says: contiguous; 3-D (1, T, C) as some hooks see them; a column slice of a wider tensor (rows
    further apart than C); transposed (columns not contiguous: ATen's path in the C++ op)."""
    g = torch.Generator().manual_seed(seed)

    def make(c: int) -> torch.Tensor:
        x = (torch.randn(t, c, generator=g) * 3).to(dtype)
        if layout == "3d":
            return x[None]
        if layout == "slice":
            wide = torch.zeros(t, c + 7, dtype=dtype)
            wide[:, 3:3 + c] = x
            return wide[:, 3:3 + c]
        if layout == "transposed":
            return x.t().contiguous().t()
        return x

    taps = [make(c) for c in WIDTHS]
    hidden, residual = (x[0] if x.dim() == 3 else x for x in (make(HIDDEN), make(HIDDEN)))  # (T, H) always
    return taps, make(EXPERTS - 1), hidden, residual


def _run(op, bufs: ops.StepBuffers, t: int, dtype: torch.dtype, layout: str, seed: int, residual: bool) -> None:
    taps, router, hidden, res = _sources(t, dtype, layout, seed)
    offsets = [0, WIDTHS[0], WIDTHS[0] + WIDTHS[1]]
    op(taps[:2], None, hidden, res if residual else None, bufs.phase, offsets[:2], [0, 1], 1, -1, 2, True)
    op(taps[2:], router, hidden, res if residual else None, bufs.phase, offsets[2:], [2], 2, 1, 2, True)


def _same(a: ops.StepBuffers, b: ops.StepBuffers) -> None:
    for name in ("chan", "stream", "routers", "scratch", "blocks", "counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for x, y in zip(a.fields + a.router_fields, b.fields + b.router_fields, strict=True):
        assert torch.equal(x, y)


def test_the_native_op_is_built_here():
    # this machine has a C++ compiler (torch.compile needs one): the op must be C++, or every
    # server test below would pass on the Python body alone
    assert ops.NATIVE_ERROR is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "3d", "slice", "transposed"])
@pytest.mark.parametrize("residual", [True, False])
def test_native_stash_writes_what_the_python_op_writes(dtype, layout, residual):
    native, python = _buffers(), _buffers()
    for b in (native, python):
        b.cursor.fill_(3)  # rows of earlier steps wait: this step's go below them
    _run(torch.ops.actprune.stash_layer, native, 4, dtype, layout, 7, residual)
    _run(torch.ops.actprune.stash_layer_slow, python, 4, dtype, layout, 7, residual)
    assert native.chan[3:7].abs().sum() > 0 and torch.isinf(native.routers[3:7, 1, -1]).all()
    _same(native, python)


def test_a_long_step_goes_to_the_python_op():
    # 9 rows after 5 waiting do not fit 12: the taps fold where they are (the Python op's path)
    native, python = _buffers(rows=12, long_rows=9), _buffers(rows=12, long_rows=9)
    for b in (native, python):
        b.cursor.fill_(5)
    _run(torch.ops.actprune.stash_layer, native, 9, torch.float32, "contiguous", 3, True)
    _run(torch.ops.actprune.stash_layer_slow, python, 9, torch.float32, "contiguous", 3, True)
    assert native.counts.sum() > 0 and native.chan.abs().sum() == 0
    _same(native, python)


def test_the_registry_follows_the_buffers(monkeypatch):
    if ops.NATIVE_ERROR is not None:
        pytest.skip(ops.NATIVE_ERROR)
    bufs = _buffers()
    copy = dataclasses.replace(bufs)  # a copy with the same phase takes over
    phase, chan = bufs.phase, copy.chan
    del bufs
    gc.collect()
    _run(torch.ops.actprune.stash_layer, copy, 2, torch.float32, "contiguous", 1, True)
    assert chan[:2].abs().sum() > 0
    # once no StepBuffers holds the phase, the C++ op lets its buffers go: a call with it reaches
    # the Python op, which finds no buffers (other tests' may still be alive: hide them)
    monkeypatch.setattr(ops, "_BUFFERS", weakref.WeakValueDictionary())
    del copy
    gc.collect()
    with pytest.raises(RuntimeError, match="phase tensor of no StepBuffers"):
        torch.ops.actprune.stash_layer([], None, torch.zeros(2, HIDDEN), None, phase, [], [], 0, -1, 0, False)


def test_a_build_that_fails_says_why_and_leaves_the_python_op(tmp_path, monkeypatch, caplog):
    # no compiler, a broken toolchain, a source that does not build: load() reports, never raises.
    # A lock left by a killed build is cleared rather than waited on for ever (torch's baton)
    from actprune.server import native

    broken = tmp_path / "stash.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path / "cache")
    where = native.build_dir()
    where.mkdir(parents=True)
    (where / "lock").touch()
    old = 1_000_000_000  # 2001
    os.utime(where / "lock", (old, old))
    # vLLM's logging config stops "vllm.*" records at its own handler: listen on the logger itself
    monkeypatch.setattr(native.log, "handlers", [*native.log.handlers, caplog.handler])
    with caplog.at_level("WARNING", logger="vllm.actprune"):
        why = native.load({})
    assert why is not None and "actprune_stash" in why
    assert "could not be built" in caplog.text
    assert native.load({"ACTPRUNE_NATIVE_OPS": "0"}) == "ACTPRUNE_NATIVE_OPS=0"
    with pytest.raises(ValueError, match="ACTPRUNE_NATIVE_OPS"):
        native.load({"ACTPRUNE_NATIVE_OPS": "maybe"})
