"""Loading and writing Hugging Face checkpoint directories for the recovery commands.

A checkpoint may name custom code in ``auto_map`` (``config.json``, ``tokenizer_config.json``).
It runs only with ``trust_remote_code=True`` (``--trust-remote-code``); actprune's own modeling
files, which pruned checkpoints carry, are recognised by content and loaded from actprune's
classes without running the copy (:mod:`.trust`). Outputs never carry foreign code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from actprune.core.config import CheckpointError, read_config
from actprune.core.errors import ActpruneError

from .trust import copy_side_file, resolve_trust, write_own_code

__all__ = ["DeviceError", "compute_device", "finish_output_dir", "load_causal_lm", "load_config", "load_tokenizer",
           "publish_model_files"]


class DeviceError(ActpruneError):
    """A device that is not there, or a model that does not fit on it."""


def compute_device(name: str | None = None) -> torch.device:
    """The device an offline pass (sensitivity, refit, validation) runs its model on: ``name``
    ("cpu", "cuda", "cuda:1", …), or with None / "auto" the first GPU when one is visible, else
    the CPU. DeviceError when the device named is not there, before anything loads."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"--device {name}: only {n} CUDA GPU(s) are visible (cuda:0..cuda:{n - 1})")
    elif dev.type != "cpu":
        raise DeviceError(f"--device {name}: only cpu and cuda devices are supported")
    return dev


def load_causal_lm(
    model_dir: str | Path, dtype: torch.dtype | None = None, device_map: str | None = None,
    *, trust_remote_code: bool = False, device: str | None = None,
) -> Any:
    """The model in ``dtype`` (default: as stored), in eval mode, on CPU unless a
    ``device_map`` (e.g. "auto": layers spread over the visible GPUs) or a ``device`` (a name
    for :func:`compute_device`: the whole model moves there) is given. A model that does not
    fit on the GPU: with "auto" it stays on the CPU (a warning says so), with a GPU named a
    DeviceError gives its size. CheckpointError when the checkpoint names foreign code and
    ``trust_remote_code`` is False."""
    from transformers import AutoModelForCausalLM

    dev = None if device is None else compute_device(device)  # a bad name fails before the load
    cfg = read_config(model_dir)
    stored = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=dtype or getattr(torch, stored),
        trust_remote_code=resolve_trust(model_dir, trust_remote_code),
        **({"device_map": device_map} if device_map else {}),
    )
    if dev is not None and dev.type != "cpu":
        try:
            model.to(dev)
        except torch.OutOfMemoryError:
            model.to("cpu")  # the parameters that had moved come back
            torch.cuda.empty_cache()
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            dt = str(dtype or stored).removeprefix("torch.")
            msg = f"{model_dir}: the model ({size / 2**30:.2f} GiB in {dt}) does not fit on {dev}"
            if device != "auto":
                raise DeviceError(f"{msg}; use --device cpu, or a GPU with more memory") from None
            logging.getLogger(__name__).warning("%s; running on the CPU (slow; --device cpu skips the try)", msg)
    return model.eval()


def load_config(model_dir: str | Path, *, trust_remote_code: bool = False) -> tuple[Any, bool]:
    """(transformers config, the ``trust_remote_code`` to build the model from it with)."""
    from transformers import AutoConfig

    trust = resolve_trust(model_dir, trust_remote_code)
    return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust), trust


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    trust = resolve_trust(model_dir, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust)
    if tok.eos_token_id is None:
        raise CheckpointError(f"{model_dir}: the tokenizer has no EOS token; packing needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def finish_output_dir(src: str | Path, dst: str | Path) -> None:
    """Carry what ``save_pretrained`` may drop from ``src`` to ``dst`` — actprune's config keys,
    tokenizer/generation files not yet written — and settle ``dst``'s code: actprune's own
    modeling files for the actprune architecture, no foreign ``*.py`` or ``auto_map`` ever."""
    src, dst = Path(src), Path(dst)
    for f in src.iterdir():
        extra = f.name.startswith("tokenizer") or f.name in (
            "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
            "vocab.json", "merges.txt",
        )
        if f.is_file() and extra and not (dst / f.name).exists():
            copy_side_file(f, dst / f.name)
    src_cfg, dst_cfg = read_config(src), read_config(dst)
    for key, value in src_cfg.items():
        if key.startswith("actprune_") and key not in dst_cfg:
            dst_cfg[key] = value
    dst_cfg = write_own_code(dst, dst_cfg, copied_from=src)
    # transformers 5 writes "dtype"; vLLM and older transformers read "torch_dtype".
    if "dtype" in dst_cfg:
        dst_cfg["torch_dtype"] = dst_cfg["dtype"]
    (dst / "config.json").write_text(json.dumps(dst_cfg, indent=2, sort_keys=True) + "\n")


# Files of a model's weights: a new final model replaces all of them (a sharded one may leave
# names the new one does not use).
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
# Hugging Face weight file names (model.safetensors, model-00001-of-00002.safetensors, …): only
# these are the old model's; other safetensors in OUT are the run's own (the teacher's top-k
# cache of older runs, OUT/teacher_topk.safetensors, is reused by the next run on the same data).
_WEIGHT_PREFIXES = ("model", "pytorch_model")


def publish_model_files(staged: Path, out: Path) -> None:
    """Move the checkpoint files written in ``staged`` into ``out``, a directory that holds other
    things too (training checkpoints, logs), so that a kill at any point never leaves ``out``
    looking like a complete model that is not one: ``out/config.json`` goes first (without it
    nothing loads ``out``), then the old weights, then the new files, ``config.json`` last.
    A kill in between leaves ``out`` without a config, and the command run again writes it."""
    from actprune.core.files import fsync_dir

    (out / "config.json").unlink(missing_ok=True)
    fsync_dir(out)
    new = {f.name for f in staged.iterdir() if f.is_file()}
    for f in out.iterdir():
        if f.is_file() and f.name.startswith(_WEIGHT_PREFIXES) and f.name.endswith(_WEIGHT_SUFFIXES) \
                and f.name not in new:
            f.unlink()
    for name in sorted(new - {"config.json"}) + ["config.json"]:
        (staged / name).replace(out / name)
    fsync_dir(out)
