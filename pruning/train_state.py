"""Training checkpoints as safetensors + JSON (no pickle), for exact resume after a kill.

One checkpoint is a directory ``OUT/checkpoints/step-NNNNNN/``::

    weights.safetensors     trainable parameters (float32 master copies), by parameter name
    optimizer.safetensors   optimizer tensors, ``state.{param_index}.{key}``
    rng.safetensors         ``cpu`` and ``cuda.{i}`` generator states (uint8)
    state.json              step, optimizer param_groups and scalar state, early-stopping
                            counters, the recipe config, the log history

It is written to a temporary sibling and renamed into place, so a kill during saving leaves
the previous checkpoint intact and never a half-written one. The learning rate is a pure
function of the step and the data order a pure function of (seed, step), so the step alone
restores the scheduler and the data position.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_PREFIX = "step-"


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalar_state": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], blob: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    for pid, st in blob["scalar_state"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in blob["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s.cpu()
    return out


def save_checkpoint(
    root: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
    state: dict[str, Any], keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the ``keep`` newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(tmp / "weights.safetensors"))
    opt_tensors, opt_blob = _optimizer_split(opt)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_blob}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG in place; return the JSON state (with ``step``)."""
    weights = load_file(str(path / "weights.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise ValueError(
            f"{path}: checkpoint parameters do not match the model "
            f"({len(set(weights) ^ trainable)} differ); was it made with other options (--lora)?"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    state = json.loads((path / "state.json").read_text())
    opt.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer")))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return state
