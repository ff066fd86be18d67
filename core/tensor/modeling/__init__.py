"""The actprune architecture for transformers: ``configuration_actprune.py`` and
``modeling_actprune.py``, a stock decoder-only model whose layers each have their own widths.

The two files are self-contained (they import transformers, never actprune) because the slicer
copies them into every checkpoint that needs them, for loading without actprune installed
(``trust_remote_code=True``). They hold no per-family knowledge: every layer is the stock
family's own transformers class, found through ``AutoConfig`` / ``MODEL_MAPPING`` from the
checkpoint's ``actprune_base_model_type``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODELING_FILES", "modeling_dir"]

MODELING_FILES = ("configuration_actprune.py", "modeling_actprune.py")


def modeling_dir() -> Path:
    """The directory holding :data:`MODELING_FILES`."""
    return Path(__file__).parent
