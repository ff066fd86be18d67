"""The actprune architecture for transformers: ``configuration_actprune.py`` and
``modeling_actprune.py``, a stock decoder-only model whose layers each have their own widths.

The two files are self-contained (they import transformers, never actprune) because the slicer
copies them into every checkpoint that needs them, for loading without actprune installed
(``trust_remote_code=True``). They hold no per-family knowledge: every layer is the stock
family's own transformers class, found through ``AutoConfig`` / ``MODEL_MAPPING`` from the
checkpoint's ``actprune_base_model_type``.

actprune itself never executes a checkpoint's copy: :func:`register_classes` registers these
classes with transformers in-process, and a copy is recognised as ours by its content
(:func:`own_digests`, sha256 of the files installed here), never by its name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["AUTO_MAP", "MODELING_FILES", "modeling_dir", "own_digests", "register_classes"]

MODELING_FILES = ("configuration_actprune.py", "modeling_actprune.py")
# config.json's auto_map of a checkpoint of the actprune architecture.
AUTO_MAP = {
    "AutoConfig": "configuration_actprune.ActpruneConfig",
    "AutoModelForCausalLM": "modeling_actprune.ActpruneForCausalLM",
}


def modeling_dir() -> Path:
    """The directory holding :data:`MODELING_FILES`."""
    return Path(__file__).parent


def own_digests() -> frozenset[str]:
    """sha256 (hex) of each of :data:`MODELING_FILES` as installed with this actprune."""
    return frozenset(hashlib.sha256((modeling_dir() / f).read_bytes()).hexdigest() for f in MODELING_FILES)


def register_classes() -> None:
    """Make transformers' Auto classes build ``model_type: actprune`` from these classes
    (idempotent). A registered non-transformers class wins over a checkpoint's ``auto_map`` even
    under ``trust_remote_code=True``, so the checkpoint's copy never runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_actprune import ActpruneConfig
    from .modeling_actprune import ActpruneForCausalLM

    AutoConfig.register(ActpruneConfig.model_type, ActpruneConfig, exist_ok=True)
    AutoModelForCausalLM.register(ActpruneConfig, ActpruneForCausalLM, exist_ok=True)
