"""Recovery fine-tuning recipe: setup → train → save → cleanup.

Plain fine-tuning minimises the language-model loss (next-token cross-entropy). With a
teacher (the unpruned original) the loss is the documented mix::

    loss = kd_alpha * T² * KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 - kd_alpha) * CE
           [+ kd_hidden * hidden-state loss (per layer, :mod:`.features`)]

averaged over predicted tokens (Hinton et al.; Minitron reports distillation recovers far more
than fine-tuning alone). One optimizer step is ``grad_accum`` micro-batches of ``batch_size``
packed rows. The learning rate is a pure function of the step (:func:`lr_at`) and the data
order a pure function of (seed, epoch) (:mod:`.recipe_data`), so a checkpoint's step restores
both exactly.

Validation scores the training losses on its rows: ``val_loss``/``val_ppl`` (LM) and, with a
teacher, ``val_kl`` (KL at T; on k + 1 outcomes under ``--teacher-topk``, whose cache then holds
the validation rows too) and ``val_objective`` (the mix), which early stopping follows: the
calibration domain's perplexity rewards adaptation to that domain, not recovery.

With ``--early-stop-patience`` the output holds the weights of the best validation, staged
under ``OUT/best/`` when found (see :mod:`actprune.pruning.recover.train_state`); the log's last
record names the step kept. ``--fsdp`` runs the same recipe in every process of a torchrun
launch (:mod:`actprune.pruning.recover.distributed`): rank ``r`` of ``W`` trains on its block of
``batch_size`` rows of each micro-batch of ``W · batch_size`` rows.
"""

from __future__ import annotations

import json
import shutil
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from actprune.core.files import atomic_write, staged_directory
from actprune.pruning import data as data_mod
from actprune.pruning.checkpoint.hf_io import (
    finish_output_dir,
    load_causal_lm,
    load_tokenizer,
    publish_model_files,
    read_config,
)
from actprune.pruning.checkpoint.trust import resolve_trust
from actprune.pruning.recover import teacher_cache as tc
from actprune.pruning.recover import train_state as ts
from actprune.pruning.recover.features import feature_loss, recorders
from actprune.pruning.recover.recipe_config import (
    FinetuneConfig,
    check_config,
    kd_loss,
    lm_loss,
    lr_at,
    mixed_loss,
    val_record,
)
from actprune.pruning.recover.recipe_data import RecipeData
from tqdm.auto import tqdm

__all__ = ["FinetuneConfig", "FinetuneRecipe", "main"]


# ---- recipe ----------------------------------------------------------------------------------
class FinetuneRecipe(RecipeData):
    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.early = ts.EarlyStop(cfg.early_stop_patience)
        self.rank, self.world, self.is_main = 0, 1, True  # set by the distributed recipe
        self.best_root = self.out / "best"
        self.teacher = self.live_teacher = self.features = None  # set up by setup()
        self.ckpt_root = self.out / "checkpoints"

    def _say(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg)

    # -- setup --
    def setup(self) -> None:
        cfg = self.cfg
        check_config(cfg)
        for d in (cfg.model, cfg.teacher):  # refuse untrusted checkpoint code before loading anything
            if d:
                resolve_trust(d, cfg.trust_remote_code)
        torch.manual_seed(cfg.seed)
        self.device = self._init_device()
        self.tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self._setup_data()  # before the models: data too small fails fast
        cfg = self.cfg  # with the sizes picked from the data
        self.stored_dtype = self.model_dtype(cfg.model)
        self.model = self._build_student()
        self.teacher, self.teacher_topk, self.live_teacher = None, None, None
        if cfg.teacher:
            if read_config(cfg.teacher).get("vocab_size") != read_config(cfg.model).get("vocab_size"):
                raise data_mod.DataError("--teacher has another vocabulary than --model; distillation needs the same one")
            if not cfg.teacher_topk or cfg.kd_hidden:  # the hidden-state loss needs the teacher in memory
                self.live_teacher = self._build_teacher(torch.bfloat16 if self.use_bf16 else torch.float32)
            if not cfg.teacher_topk:
                self.teacher = self.live_teacher  # the logit KL from it too
        if cfg.kd_hidden:
            self.features = recorders(self.model, self.live_teacher, cfg.model)
            self._say(f"hidden-state loss on {len(self.features[0])} layer pairs, weight {cfg.kd_hidden:g}")
        if cfg.local_steps and not (cfg.resume and ts.latest_checkpoint(self.ckpt_root)):
            self._local_stage()  # a resumed run's checkpoint already holds its effect
        if cfg.teacher_topk:
            self.teacher_topk = self._teacher_cache()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
        if cfg.resume:
            self._resume()

    def _init_device(self) -> torch.device:
        from actprune.pruning.checkpoint.hf_io import compute_device

        return compute_device()

    @property
    def train_dtype(self) -> torch.dtype:
        # Full fine-tuning keeps float32 master weights; under LoRA the frozen base stays in its
        # stored dtype (half the memory in bf16) and peft keeps the adapters in float32.
        return self.stored_dtype if self.cfg.lora else torch.float32

    def _build_student(self) -> Any:
        model = load_causal_lm(self.cfg.model, self.train_dtype, device_map=self.cfg.device_map,
                               trust_remote_code=self.cfg.trust_remote_code)
        if self.cfg.device_map is None:
            model = model.to(self.device)
        self.device = next(model.parameters()).device  # where inputs go (first shard)
        return self.prepare(model)

    def prepare(self, model: Any) -> Any:
        """Gradient checkpointing, no KV cache, LoRA adapters (their init draws from the RNG)."""
        cfg = self.cfg
        if cfg.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                              target_modules="all-linear", task_type="CAUSAL_LM")
            model = get_peft_model(model, lcfg)
        return model

    def _build_teacher(self, dtype: torch.dtype) -> Any:
        teacher = load_causal_lm(self.cfg.teacher, dtype, device_map=self.cfg.device_map,
                                 trust_remote_code=self.cfg.trust_remote_code)
        return (teacher if self.cfg.device_map else teacher.to(self.device)).requires_grad_(False)

    def _local_stage(self) -> None:
        """Block-wise distillation of every layer before global training (blockwise.py)."""
        from actprune.pruning.recover.blockwise import blockwise_distill

        cfg = self.cfg
        teacher = self.live_teacher or self._build_teacher(torch.float32)
        report = blockwise_distill(self.model, teacher, self.train_rows, steps=cfg.local_steps, lr=cfg.local_lr,
                                   batch_size=cfg.batch_size, max_tokens=cfg.local_tokens,
                                   progress=cfg.progress and self.is_main)
        before = sum(r["heldout_before"] for r in report) / len(report)
        after = sum(r["heldout_after"] for r in report) / len(report)
        self.history.append({"step": 0, "local": report})
        self._say(f"local stage: mean held-out layer error {before:.4f} -> {after:.4f} "
                  f"({cfg.local_steps} steps per layer)")

    def _teacher_cache(self) -> tc.TeacherCache:
        """The teacher's top-k over the training rows the run reads: the file of an earlier run when
        it was built for the same rows, k, T and teacher, else one pass of the teacher (then let go)."""
        cfg = self.cfg
        # Not beside the output's weights: vLLM loads every *.safetensors at a model's top level.
        path = Path(cfg.teacher_cache) if cfg.teacher_cache else self.out / "cache" / "teacher_topk.safetensors"
        key = {"k": cfg.teacher_topk, "temperature": cfg.kd_temperature, "teacher_id": tc.teacher_id(cfg.teacher)}
        rows = self.visited_rows()
        if self.val_rows is not None:  # validation scores the KL too: (≤ N + M, L)
            rows = torch.cat([rows, torch.cat(self.val_batches())])
        cache = tc.TeacherCache.open_if_valid(path, rows, **key)
        if cache is None:
            teacher = self._build_teacher(torch.bfloat16 if self.use_bf16 else torch.float32)
            with self.autocast():
                tc.build_cache(teacher, rows, path, batch_size=cfg.batch_size, device=self.device,
                               progress=cfg.progress and self.is_main, **key)
            del teacher
            cache = tc.TeacherCache(path, rows)
            self._say(f"teacher top-{cfg.teacher_topk} written to {path}")
        else:
            self._say(f"teacher top-{cfg.teacher_topk} reused from {path}")
        return cache

    @staticmethod
    def model_dtype(model_dir: str) -> torch.dtype:
        c = read_config(model_dir)
        return getattr(torch, c.get("torch_dtype") or c.get("dtype") or "float32")

    @property
    def use_bf16(self) -> bool:
        if not self.cfg.bf16:
            return False
        return self.device.type == "cpu" or torch.cuda.is_bf16_supported()

    def _resume(self) -> None:
        path = ts.latest_checkpoint(self.ckpt_root)
        if path is None:
            self._say(f"no checkpoint under {self.ckpt_root}; starting from step 0")
            return
        state = ts.load_checkpoint(path, self.model, self.opt)
        changed = ts.changed_options(state["config"], asdict(self.cfg))
        if changed:
            raise data_mod.DataError(f"cannot resume {path}: options changed since it was saved: {changed}")
        self.step, self.history = state["step"], state["history"]
        self.early.restore(state)
        self._say(f"resumed from {path} (step {self.step})")

    # -- train --
    def _clip(self, params: list[torch.nn.Parameter]) -> float:
        return torch.nn.utils.clip_grad_norm_(params, self.cfg.clip).item()

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def autocast(self) -> AbstractContextManager[Any]:
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def losses(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        with self.autocast():
            if self.features is None:
                logits = self.model(input_ids=ids).logits  # (B, T, V)
            else:  # the layers' outputs too, and the live teacher's on the same ids
                with self.features[0].recording() as s_states:
                    logits = self.model(input_ids=ids).logits
                with torch.no_grad(), self.features[1].recording() as t_states:
                    if self.teacher is None:  # the KL comes from the top-k cache: the backbone alone, no lm_head
                        self.live_teacher.base_model(input_ids=ids)
                    else:
                        t_logits = self.live_teacher(input_ids=ids).logits
            out = {"lm_loss": lm_loss(logits, ids)}
            feature = None if self.features is None else feature_loss(s_states, t_states)
            if feature is not None:
                out["feature_loss"] = feature
            if self.teacher is not None:
                if self.features is None:
                    with torch.no_grad():
                        t_logits = self.teacher(input_ids=ids).logits
                out["kd_loss"] = kd_loss(logits, t_logits, cfg.kd_temperature)
            elif self.teacher_topk is not None:
                t_logprobs, t_indices = self.teacher_topk.lookup(ids)
                out["kd_loss"] = tc.topk_kd_loss(logits, t_logprobs, t_indices, cfg.kd_temperature)
            if "kd_loss" in out:
                out["loss"] = mixed_loss(out["lm_loss"], out["kd_loss"], cfg.kd_alpha, feature, cfg.kd_hidden)
            else:
                out["loss"] = out["lm_loss"]
        return out

    def train(self) -> None:
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc="finetune", unit="step",
                   disable=not (cfg.progress and self.is_main))
        while self.step < self.total_steps and not self.early.stop:
            if cfg.stop_after_steps is not None and self.step >= cfg.stop_after_steps:
                bar.close()
                return
            self.model.train()
            sums: dict[str, float] = {}
            for micro in self.micro_batches(self.step):
                parts = self.losses(micro.to(self.device))
                (parts["loss"] / cfg.grad_accum).backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / cfg.grad_accum
            sums = self._mean_over_ranks(sums)
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = self._clip(params)
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

    @property
    def val_key(self) -> str:
        """The validation figure early stopping compares: the training objective."""
        return "val_objective" if self.cfg.teacher else "val_loss"

    @torch.no_grad()
    def evaluate(self) -> None:
        if self.val_rows is None:
            return
        self.model.eval()
        sums, n = self._val_sums()
        rec = val_record({k: v / n for k, v in sums.items()}, self.cfg.kd_temperature)
        self.history.append({"step": self.step, **rec})
        extra = f", KL to the teacher {rec['val_kl']:.4f}, objective {rec['val_objective']:.4f}" if "val_kl" in rec else ""
        self._say(f"step {self.step}: validation loss {rec['val_loss']:.4f}, perplexity {rec['val_ppl']:.3f}{extra}")
        val = rec[self.val_key]
        if self.early.update(self.step, val) and self.early.patience:
            weights = self.trainable_state()  # collective under FSDP: every rank calls it
            if weights is not None:
                ts.save_best(self.best_root, self.ckpt_root, self.step, weights, val)
        if self.early.stop:
            self._say(f"early stop: no improvement in {self.early.bad_evals} evaluations")

    def _val_sums(self) -> tuple[dict[str, float], float]:
        """({loss name: Σ loss · tokens}, Σ tokens) over the validation batches: the losses of
        :meth:`losses` (LM; with a teacher also the KD term and the objective), same rows."""
        sums: dict[str, float] = {}
        n = 0
        for ids in self.val_batches():
            ids = ids.to(self.device)  # (B, L)
            tokens = ids.shape[0] * (ids.shape[1] - 1)
            for k, v in self.losses(ids).items():
                sums[k] = sums.get(k, 0.0) + v.item() * tokens
            n += tokens
        return sums, n

    def trainable_state(self) -> dict[str, torch.Tensor] | None:
        """Trainable parameters on CPU in the dtype the output gets (LoRA adapters: float32,
        merged later); None on ranks other than 0."""
        dtype = None if self.cfg.lora else self.stored_dtype
        return {n: p.detach().to("cpu", dtype, copy=True)
                for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> None:
        state = {"config": asdict(self.cfg), "history": self.history, **self.early.state()}
        ts.save_checkpoint(self.ckpt_root, self.step, self.model, self.opt, state)
        if self.early.patience:
            ts.delete_stale_best(self.best_root, self.ckpt_root, self.early.best_step)
        self._write_log()

    def _write_log(self) -> None:
        atomic_write(self.out / "finetune_log.jsonl", "".join(json.dumps(rec) + "\n" for rec in self.history))

    # -- save --
    def save(self) -> Path:
        """Write a plain Hugging Face checkpoint (LoRA merged) in the input's dtype: the weights
        of the best validation under early stopping, else the last ones."""
        best = self.early.best_step if self.early.patience else None
        if best is None:
            self.history.append({"kept_step": self.step, "kept": "last"})
        else:
            self.history.append({"kept_step": best, "kept": "best", f"kept_{self.val_key}": self.early.best_val})
        model = self.final_model(best)
        if model is None:  # not rank 0
            return self.out
        model = model.merge_and_unload() if self.cfg.lora else model
        model = model.to(self.stored_dtype)
        model.config.use_cache = True
        # Written whole beside the run's state, then moved in config last (publish_model_files):
        # a kill while writing never leaves OUT looking like a complete model.
        with staged_directory(self.out / ".final") as staged:
            model.save_pretrained(str(staged), safe_serialization=True)
            self.tok.save_pretrained(str(staged))
            finish_output_dir(self.cfg.model, staged)
            (staged / "finetune_config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        publish_model_files(self.out / ".final", self.out)
        shutil.rmtree(self.out / ".final", ignore_errors=True)
        self._write_log()
        return self.out

    def final_model(self, best_step: int | None) -> Any:
        """The model to write, holding the weights of ``best_step`` when given."""
        if best_step is not None:
            ts.copy_into(self.model, ts.load_best(self.best_root, best_step))
        return self.model

    def cleanup(self) -> None:
        if self.features is not None:
            for rec in self.features:
                rec.remove()
        self.teacher = self.live_teacher = self.features = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(cfg: FinetuneConfig) -> Path | None:
    """Run the recipe; returns the output directory, or None when stopped like a kill (and on
    ranks other than 0 under ``--fsdp``)."""
    if cfg.fsdp:
        from actprune.pruning.recover.distributed import DistributedRecipe

        recipe: FinetuneRecipe = DistributedRecipe(cfg)
    else:
        recipe = FinetuneRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
        if cfg.stop_after_steps is not None and recipe.step < recipe.total_steps and not recipe.early.stop:
            return None
        out = recipe.save()  # every rank: gathering the sharded weights is collective
        return out if recipe.is_main else None
    finally:
        recipe.cleanup()
