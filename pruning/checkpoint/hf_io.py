"""Loading and writing Hugging Face checkpoint directories for the recovery commands.

A checkpoint may carry custom modeling code (``auto_map`` in ``config.json`` plus ``*.py``
files, as a sliced model with per-layer widths does); such inputs are loaded with
``trust_remote_code`` and their code and ``auto_map`` travel to every output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from actprune.core.config import CheckpointError, read_config

__all__ = ["finish_output_dir", "load_causal_lm", "load_tokenizer", "needs_remote_code"]


def needs_remote_code(model_dir: str | Path) -> bool:
    return "auto_map" in read_config(model_dir)


def load_causal_lm(
    model_dir: str | Path, dtype: torch.dtype | None = None, device_map: str | None = None
) -> Any:
    """The model in ``dtype`` (default: as stored), in eval mode, on CPU unless a
    ``device_map`` (e.g. "auto": layers spread over the visible GPUs) is given."""
    from transformers import AutoModelForCausalLM

    cfg = read_config(model_dir)
    stored = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=dtype or getattr(torch, stored),
        trust_remote_code="auto_map" in cfg,
        **({"device_map": device_map} if device_map else {}),
    )
    return model.eval()


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=needs_remote_code(model_dir))
    if tok.eos_token_id is None:
        raise CheckpointError(f"{model_dir}: the tokenizer has no EOS token; packing needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def finish_output_dir(src: str | Path, dst: str | Path) -> None:
    """Carry what ``save_pretrained`` may drop from ``src`` to ``dst``: custom code files,
    ``auto_map``, actprune's config keys, and tokenizer/generation files not yet written."""
    src, dst = Path(src), Path(dst)
    for f in src.iterdir():
        extra = f.suffix == ".py" or f.name.startswith("tokenizer") or f.name in (
            "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
            "vocab.json", "merges.txt",
        )
        if f.is_file() and extra and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
    src_cfg, dst_cfg = read_config(src), read_config(dst)
    for key, value in src_cfg.items():
        if (key == "auto_map" or key.startswith("actprune_")) and key not in dst_cfg:
            dst_cfg[key] = value
    # transformers 5 writes "dtype"; vLLM and older transformers read "torch_dtype".
    if "dtype" in dst_cfg:
        dst_cfg["torch_dtype"] = dst_cfg["dtype"]
    (dst / "config.json").write_text(json.dumps(dst_cfg, indent=2, sort_keys=True) + "\n")
