"""Which code a checkpoint directory would make transformers run, and keeping it out of outputs.

A checkpoint names Python modules to import in ``auto_map`` (``config.json``,
``tokenizer_config.json``): ``module.Class`` is ``module.py`` beside it, ``repo--module.Class`` a
module of another Hub repository. actprune runs none of it unless asked
(``--trust-remote-code``, ``trust_remote_code=True``), with one exception: its own two modeling
files, which the slicer writes into pruned checkpoints. A copy counts as actprune's when its
sha256 equals that of a file installed with actprune (:func:`own_digests`), whatever its name;
such a checkpoint loads from actprune's classes registered in-process and the copy is never
executed, so a tampered copy is simply foreign.

Outputs (the slicer's, ``finetune``'s) never carry a foreign ``*.py`` or ``auto_map``: a
checkpoint of the actprune architecture gets the installed files and :data:`AUTO_MAP`, any
other none.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from actprune.core.archs import ACTPRUNE_MODEL_TYPE
from actprune.core.config import CheckpointError, read_config
from actprune.core.files import atomic_write
from actprune.core.tensor.modeling import (
    AUTO_MAP,
    MODELING_FILES,
    modeling_dir,
    own_digests,
    register_classes,
)

__all__ = [
    "CODE_CONFIGS", "TRUST_FLAG", "add_trust_flag", "copy_side_file", "foreign_code", "resolve_trust",
    "write_own_code",
]

CODE_CONFIGS = ("config.json", "tokenizer_config.json")  # the files whose auto_map transformers follows
TRUST_FLAG = "--trust-remote-code"


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """``--trust-remote-code`` on a command that loads checkpoints with transformers."""
    parser.add_argument(TRUST_FLAG, action="store_true",
                        help="run Python code that --model/--teacher names in its auto_map (only for "
                             "checkpoints you trust); actprune's own pruned checkpoints load without it")


def foreign_code(model_dir: str | Path) -> list[str]:
    """The code ``auto_map`` names in ``model_dir`` that is not actprune's own: file names, or
    references to other repositories; empty when loading it runs nothing of the checkpoint's."""
    model_dir = Path(model_dir)
    own = own_digests()
    foreign: list[str] = []
    for name in CODE_CONFIGS:
        auto_map = _json(model_dir / name).get("auto_map")
        if auto_map is None:
            continue
        for ref in _references(auto_map):
            if ref is None:
                foreign.append(f"{name} auto_map (not a map of class references)")
            elif "--" in ref:
                foreign.append(ref)  # code of another repository, fetched and run
            else:
                f = model_dir / f"{ref.rpartition('.')[0]}.py"
                if not (f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() in own):
                    foreign.append(f.name)
    return sorted(set(foreign))


def resolve_trust(model_dir: str | Path, trust_remote_code: bool) -> bool:
    """The ``trust_remote_code`` to hand transformers for ``model_dir``: False unless the
    checkpoint's ``auto_map`` names foreign code and the caller trusts it; CheckpointError (one
    line naming the flag) when it names foreign code the caller does not trust. A checkpoint of
    the actprune architecture loads from actprune's classes, registered here."""
    if read_config(model_dir).get("model_type") == ACTPRUNE_MODEL_TYPE:
        register_classes()
    foreign = foreign_code(model_dir)
    if not foreign:
        return False
    if not trust_remote_code:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CheckpointError(f"{model_dir}: its auto_map would run Python code shipped with the checkpoint "
                              f"({shown}); pass {TRUST_FLAG} if you trust it")
    return True


def copy_side_file(src: Path, dst: Path) -> None:
    """Copy a tokenizer / generation file; a config's ``auto_map`` (foreign code) is left out."""
    data = _json(src) if src.name in CODE_CONFIGS else {}
    if "auto_map" not in data:
        shutil.copy2(src, dst)
        return
    data.pop("auto_map")
    atomic_write(dst, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_own_code(out: Path, config: dict[str, Any], copied_from: Path | None = None) -> dict[str, Any]:
    """Make the code of output directory ``out`` what actprune allows and return ``config`` with
    the matching ``auto_map``: the installed modeling files and :data:`AUTO_MAP` for the actprune
    architecture, no code otherwise. ``copied_from``: the source checkpoint, whose ``*.py``
    ``save_pretrained`` may have copied into ``out`` (it does for a model built from remote
    code); those copies are removed, other files in ``out`` are left alone."""
    same = copied_from is not None and copied_from.resolve() == out.resolve()
    for f in out.glob("*.py"):
        if f.name in MODELING_FILES or (copied_from is not None and not same and (copied_from / f.name).is_file()):
            f.unlink()
    tok = out / "tokenizer_config.json"
    if "auto_map" in _json(tok):  # written by save_pretrained of a tokenizer built from remote code
        copy_side_file(tok, tok)
    config = {k: v for k, v in config.items() if k != "auto_map"}
    if config.get("model_type") == ACTPRUNE_MODEL_TYPE:
        for name in MODELING_FILES:
            shutil.copy2(modeling_dir() / name, out / name)
        config["auto_map"] = dict(AUTO_MAP)
    return config


def _references(auto_map: Any) -> list[str | None]:
    """Every class reference in an ``auto_map``; None stands for a malformed entry."""
    if not isinstance(auto_map, dict):
        return [None]
    out: list[str | None] = []
    for value in auto_map.values():
        for ref in value if isinstance(value, list) else [value]:
            if ref is not None:  # tokenizers list [slow, fast]; either may be null
                out.append(ref if isinstance(ref, str) and "." in ref else None)
    return out


def _json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when it is missing or unreadable (transformers fails on it
    then, before any code runs)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
