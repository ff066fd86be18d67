"""Sizes of a fine-tuning run picked from the data, for every option the user left unset.

The defaults suit a large corpus: rows of 1024 tokens, batches of 8 rows, 5 % of the documents
held out, 100 warm-up steps, one epoch. A small file — 60 question/answer pairs, a few thousand
tokens — gives one training row of 1024 tokens and a validation part too short for any row.
So each size that is ``None`` (not given) is chosen from the documents' token counts:

* ``seq_len``: the largest power of two ≤ 1024 that cuts the training part into at least
  16 rows (never under 32);
* ``val_fraction``: 0.05, raised in steps of 0.05 up to 0.25 until the validation documents
  fill one row; if even 0.25 does not, the row length halves (when it was not given);
* ``batch_size``: 8, halved (down to 1) until an epoch is at least 4 optimizer steps;
* ``epochs``: 1, or up to 3 when an epoch is under 20 steps (without ``max_steps``);
* ``warmup_steps``: 100, but at most a tenth of the run, so the peak rate is reached.

Given sizes are kept as they are; data too small for them is an error naming the option.
Everything is a pure function of the token counts, the seed and the step size, so a resumed
run picks the same sizes. :func:`fit_sizes` returns them with one line saying what it chose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from actprune.pruning.data import DataError, split_train_val

__all__ = ["DEFAULTS", "Requested", "Sizes", "fit_sizes"]

MIN_ROWS = 16  # training rows wanted before the row length is halved
MIN_SEQ_LEN = 32
MAX_VAL_FRACTION = 0.25
MIN_STEPS_PER_EPOCH = 4
MIN_STEPS = 20  # a run shorter than this gets more epochs (up to MAX_EPOCHS)
MAX_EPOCHS = 3


@dataclass(frozen=True)
class Sizes:
    seq_len: int
    batch_size: int
    val_fraction: float
    epochs: int
    warmup_steps: int


DEFAULTS = Sizes(seq_len=1024, batch_size=8, val_fraction=0.05, epochs=1, warmup_steps=100)


@dataclass(frozen=True)
class Requested:
    """The user's sizes; ``None`` = pick from the data."""

    seq_len: int | None = None
    batch_size: int | None = None
    val_fraction: float | None = None
    epochs: int | None = None
    warmup_steps: int | None = None
    max_steps: int | None = None
    rows_per_batch_row: int = 1  # grad_accum × processes: rows of a step = batch_size × this


def _halvings(start: int, stop: int) -> list[int]:
    out = [start]
    while out[-1] // 2 >= stop:
        out.append(out[-1] // 2)
    return out


def _parts(doc_tokens: Sequence[int], fraction: float, seed: int) -> tuple[int, int]:
    """(training tokens, validation tokens) of the documents' split at ``fraction``."""
    train, val = split_train_val(range(len(doc_tokens)), fraction, seed)
    return sum(doc_tokens[i] for i in train), sum(doc_tokens[i] for i in val)


def _rows_and_split(
    doc_tokens: Sequence[int], req: Requested, seed: int, val_tokens: int | None
) -> tuple[int, float, int]:
    """(seq_len, val_fraction, training tokens): the first fit in order of preference."""
    fractions = [req.val_fraction] if req.val_fraction is not None else [
        round(DEFAULTS.val_fraction * k, 2) for k in range(1, int(MAX_VAL_FRACTION / 0.05) + 1)]
    if val_tokens is not None:  # --val-data: the split does not apply
        fractions = fractions[:1]
    lengths = [req.seq_len] if req.seq_len is not None else _halvings(DEFAULTS.seq_len, MIN_SEQ_LEN)
    base_train = _parts(doc_tokens, fractions[0], seed)[0] if val_tokens is None else sum(doc_tokens)
    start = next((s for s in lengths if base_train // s >= MIN_ROWS), lengths[-1])
    short_val = None
    for s in lengths[lengths.index(start):]:
        for f in fractions:
            train, val = (sum(doc_tokens), val_tokens) if val_tokens is not None else _parts(doc_tokens, f, seed)
            if train // s == 0:
                break  # a larger fraction only shortens the training part
            if val // s >= 1 or (val_tokens is None and f == 0):
                return s, f, train
            short_val = (val, s, f)
    if short_val is not None:
        val, s, f = short_val
        where = "--val-data" if val_tokens is not None else f"--val-fraction {f} of --data"
        fixes = [] if val_tokens is not None or req.val_fraction is None else ["raise --val-fraction"]
        fixes += [] if req.seq_len is None else ["lower --seq-len"]
        fixes += ["add data" if val_tokens is not None else "pass --val-data"]
        raise DataError(f"validation data ({where}): only {val} tokens, fewer than one row of {s}; "
                        f"{' or '.join(fixes)}")
    train = sum(doc_tokens) if val_tokens is not None else _parts(doc_tokens, fractions[0], seed)[0]
    fix = "add data" + ("" if req.seq_len is None else " or lower --seq-len")
    raise DataError(f"--data: only {train} training tokens ({len(doc_tokens)} documents), fewer than "
                    f"one row of {lengths[-1]}; {fix}")


def fit_sizes(
    doc_tokens: Sequence[int], req: Requested, *, seed: int = 0, val_doc_tokens: Sequence[int] | None = None,
) -> tuple[Sizes, str | None]:
    """Sizes for documents of ``doc_tokens`` tokens each (EOS included), and a line naming the
    sizes that differ from :data:`DEFAULTS` (None when none does). ``val_doc_tokens``: the
    documents of ``--val-data``, when given."""
    val_tokens = None if val_doc_tokens is None else sum(val_doc_tokens)
    seq_len, val_fraction, train_tokens = _rows_and_split(doc_tokens, req, seed, val_tokens)
    rows = train_tokens // seq_len
    per = req.rows_per_batch_row
    batch = req.batch_size
    if batch is None:
        batch = DEFAULTS.batch_size
        while batch > 1 and rows // (batch * per) < MIN_STEPS_PER_EPOCH:
            batch //= 2
    per_epoch = rows // (batch * per)
    if per_epoch == 0:
        fix = "lower --batch-size or --grad-accum" if req.batch_size is not None else "lower --grad-accum"
        raise DataError(f"{rows} training rows of {seq_len} tokens: fewer than one step of "
                        f"{batch * per} rows; {fix} or add data")
    epochs = req.epochs
    if epochs is None:
        epochs = 1 if req.max_steps is not None else min(MAX_EPOCHS, max(1, math.ceil(MIN_STEPS / per_epoch)))
    total = req.max_steps or epochs * per_epoch
    warmup = req.warmup_steps if req.warmup_steps is not None else min(DEFAULTS.warmup_steps, total // 10)
    sizes = Sizes(seq_len=seq_len, batch_size=batch, val_fraction=val_fraction, epochs=epochs,
                  warmup_steps=warmup)
    picked = [(name, getattr(sizes, name)) for name in Sizes.__dataclass_fields__
              if getattr(req, name) is None and getattr(sizes, name) != getattr(DEFAULTS, name)
              and not (name == "epochs" and req.max_steps is not None)
              and not (name == "val_fraction" and val_doc_tokens is not None)]
    if not picked:
        return sizes, None
    chosen = ", ".join(f"--{n.replace('_', '-')} {v}" for n, v in picked)
    note = (f"sizes picked from the data ({len(doc_tokens)} documents, {sum(doc_tokens):,} tokens; "
            f"{rows} training rows, {total} steps): {chosen} (give them to override)")
    return sizes, note
