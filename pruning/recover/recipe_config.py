"""What a recovery run is: its configuration (:class:`FinetuneConfig`, the fields of
``actprune finetune``), the learning-rate schedule and the losses, as pure functions.

The recipe itself (setup → train → save → cleanup) is :mod:`.finetune`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from actprune.pruning.data import DataError

__all__ = ["FinetuneConfig", "check_config", "kd_loss", "lm_loss", "loop_recovery", "lr_at", "mixed_loss", "val_record"]


@dataclass
class FinetuneConfig:
    model: str
    data: str
    output: str
    text_field: str | None = None
    val_data: str | None = None
    teacher: str | None = None
    max_steps: int | None = None  # default: epochs × steps per epoch
    # None: picked from the data (actprune.pruning.recover.sizing), then filled in by setup
    epochs: int | None = None
    lr: float = 2e-5
    schedule: str = "cosine"  # or "steps": epoch e uses epoch_lrs[e] (the last one repeats)
    epoch_lrs: list[float] = field(default_factory=list)  # default lr, lr/2, lr/4, ...
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    warmup_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    seq_len: int | None = None
    val_fraction: float | None = None
    max_val_batches: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0
    grad_checkpointing: bool = False
    bf16: bool = False
    eval_every: int = 0  # 0: evaluate once, at the end
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0: off
    save_every: int = 0  # 0: no intermediate checkpoints
    resume: bool = False
    device_map: str | None = None  # "auto": spread layers over all visible GPUs (one process)
    fsdp: bool = False  # one process per GPU under torchrun, model sharded with FSDP2
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    kd_temperature: float = 1.0
    kd_alpha: float = 0.5
    teacher_topk: int = 0  # > 0: the teacher's top-k cached on disk in one pass (teacher_cache.py)
    kd_hidden: float = 0.0  # > 0: weight of the per-layer hidden-state loss (features.py); needs the live teacher
    local_steps: int = 0  # > 0: block-wise distillation of each layer first (blockwise.py), steps per layer
    local_lr: float = 3e-4
    local_tokens: int = 16384  # training tokens the local stage stores layer inputs/outputs for
    teacher_cache: str | None = None  # where; default OUT/cache/teacher_topk.safetensors
    mix_data: str | None = None  # general text mixed into the training rows (recipe_data)
    mix_share: float = 0.25  # its share of the training tokens
    seed: int = 0
    trust_remote_code: bool = False  # run code named by --model/--teacher's auto_map (not actprune's own)
    progress: bool = True
    stop_after_steps: int | None = None  # leave the loop as a kill would (tests of resume)


# ---- maths -----------------------------------------------------------------------------------
def lr_at(step: int, cfg: FinetuneConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then the schedule.
    ``cfg``'s sizes are those the recipe filled in (sizing): a warm-up left None is none."""
    warmup = cfg.warmup_steps or 0
    if cfg.schedule == "steps":
        lrs = cfg.epoch_lrs or [cfg.lr * 0.5**e for e in range(max(cfg.epochs or 1, 1))]
        base = lrs[min(step // steps_per_epoch, len(lrs) - 1)]
        after = base
    else:
        base = cfg.lr
        floor = cfg.lr * cfg.min_lr_ratio
        progress = (step - warmup) / max(1, total_steps - warmup)
        after = floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if step < warmup:
        return base * (step + 1) / warmup
    return after


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits: (B, T, V); ids: (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student) at temperature T, mean over the predicting positions.
    student, teacher: (B, T, V) logits; the last position predicts nothing and is left out."""
    s = F.log_softmax(student[:, :-1].float() / temperature, dim=-1)  # (B, T-1, V)
    t = F.log_softmax(teacher[:, :-1].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T-1)
    return kl.mean() * temperature**2


def mixed_loss(lm: torch.Tensor, kd: torch.Tensor, alpha: float, feature: torch.Tensor | None = None,
               beta: float = 0.0) -> torch.Tensor:
    """alpha · KD + (1 − alpha) · LM, plus beta · the hidden-state loss when given."""
    loss = alpha * kd + (1.0 - alpha) * lm
    return loss if feature is None else loss + beta * feature


def val_record(means: dict[str, float], temperature: float) -> dict[str, float]:
    """One validation's figures from the mean losses per predicted token (the keys of the
    recipe's ``losses``): the LM loss and its perplexity; with a teacher (``kd_loss`` present)
    also KL(teacher ‖ student) at temperature T (the KD term ÷ T²) and the training objective;
    with ``--kd-hidden`` the hidden-state loss (``val_feature``)."""
    rec = {"val_loss": means["lm_loss"], "val_ppl": math.exp(means["lm_loss"])}
    if "kd_loss" in means:
        rec["val_kl"] = means["kd_loss"] / temperature**2
        rec["val_objective"] = means["loss"]
    if "feature_loss" in means:
        rec["val_feature"] = means["feature_loss"]
    return rec


def check_config(cfg: FinetuneConfig) -> None:
    """DataError naming the first field out of range (sizes left None are picked later)."""
    positive = ("epochs", "batch_size", "grad_accum", "seq_len", "max_val_batches")
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.seq_len is not None and cfg.seq_len < 2:
        raise DataError("--seq-len must be >= 2")
    if cfg.val_fraction is not None and not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise DataError("--max-steps must be >= 1")
    if cfg.schedule not in ("cosine", "steps"):
        raise DataError(f"--schedule must be cosine or steps, got {cfg.schedule!r}")
    if not 0.0 <= cfg.kd_alpha <= 1.0 or cfg.kd_temperature <= 0:
        raise DataError("--kd-alpha must be in [0, 1] and --kd-temperature > 0")
    if cfg.teacher_topk < 0 or (cfg.teacher_topk and not cfg.teacher):
        raise DataError("--teacher-topk must be >= 0 and needs --teacher")
    if cfg.kd_hidden < 0 or (cfg.kd_hidden and not cfg.teacher):
        raise DataError("--kd-hidden must be >= 0 and needs --teacher")
    if cfg.kd_hidden and cfg.fsdp:
        raise DataError("--kd-hidden is not supported with --fsdp yet: run in one process (--device-map auto for "
                        "a model larger than one GPU)")
    if cfg.local_steps < 0 or (cfg.local_steps and not cfg.teacher):
        raise DataError("--local-steps must be >= 0 and needs --teacher")
    if cfg.local_steps and (cfg.fsdp or cfg.lora or cfg.device_map):
        raise DataError("--local-steps runs in one process on full weights: not with --fsdp, --lora or --device-map")
    if cfg.teacher_topk and cfg.fsdp:
        raise DataError("--teacher-topk is not supported with --fsdp yet: distil from the live teacher "
                        "(drop --teacher-topk), or run in one process")
    if cfg.lr <= 0 or (cfg.warmup_steps is not None and cfg.warmup_steps < 0):
        raise DataError("--lr must be > 0 and --warmup-steps >= 0")
    if cfg.mix_data and not 0.0 < cfg.mix_share < 1.0:
        raise DataError(f"--mix-share must be in (0, 1), got {cfg.mix_share}")
    if cfg.mix_data and cfg.mix_data in (cfg.data, cfg.val_data):
        raise DataError(f"--mix-data {cfg.mix_data} is the training or validation data: give general text of "
                        "other domains")


def loop_recovery(steps: int, **overrides: object) -> dict[str, object]:
    """FinetuneConfig fields of the short recovery that ``run_pipeline`` and ``actprune
    iterate`` run between pruning steps (``overrides`` win): a 10 % warm-up, lr 1e-4, small
    batches of 256-token rows."""
    return {"max_steps": steps, "warmup_steps": max(1, steps // 10), "lr": 1e-4, "batch_size": 4,
            "seq_len": 256, "max_val_batches": 4, **overrides}
