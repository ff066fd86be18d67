"""Sizes picked from the data: defaults kept for a large corpus, adapted for a small file, the
user's sizes kept, and one line for data too small to train on."""

from __future__ import annotations

import pytest
from actprune.pruning.data import DataError, split_train_val
from actprune.pruning.recover.sizing import DEFAULTS, Requested, fit_sizes


def test_a_large_corpus_keeps_the_defaults_and_prints_nothing():
    sizes, note = fit_sizes([500] * 20_000, Requested())
    assert sizes == DEFAULTS
    assert note is None


def test_sixty_short_records_get_rows_batches_and_a_validation_part_that_fit():
    docs = [40 + i % 7 for i in range(60)]  # ~2.6k tokens, like 60 question/answer pairs
    sizes, note = fit_sizes(docs, Requested(), seed=0)
    train, val = split_train_val(docs, sizes.val_fraction, 0)
    rows = sum(train) // sizes.seq_len
    assert sizes.seq_len == 128 and rows >= 16
    assert sum(val) >= sizes.seq_len  # one validation row at least
    assert rows // sizes.batch_size >= 4  # an epoch is at least 4 steps
    assert sizes.epochs * (rows // sizes.batch_size) >= 12
    assert sizes.warmup_steps < sizes.epochs * (rows // sizes.batch_size)  # the peak rate is reached
    assert note is not None and "\n" not in note
    for option in ("--seq-len 128", f"--batch-size {sizes.batch_size}", f"--val-fraction {sizes.val_fraction}"):
        assert option in note


def test_sizes_the_user_gives_are_kept():
    docs = [40] * 60
    req = Requested(seq_len=256, batch_size=2, val_fraction=0.2, epochs=1, warmup_steps=3)
    sizes, note = fit_sizes(docs, req)
    assert (sizes.seq_len, sizes.batch_size, sizes.val_fraction, sizes.epochs, sizes.warmup_steps) == (
        256, 2, 0.2, 1, 3)
    assert note is None


def test_max_steps_bounds_the_warm_up_and_leaves_epochs_alone():
    sizes, note = fit_sizes([40] * 60, Requested(max_steps=30))
    assert sizes.epochs == 1 and sizes.warmup_steps == 3
    assert "--epochs" not in note


def test_val_data_is_not_split_and_must_fill_one_row():
    sizes, _ = fit_sizes([40] * 60, Requested(), val_doc_tokens=[100, 100])
    assert sizes.seq_len == 128  # 2400 training tokens: 18 rows of 128
    with pytest.raises(DataError, match=r"^validation data \(--val-data\): only 20 tokens.*add data$"):
        fit_sizes([40] * 60, Requested(), val_doc_tokens=[20])


@pytest.mark.parametrize(("docs", "req", "message"), [
    ([27], Requested(), r"--data: only 27 training tokens \(1 documents\), fewer than one row of 32; add data$"),
    ([40] * 60, Requested(seq_len=1024), r"only \d+ tokens, fewer than one row of 1024; lower --seq-len or pass --val-data$"),
    ([40] * 60, Requested(seq_len=128, batch_size=64), r"fewer than one step of 64 rows; lower --batch-size"),
])
def test_data_too_small_is_one_line_naming_the_fix(docs, req, message):
    with pytest.raises(DataError, match=message) as e:
        fit_sizes(docs, req)
    assert "\n" not in str(e.value)
