"""Training checkpoints as safetensors + JSON (no pickle), for exact resume after a kill.

One checkpoint is a directory ``OUT/checkpoints/step-NNNNNN/``::

    weights.safetensors     trainable parameters (float32 master copies), by parameter name
    optimizer.safetensors   optimizer tensors, ``state.{param_index}.{key}``
    rng.safetensors         ``cpu`` and ``cuda.{i}`` generator states (uint8)
    state.json              step, optimizer param_groups and scalar state, early-stopping
                            state (best_val, best_step, bad_evals), the recipe config, the log

It is written to a temporary sibling and renamed into place, so a kill during saving leaves
the previous checkpoint intact and never a half-written one. The learning rate is a pure
function of the step and the data order a pure function of (seed, step), so the step alone
restores the scheduler and the data position.

With early stopping the weights of the best validation so far are staged on disk rather than
held in memory (they must survive a kill, and a 32B model's copy is 64 GB in bf16)::

    OUT/best/step-NNNNNN/weights.safetensors   trainable parameters in the output's dtype
                                               (LoRA adapters: float32, merged at the end)
    OUT/best/step-NNNNNN/best.json             {"step", "val_loss": the figure compared (the objective)}

written (atomically, like a checkpoint) at each new best. A best directory is kept while the
recipe or any kept checkpoint (``best_step`` in its ``state.json``) refers to it, so a resume
from either kept checkpoint finds its best; a best found after that checkpoint is found, and
written, again by the replay.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from actprune.core.errors import ActpruneError
from actprune.core.files import STAGING_MARK, read_json_record, staged_directory
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "EarlyStop",
    "changed_options",
    "copy_into",
    "latest_checkpoint",
    "load_best",
    "load_checkpoint",
    "delete_stale_best",
    "save_best",
    "save_checkpoint",
]

_PREFIX = "step-"
# Options that may change between a killed run and its resume without breaking exactness.
_RESUME_FREE = ("resume", "stop_after_steps", "save_every", "progress", "trust_remote_code")


@dataclass
class EarlyStop:
    """The best validation so far and the evaluations since; ``patience`` 0 never stops."""

    patience: int = 0
    best_val: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, step: int, val: float) -> bool:
        """Count the evaluation at ``step``; True when it is a new best."""
        if val < self.best_val:
            self.best_val, self.best_step, self.bad_evals = val, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "patience"}

    def restore(self, state: dict[str, Any]) -> None:
        self.best_val, self.bad_evals = state["best_val"], state["bad_evals"]
        self.best_step = state.get("best_step")  # absent in checkpoints older than best-keeping


def changed_options(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The config keys (beyond those free to change) that differ between save and resume.
    Keys the saved config lacks are options added since; it ran with their default."""
    return sorted(k for k in now if k not in _RESUME_FREE and k in saved and saved[k] != now[k])


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
    final = root / f"{_PREFIX}{step:06d}"
    with staged_directory(final) as tmp:
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, str(tmp / "weights.safetensors"))
        opt_tensors, opt_blob = _optimizer_split(opt)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_blob}))
    for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def copy_into(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy named tensors into ``model``'s parameters in place (cast to their dtype)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG in place; return the JSON state (with ``step``)."""
    weights = load_file(str(path / "weights.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise ActpruneError(
            f"{path}: checkpoint parameters do not match the model "
            f"({len(set(weights) ^ trainable)} differ); was it made with other options (--lora)?"
        )
    copy_into(model, weights)
    state = read_json_record(path / "state.json")
    if "optimizer" not in state:
        raise ActpruneError(f"{path / 'state.json'} cannot be read (torn or edited); resume from an earlier "
                         "checkpoint (remove this one) or rerun without --resume")
    opt.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer")))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return state


# ---- best weights (early stopping) -----------------------------------------------------------
def save_best(
    root: Path, ckpt_root: Path, step: int, weights: dict[str, torch.Tensor], val_loss: float
) -> Path:
    """Stage the weights of the new best evaluation, at ``step``, as ``root/step-NNNNNN``
    (atomically), then drop the bests no kept checkpoint under ``ckpt_root`` refers to."""
    final = root / f"{_PREFIX}{step:06d}"
    with staged_directory(final) as tmp:
        save_file({n: t.contiguous() for n, t in weights.items()}, str(tmp / "weights.safetensors"))
        (tmp / "best.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
    delete_stale_best(root, ckpt_root, step)
    return final


def load_best(root: Path, step: int) -> dict[str, torch.Tensor]:
    path = root / f"{_PREFIX}{step:06d}" / "weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the best weights of step {step} are missing; "
                                "rerun without --resume")
    return load_file(str(path))


def delete_stale_best(root: Path, ckpt_root: Path, current: int | None) -> None:
    """Remove staged best weights (and stale temporaries) of every step other than ``current``
    and the ``best_step`` of each kept checkpoint, which a resume from it will load."""
    keep = {current}
    for p in ckpt_root.glob(f"{_PREFIX}*/state.json"):
        # a checkpoint whose state cannot be read cannot be resumed: its best need not be kept
        keep.add(read_json_record(p).get("best_step"))
    for p in root.glob(f"{_PREFIX}*"):
        if int(p.name[len(_PREFIX):]) not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(f".{_PREFIX}*{STAGING_MARK}*"):  # left by a kill while staging
        shutil.rmtree(p, ignore_errors=True)
