"""The fine-tuning recipe in every process of a torchrun launch, the model sharded with FSDP2.

    torchrun --nproc-per-node 8 $(which actprune) finetune --fsdp --model pruned/ ...

Contract, for ``W`` processes (ranks) with ``--batch-size B --grad-accum A``:

- **Process group** from torchrun's environment: NCCL on CUDA (one GPU per rank, the node-local
  rank's), gloo on CPU.
- **Sharding.** ``fully_shard`` (FSDP2) on every decoder layer (the classes a Hugging Face model
  lists in ``_no_split_modules``), then on the root; parameters, gradients and AdamW moments
  are split over the ranks. Every rank builds the model on the meta device; only rank 0 reads
  the checkpoint (into CPU memory, in its stored dtype) and broadcasts each rank its shards.
  With ``--bf16``, parameters are gathered in bf16 and gradients reduced in float32
  (``MixedPrecisionPolicy``); master weights and moments stay float32.
- **Teacher.** Sharded the same way (no optimizer): each rank holds 1/W of it.
- **Data.** Step ``s`` takes the same ``A·W·B`` rows as one process with batch ``W·B`` would
  (a pure function of seed and epoch); micro-batch ``m`` is rows ``[m·W·B, (m+1)·W·B)`` and
  rank ``r`` trains on its ``r``-th block of ``B``. Each rank's loss is a mean over its
  ``B·(T-1)`` tokens and FSDP averages gradients over ranks, so the gradient equals the
  one-process gradient over ``W·B`` rows (up to float summation order).
- **Clipping** uses the global norm (the DTensor norm reduced over shards).
- **Validation** batches of ``W·B`` rows are split the same way; token-weighted sums are
  all-reduced, so every rank sees the same loss and takes the same early-stopping decision.
- **Output.** Saving gathers a full state dict onto rank 0's CPU; rank 0 alone writes the
  Hugging Face checkpoint, the log, the best weights and the progress bar.

Not supported yet: ``--resume`` / ``--save-every`` (sharded optimizer checkpoints) and
``--device-map``; they are refused with a message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from actprune.core.config import CheckpointError
from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_config
from actprune.pruning.data import DataError
from actprune.pruning.recover.finetune import FinetuneRecipe
from actprune.pruning.recover.train_state import copy_into, load_best
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

__all__ = ["DistributedRecipe", "shard"]

_LAUNCH = "torchrun --nproc-per-node N $(which actprune) finetune ... --fsdp"


def shard(model: nn.Module, mesh: DeviceMesh, mp: MixedPrecisionPolicy | None = None) -> None:
    """FSDP2 on each decoder layer, then on the root (embeddings, final norm, LM head)."""
    classes: set[str] = set()
    for m in model.modules():  # a PeftModel wraps the PreTrainedModel that names its layers
        classes |= set(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise CheckpointError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    kw: dict[str, Any] = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


class DistributedRecipe(FinetuneRecipe):
    """:class:`FinetuneRecipe` with FSDP2 sharding, one process per rank (see module doc)."""

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.resume or cfg.save_every:
            raise DataError("--resume and --save-every are not supported with --fsdp yet; leave them out")
        if cfg.device_map:
            raise DataError("--device-map is for one process; with --fsdp every GPU runs its own process")
        super().setup()

    def _init_device(self) -> torch.device:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(dist.get_node_local_rank(fallback_rank=0))
        try:
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        except ValueError as e:  # RANK, WORLD_SIZE, MASTER_ADDR... are unset
            raise DataError(f"--fsdp runs under torchrun: {_LAUNCH} ({e})") from e
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.mesh = init_device_mesh(device.type, (self.world,))
        return device

    # -- models --
    def _build_student(self) -> Any:
        mp = None
        if self.use_bf16:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return self._load_sharded(self.cfg.model, self.train_dtype, self.prepare, mp)

    def _build_teacher(self, dtype: torch.dtype) -> Any:
        teacher = self._load_sharded(self.cfg.teacher, dtype, lambda m: m.requires_grad_(False), None)
        return teacher.eval()

    def _load_sharded(
        self, path: str, dtype: torch.dtype, prepare: Callable[[Any], Any], mp: MixedPrecisionPolicy | None
    ) -> Any:
        from transformers import AutoModelForCausalLM

        trust = self.cfg.trust_remote_code
        # Rank 0 builds the real model first, so LoRA's init draws what one process draws. It
        # reads the stored dtype; loading the state dict casts into the (float32) shards.
        full = prepare(load_causal_lm(path, trust_remote_code=trust)) if self.is_main else None
        with torch.device("meta"):
            config, remote = load_config(path, trust_remote_code=trust)
            model = prepare(AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=remote))
        shard(model, self.mesh, mp)
        model.to_empty(device=self.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full.state_dict() if full is not None else {}, options=options)
        # Non-persistent buffers (rotary inv_freq) are not in the state dict: send rank 0's.
        buffers = dict(full.named_buffers()) if full is not None else {}
        for name, buf in model.named_buffers():
            if full is not None:
                buf.copy_(buffers[name])
            dist.broadcast(buf, src=0)
        return model

    # -- train --
    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """This rank's block of each micro-batch: (A·W·B, L) → A × (B, L)."""
        b = self.cfg.batch_size
        rows = self.batch_rows(step)  # (A·W·B, L), as one process with batch W·B
        return [m[self.rank * b : (self.rank + 1) * b] for m in rows.split(b * self.world)]

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = list(values)  # the same insertion order on every rank
        total = self._sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        return {k: v / self.world for k, v in zip(keys, total.tolist(), strict=True)}

    def _clip(self, params: list[nn.Parameter]) -> float:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if isinstance(norm, DTensor):  # each rank has the norm of its shards: reduce to the model's
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, self.cfg.clip, norm)
        return norm.item()

    def _val_sums(self) -> tuple[dict[str, float], float]:
        b = self.cfg.batch_size
        keys: list[str] = []  # the same on every rank: the losses of one configuration
        sums = None  # (Σ loss · tokens per key..., Σ tokens) of this rank
        for ids in self.val_rows.split(b * self.world)[: self.cfg.max_val_batches]:
            mine = ids[self.rank * b : (self.rank + 1) * b]  # (≤B, L)
            # A rank with no rows in a short last batch still runs the forward, weighted 0:
            # FSDP gathers each layer's weights inside it, every rank taking part.
            weight = 1 if len(mine) else 0
            mine = (mine if weight else ids[:1]).to(self.device)
            parts = self.losses(mine)
            keys = list(parts)
            tokens = weight * mine.shape[0] * (mine.shape[1] - 1)
            vec = torch.tensor([parts[k].item() * tokens for k in keys] + [tokens], dtype=torch.float64)
            sums = vec if sums is None else sums + vec
        total = self._sum(sums).tolist()
        return dict(zip(keys, total[:-1], strict=True)), total[-1]

    # -- save --
    def trainable_state(self) -> dict[str, torch.Tensor] | None:
        """Collective: gathers every parameter onto rank 0's CPU, one tensor at a time."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=options)  # {} on other ranks
        if not self.is_main:
            return None
        dtype = None if self.cfg.lora else self.stored_dtype
        out = {}
        for name in list(full):  # pop as we cast: one float32 copy of the model at most
            t = full.pop(name)
            if name in names:
                out[name] = t.to(dtype) if dtype else t
        return out

    def final_model(self, best_step: int | None) -> Any:
        """On rank 0, an unsharded CPU model with the final (or best) trainable weights; the
        frozen ones (LoRA's base) are the checkpoint's own."""
        weights = self.trainable_state() if best_step is None else None
        if not self.is_main:
            return None
        if weights is None:
            weights = load_best(self.best_root, best_step)
        model = self.prepare(load_causal_lm(self.cfg.model, trust_remote_code=self.cfg.trust_remote_code))
        copy_into(model, weights)
        return model

    def cleanup(self) -> None:
        super().cleanup()
        if dist.is_initialized():
            dist.destroy_process_group()
