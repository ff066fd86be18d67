"""The one reader of a checkpoint directory's ``config.json`` (stdlib only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ActpruneError

__all__ = ["CheckpointError", "read_config"]


class CheckpointError(ActpruneError):
    """A --model / --teacher directory that is not a usable checkpoint."""


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face checkpoint directory, as a dict."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json; pass a Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config
