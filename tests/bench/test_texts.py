"""The other-domain text files the compress benchmarks pass (bench/texts.py): the anchor is the
first halves, each validation file one text's second half, nothing in both, written by the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
from texts import OTHER_TEXTS, halves  # noqa: E402


def test_halves_cut_at_a_paragraph_break_past_the_middle():
    text = "a" * 10 + "\n\n" + "b" * 3 + "\n\n" + "c" * 10
    first, second = halves(text)
    assert first + second == text and first == "a" * 10 + "\n\n" + "b" * 3 and second.startswith("\n\nc")
    assert halves("x" * 9) == ("x" * 4, "x" * 5)  # no break: the middle


def test_cli_writes_the_anchor_from_first_halves_and_validation_from_second_halves(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "texts.py"), str(tmp_path)], check=True,
                         capture_output=True, text=True).stdout
    assert "anchor.txt" in out
    files = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.iterdir()}
    assert set(files) == {"anchor.txt"} | {f"val-{n}.txt" for n in OTHER_TEXTS}
    import setuptools  # noqa: F401  puts its vendored packages on sys.path: the texts must not change
    split = {n: halves(load()) for n, load in OTHER_TEXTS.items()}
    assert files["anchor.txt"] == "\n\n".join(first for first, _ in split.values())
    for name, (first, second) in split.items():
        assert files[f"val-{name}.txt"] == second and len(second) > 1000
        tail = second.strip().split("\n\n")[-1]  # the validation text's last paragraph is not fitted on
        assert tail not in files["anchor.txt"]
        assert first.strip().split("\n\n")[0] in files["anchor.txt"]
