"""Recovery fine-tuning recipe: setup → train → save → cleanup.

Plain fine-tuning minimises the language-model loss (next-token cross-entropy). With a
teacher (the unpruned original) the loss is the documented mix::

    loss = kd_alpha * T² * KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 - kd_alpha) * CE

averaged over predicted tokens (Hinton et al.; Minitron reports distillation recovers far more
than fine-tuning alone). One optimizer step is ``grad_accum`` micro-batches of ``batch_size``
packed rows. The learning rate is a pure function of the step (:func:`lr_at`) and the data
order a pure function of (seed, epoch), so a checkpoint's step restores both exactly.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from actprune.pruning import data as data_mod
from actprune.pruning.hf_io import finish_output_dir, load_causal_lm, load_tokenizer, read_config
from actprune.pruning.train_state import latest_checkpoint, load_checkpoint, save_checkpoint
from tqdm.auto import tqdm

__all__ = ["FinetuneConfig", "FinetuneRecipe", "kd_loss", "lm_loss", "lr_at", "main", "mixed_loss"]

# Options that may change between a killed run and its resume without breaking exactness.
_RESUME_FREE = ("resume", "stop_after_steps", "save_every", "progress")


@dataclass
class FinetuneConfig:
    model: str
    data: str
    output: str
    text_field: str | None = None
    val_data: str | None = None
    teacher: str | None = None
    max_steps: int | None = None  # default: epochs × steps per epoch
    epochs: int = 1
    lr: float = 2e-5
    schedule: str = "cosine"  # or "steps": epoch e uses epoch_lrs[e] (the last one repeats)
    epoch_lrs: list[float] = field(default_factory=list)  # default lr, lr/2, lr/4, ...
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    warmup_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 1024
    val_fraction: float = 0.05
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
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    kd_temperature: float = 1.0
    kd_alpha: float = 0.5
    seed: int = 0
    progress: bool = True
    stop_after_steps: int | None = None  # leave the loop as a kill would (tests of resume)


# ---- maths -----------------------------------------------------------------------------------
def lr_at(step: int, cfg: FinetuneConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    if cfg.schedule == "steps":
        lrs = cfg.epoch_lrs or [cfg.lr * 0.5**e for e in range(max(cfg.epochs, 1))]
        base = lrs[min(step // steps_per_epoch, len(lrs) - 1)]
        after = base
    else:
        base = cfg.lr
        floor = cfg.lr * cfg.min_lr_ratio
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        after = floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
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


def mixed_loss(lm: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * kd + (1.0 - alpha) * lm


# ---- recipe ----------------------------------------------------------------------------------
class FinetuneRecipe:
    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.best_val = math.inf
        self.bad_evals = 0
        self.stopped_early = False

    # -- setup --
    def setup(self) -> None:
        cfg = self.cfg
        _check(cfg)
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = load_tokenizer(cfg.model)
        self.stored_dtype = self.model_dtype(cfg.model)
        # Full fine-tuning keeps float32 master weights; under LoRA the frozen base stays in its
        # stored dtype (half the memory in bf16) and peft keeps the adapters in float32.
        dtype = self.stored_dtype if cfg.lora else torch.float32
        model = load_causal_lm(cfg.model, dtype, device_map=cfg.device_map)
        if cfg.device_map is None:
            model = model.to(self.device)
        self.device = next(model.parameters()).device  # where inputs go (first shard)
        if cfg.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                              target_modules="all-linear", task_type="CAUSAL_LM")
            model = get_peft_model(model, lcfg)
        self.model = model
        self.teacher = None
        if cfg.teacher:
            if read_config(cfg.teacher).get("vocab_size") != read_config(cfg.model).get("vocab_size"):
                raise data_mod.DataError("--teacher has another vocabulary than --model; distillation needs the same one")
            dtype = torch.bfloat16 if self.use_bf16 else torch.float32
            teacher = load_causal_lm(cfg.teacher, dtype, device_map=cfg.device_map)
            self.teacher = (teacher if cfg.device_map else teacher.to(self.device)).requires_grad_(False)
        self._setup_data()
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
        self.ckpt_root = self.out / "checkpoints"
        if cfg.resume:
            self._resume()

    @staticmethod
    def model_dtype(model_dir: str) -> torch.dtype:
        c = read_config(model_dir)
        return getattr(torch, c.get("torch_dtype") or c.get("dtype") or "float32")

    @property
    def use_bf16(self) -> bool:
        if not self.cfg.bf16:
            return False
        return self.device.type == "cpu" or torch.cuda.is_bf16_supported()

    def _setup_data(self) -> None:
        cfg = self.cfg
        texts = data_mod.load_texts(cfg.data, cfg.text_field, self.tok)
        if cfg.val_data:
            train, val = texts, data_mod.load_texts(cfg.val_data, cfg.text_field, self.tok)
        else:
            train, val = data_mod.split_train_val(texts, cfg.val_fraction, cfg.seed)
        eos = self.tok.eos_token_id
        self.train_rows = data_mod.pack(data_mod.tokenize(self.tok, train), cfg.seq_len, eos)  # (N, L)
        self.val_rows = None
        if val:
            try:
                self.val_rows = data_mod.pack(data_mod.tokenize(self.tok, val), cfg.seq_len, eos)
            except data_mod.DataError as e:
                raise data_mod.DataError(f"validation data: {e}; raise --val-fraction or lower --seq-len") from e
        per_step = cfg.batch_size * cfg.grad_accum
        self.steps_per_epoch = len(self.train_rows) // per_step
        if self.steps_per_epoch == 0:
            raise data_mod.DataError(
                f"{len(self.train_rows)} training rows of {cfg.seq_len} tokens: fewer than one step "
                f"(batch {cfg.batch_size} × accumulation {cfg.grad_accum}); lower --seq-len or add data"
            )
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

    def _resume(self) -> None:
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            tqdm.write(f"no checkpoint under {self.ckpt_root}; starting from step 0")
            return
        state = load_checkpoint(path, self.model, self.opt)
        saved = {k: v for k, v in state["config"].items() if k not in _RESUME_FREE}
        now = {k: v for k, v in asdict(self.cfg).items() if k not in _RESUME_FREE}
        changed = sorted(k for k in now if saved.get(k) != now[k])
        if changed:
            raise data_mod.DataError(f"cannot resume {path}: options changed since it was saved: {changed}")
        self.step = state["step"]
        self.history = state["history"]
        self.best_val = state["best_val"]
        self.bad_evals = state["bad_evals"]
        tqdm.write(f"resumed from {path} (step {self.step})")

    # -- train --
    def batch_rows(self, step: int) -> torch.Tensor:
        """The rows of optimizer step ``step``: (grad_accum · batch_size, L)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_rows), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        n = self.cfg.batch_size * self.cfg.grad_accum
        return self.train_rows[order[k * n : (k + 1) * n]]

    def autocast(self) -> AbstractContextManager[Any]:
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def losses(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast():
            logits = self.model(input_ids=ids).logits  # (B, T, V)
            out = {"lm_loss": lm_loss(logits, ids)}
            if self.teacher is not None:
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=ids).logits
                out["kd_loss"] = kd_loss(logits, t_logits, self.cfg.kd_temperature)
                out["loss"] = mixed_loss(out["lm_loss"], out["kd_loss"], self.cfg.kd_alpha)
            else:
                out["loss"] = out["lm_loss"]
        return out

    def train(self) -> None:
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc="finetune", unit="step",
                   disable=not cfg.progress)
        while self.step < self.total_steps and not self.stopped_early:
            if cfg.stop_after_steps is not None and self.step >= cfg.stop_after_steps:
                bar.close()
                return
            self.model.train()
            rows = self.batch_rows(self.step).to(self.device)
            sums: dict[str, float] = {}
            for micro in rows.split(cfg.batch_size):
                parts = self.losses(micro)
                (parts["loss"] / cfg.grad_accum).backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / cfg.grad_accum
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip).item()
            lr = lr_at(self.step, cfg, self.steps_per_epoch, self.total_steps)
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self.history.append({"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm})
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}")
            last = self.step == self.total_steps
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                self.evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                self.save_checkpoint()
        bar.close()

    @torch.no_grad()
    def evaluate(self) -> None:
        if self.val_rows is None:
            return
        self.model.eval()
        total, n = 0.0, 0
        for b, ids in enumerate(self.val_rows.split(self.cfg.batch_size)):
            if b >= self.cfg.max_val_batches:
                break
            with self.autocast():
                loss = lm_loss(self.model(input_ids=ids.to(self.device)).logits, ids.to(self.device))
            tokens = ids.shape[0] * (ids.shape[1] - 1)
            total += loss.item() * tokens
            n += tokens
        val = total / n
        self.history.append({"step": self.step, "val_loss": val, "val_ppl": math.exp(val)})
        tqdm.write(f"step {self.step}: validation loss {val:.4f}, perplexity {math.exp(val):.3f}")
        if val < self.best_val:
            self.best_val, self.bad_evals = val, 0
        else:
            self.bad_evals += 1
            if self.cfg.early_stop_patience and self.bad_evals >= self.cfg.early_stop_patience:
                tqdm.write(f"early stop: no improvement in {self.bad_evals} evaluations")
                self.stopped_early = True

    def save_checkpoint(self) -> None:
        state = {"config": asdict(self.cfg), "history": self.history,
                 "best_val": self.best_val, "bad_evals": self.bad_evals}
        save_checkpoint(self.ckpt_root, self.step, self.model, self.opt, state)
        self._write_log()

    def _write_log(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "finetune_log.jsonl").open("w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")

    # -- save --
    def save(self) -> Path:
        """Write a plain Hugging Face checkpoint (LoRA merged) in the input's dtype."""
        model = self.model.merge_and_unload() if self.cfg.lora else self.model
        model = model.to(self.stored_dtype)
        model.config.use_cache = True
        model.save_pretrained(str(self.out), safe_serialization=True)
        self.tok.save_pretrained(str(self.out))
        finish_output_dir(self.cfg.model, self.out)
        self._write_log()
        (self.out / "finetune_config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        return self.out

    def cleanup(self) -> None:
        self.teacher = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check(cfg: FinetuneConfig) -> None:
    positive = ("epochs", "batch_size", "grad_accum", "seq_len", "max_val_batches")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise data_mod.DataError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise data_mod.DataError("--max-steps must be >= 1")
    if cfg.schedule not in ("cosine", "steps"):
        raise data_mod.DataError(f"--schedule must be cosine or steps, got {cfg.schedule!r}")
    if not 0.0 <= cfg.kd_alpha <= 1.0 or cfg.kd_temperature <= 0:
        raise data_mod.DataError("--kd-alpha must be in [0, 1] and --kd-temperature > 0")
    if cfg.lr <= 0 or cfg.warmup_steps < 0:
        raise data_mod.DataError("--lr must be > 0 and --warmup-steps >= 0")


def main(cfg: FinetuneConfig) -> Path | None:
    """Run the recipe; returns the output directory, or None when stopped like a kill."""
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
        if cfg.stop_after_steps is not None and recipe.step < recipe.total_steps and not recipe.stopped_early:
            return None
        return recipe.save()
    finally:
        recipe.cleanup()
