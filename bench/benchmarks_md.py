"""The one writer of BENCHMARKS.md's generated sections: a bench script's ``--write`` replaces
the text between its markers and keeps everything else (appending the section, markers
included, when the file does not have it yet)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def replace_section(text: str, begin: str, end: str, section: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    doc = path.read_text()
    if begin not in doc:
        doc = doc.rstrip("\n") + "\n\n" + section
    head, rest = doc.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
