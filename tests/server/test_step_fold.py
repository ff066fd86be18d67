"""Steps through the real ops equal the plain accumulators, however the rows are cut.

``end_step`` folds the step buffers in chunks of ``fold_rows`` rows, and on a CPU lets the rows
of small steps gather until a chunk is there (cost, BENCHMARKS.md issue 16); the stream buffer
holds one slot per layer boundary (slot j + 1: the stream leaving layer j, which layer j + 1 is
given). None of that may change a number: the packed accumulators after steps of T rows, on
both paths of the ops (stashed and folded later, or folded tap by tap past the buffer), with
rows waiting or not, must equal ``update_channels`` / ``update_block`` on the whole batch. No
forward context: every row is valid while armed."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from actprune.core.tensor.accumulate import (
    export_state,
    new_block_state,
    new_channel_state,
    new_packed_channels,
    update_block,
    update_channels,
)
from actprune.server import ops

WIDTHS, LAYERS, HIDDEN = [5, 3], 2, 4  # layer 0 taps group 0, layer 1 group 1
FOLD = 16  # rows a fold waits for, here: steps of a few rows cross it


def _buffers(rows: int, long_rows: int, *, gpu_like: bool = False, fold_rows: int = FOLD) -> tuple[ops.StepBuffers, list]:
    fields, counts, gid, groups = new_packed_channels(WIDTHS)
    bufs = ops.StepBuffers.new(fields, counts, gid, torch.tensor(1.0), torch.tensor(0.5), rows=rows,
                               long_rows=long_rows, n_layers=LAYERS, hidden=HIDDEN, fold_rows=fold_rows)
    if gpu_like:  # a GPU's buffers: no cursor, every step folded at its end
        bufs = ops.StepBuffers(**{**bufs.__dict__, "cursor": None})
    return bufs, groups


def _step(bufs: ops.StepBuffers, xs: list[torch.Tensor], streams: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """One step of T tokens through the ops as the hooks call them: the stream entering layer 0
    (slot 0), then per layer its channel taps and the stream leaving it (slot j + 1), then
    end_step."""
    offsets = [0, *np.cumsum(WIDTHS)[:-1].tolist()]
    h, r = streams[0]
    torch.ops.actprune.stash_layer([], None, h, r, *bufs.stash_args(), [], [], 0, -1, 0, False)
    for j in range(LAYERS):
        h, r = streams[j + 1]
        torch.ops.actprune.stash_layer([xs[j]], None, h, r, *bufs.stash_args(), [offsets[j]], [j], j + 1,
                                       -1, 0, False)
    torch.ops.actprune.end_step(streams[-1][0], *bufs.end_args())


def _batch(t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, w, generator=g) * 3 + 40 for w in WIDTHS]  # (T, C) of each tap
    xs[0][::5, 0] = 0.1  # near zero, below the threshold
    hs = [torch.randn(t, HIDDEN, generator=g) for _ in range(LAYERS + 1)]  # (T, H) per boundary
    rs = [None] + [torch.randn(t, HIDDEN, generator=g) for _ in range(LAYERS)]  # layer 0: no residual
    return xs, list(zip(hs, rs, strict=True))


def _check(groups, blocks, batches):
    """The accumulators equal one fold of every batch's rows at once."""
    xs = [torch.cat([b[0][k] for b in batches]) for k in range(len(WIDTHS))]
    t = xs[0].shape[0]
    valid = torch.ones(t, dtype=torch.bool)
    for x, packed in zip(xs, groups, strict=True):
        ref = new_channel_state(x.shape[1])
        update_channels(ref, x, valid, 0.5)
        p, r = export_state(packed), export_state(ref)
        for f in r:
            np.testing.assert_allclose(p[f], r[f], rtol=1e-12, atol=1e-12, err_msg=f)
    stream = [torch.cat([h if r is None else h + r for h, r in (b[1][s] for b in batches)])
              for s in range(LAYERS + 1)]  # (T, H) per boundary
    for j in range(LAYERS):  # layer j: from the stream it was given to the one it left
        ref = new_block_state()
        update_block(ref, stream[j], stream[j + 1], valid)
        assert float(blocks[1, j]) == float(ref["count"][0]) == t
        # float32 cosines, compiled or not: equal to float32 rounding
        assert abs(float(blocks[0, j]) - float(ref["cos_sum"][0])) < 1e-6 * t


@pytest.mark.parametrize("t, rows", [(37, 64), (37, 8)], ids=["stashed, 3 chunks", "tap-by-tap"])
def test_a_step_folded_in_row_chunks_equals_one_fold_of_the_whole_batch(t, rows):
    bufs, groups = _buffers(rows, 64)
    batch = _batch(t, 4)
    _step(bufs, *batch)
    assert int(bufs.cursor[0]) == 0, "a step of ≥ fold_rows rows is folded at its end"
    _check(groups, bufs.blocks, [batch])


@pytest.mark.parametrize("gpu_like", [False, True], ids=["cpu: rows wait", "gpu: every step"])
def test_small_steps_wait_for_a_chunk_and_a_snapshot_flushes_them(gpu_like):
    # steps of 3, 5, 1, 9 rows (the 4th overflows a chunk: folded with the waiting rows), then
    # 2, 31 (2 + 31 > the 32 rows of the buffers: folded tap by tap, the 2 wait on)
    bufs, groups = _buffers(32, 64, gpu_like=gpu_like)
    sizes = [3, 5, 1, 9, 2, 31]
    batches = [_batch(t, seed) for seed, t in enumerate(sizes)]
    waiting = []
    for b in batches:
        _step(bufs, *b)
        waiting.append(0 if bufs.cursor is None else int(bufs.cursor[0]))
    if not gpu_like:
        assert waiting == [3, 8, 9, 0, 2, 2]
        assert float(bufs.counts[0]) == sum(sizes) - 2, "waiting rows are not in the accumulators yet"
    bufs.flush()  # what Capture.snapshot does first
    _check(groups, bufs.blocks, batches)


@pytest.mark.parametrize("gpu_like", [False, True], ids=["cpu: rows wait", "gpu: every step"])
def test_decode_steps_of_one_size_land_in_their_own_rows(gpu_like):
    # decode's pattern: every step the same T, so the same layer writes at rows 0, 3, 6, ... of
    # the buffers (stash_layer keeps its destination views per layer, row and T)
    bufs, groups = _buffers(32, 64, gpu_like=gpu_like)
    batches = [_batch(3, seed) for seed in range(7)]
    waiting = []
    for b in batches:
        _step(bufs, *b)
        waiting.append(0 if bufs.cursor is None else int(bufs.cursor[0]))
    if not gpu_like:
        assert waiting == [3, 6, 9, 12, 15, 0, 3]
    bufs.flush()
    _check(groups, bufs.blocks, batches)


def test_a_reset_drops_the_waiting_rows_and_a_disarmed_step_counts_nothing():
    bufs, groups = _buffers(32, 64)
    _step(bufs, *_batch(4, 0))  # waits
    bufs.discard()  # Capture.reset: a new window
    bufs.armed.fill_(0.0)
    _step(bufs, *_batch(3, 1))  # paused: its rows wait, marked not valid
    bufs.armed.fill_(1.0)
    kept = _batch(5, 2)
    _step(bufs, *kept)
    bufs.flush()
    _check(groups, bufs.blocks, [kept])


def test_rows_wait_for_at_most_half_the_buffers_so_a_step_of_the_other_half_fits():
    # 16 rows a fold asked of buffers of 20 rows: folds of 10 or more rows. Steps of 4, 5, 6
    # rows, then 10: with 16 rows a fold, 15 would wait and the step of 10 would not fit beside
    # them (folded tap by tap, the 15 left waiting); capped, they are folded at 15 and the step
    # of 10 is stashed, then folded at its end
    bufs, groups = _buffers(20, 64, fold_rows=16)
    assert bufs.fold_rows == 10
    batches = [_batch(t, seed) for seed, t in enumerate([4, 5, 6, 10])]
    waiting = []
    for b in batches:
        _step(bufs, *b)
        waiting.append(int(bufs.cursor[0]))
    assert waiting == [4, 9, 0, 0]
    _check(groups, bufs.blocks, batches)


def test_a_long_step_is_folded_in_chunks_of_the_default_fold_rows(monkeypatch):
    # 300 rows, folded at the step's end in 18 chunks of 16 and one of 12: as one fold of the batch
    bufs, groups = _buffers(512, 0, fold_rows=ops.FOLD_ROWS)
    assert bufs.fold_rows == ops.FOLD_ROWS == 16
    compiled, fold, chunks = ops._compiled, ops._compiled(ops._fold_math), []

    def counted(chan, *args):
        chunks.append(chan.shape[0])
        return fold(chan, *args)

    monkeypatch.setattr(ops, "_compiled", lambda fn: counted if fn is ops._fold_math else compiled(fn))
    batch = _batch(300, 5)
    _step(bufs, *batch)
    assert chunks == [16] * 18 + [12]
    _check(groups, bufs.blocks, [batch])


@pytest.mark.parametrize("cpu", [True, False], ids=["cpu", "gpu"])
def test_a_full_size_step_after_waiting_rows_fits_or_has_scratch(cpu):
    # memory for any step and the rows that can wait: no scratch; less: a scratch for a whole step
    assert ops.StepBuffers.sizes(64, 10_000, cpu) == ((64 + ops.FOLD_ROWS - 1, 0) if cpu else (64, 0))
    assert ops.StepBuffers.sizes(64, 10_000, cpu, FOLD) == ((64 + FOLD - 1, 0) if cpu else (64, 0))
    assert ops.StepBuffers.sizes(64, 70, cpu, FOLD) == ((70, 64) if cpu else (64, 0))
    assert ops.StepBuffers.sizes(64, 20, cpu, FOLD) == (20, 64)
    # and through the ops: 3 rows wait, then a step of max_tokens rows
    rows, long_rows = ops.StepBuffers.sizes(32, 40, cpu=True, fold_rows=FOLD)
    bufs, groups = _buffers(rows, long_rows)
    batches = [_batch(3, 0), _batch(32, 1)]
    for b in batches:
        _step(bufs, *b)
    bufs.flush()
    _check(groups, bufs.blocks, batches)


def test_warm_up_compiles_the_fold_without_changing_a_number():
    bufs, groups = _buffers(32, 64)
    batch = _batch(16, 3)
    _step(bufs, *batch)  # folded: 16 rows
    before = [{f: a.copy() for f, a in export_state(g).items()} for g in groups], bufs.blocks.clone()
    bufs.chan.fill_(7.0)  # stale rows in the buffers: the warm-up must not count them
    bufs.warm_up()
    for g, want in zip(groups, before[0], strict=True):
        for f, a in export_state(g).items():
            np.testing.assert_array_equal(a, want[f], err_msg=f)
    assert torch.equal(bufs.blocks, before[1])


def test_the_ops_find_their_buffers_from_phase_and_say_so_when_they_cannot(monkeypatch):
    # the ops take the step's phase, the one mutable argument, and find every other buffer
    # from its address: two captures' buffers stay apart, and a phase of no buffers is a bug
    # that says so rather than a KeyError (or worse, another capture's accumulators)
    first, _ = _buffers(rows=8, long_rows=0, gpu_like=True)
    second, _ = _buffers(rows=8, long_rows=0, gpu_like=True)
    h = torch.randn(3, HIDDEN)
    torch.ops.actprune.stash_layer([], None, h, None, *second.stash_args(), [], [], 0, -1, 0, False)
    torch.ops.actprune.stash_layer([h[:, :WIDTHS[0]]], None, h, h, *second.stash_args(), [0], [0], 1, -1, 0, False)
    torch.ops.actprune.stash_layer([h[:, :WIDTHS[1]]], None, h, h, *second.stash_args(), [WIDTHS[0]], [1], 2, -1,
                                   0, False)
    torch.ops.actprune.end_step(h, *second.end_args())
    assert second.counts.tolist() == [3.0, 3.0] and first.counts.tolist() == [0.0, 0.0]
    with pytest.raises(RuntimeError, match="phase tensor of no StepBuffers"):
        torch.ops.actprune.end_step(h, torch.zeros(1, dtype=torch.int64))
    # one capture, as in a worker: a copy of its phase (a compiler that cloned the mutable
    # argument) still reaches its buffers. The registry is made to hold only `second`: other
    # tests' buffers may still be alive in this process (a reference cycle not yet collected)
    monkeypatch.setattr(ops, "_BUFFERS", weakref.WeakValueDictionary({second.phase.data_ptr(): second}))
    torch.ops.actprune.end_step(h, second.phase.clone())
    assert second.counts.tolist() == [6.0, 6.0]
