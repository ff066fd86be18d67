"""Offline recorder: activation statistics from a transformers forward over text.

For users without a vLLM server. The hooks go through :class:`actprune.core.tensor.hooks.
HookRegistry`, find their modules through the architecture registry
(:class:`actprune.core.tensor.hf_model.HfModel`), and fold activations with the very functions
the server uses
(:mod:`actprune.core.tensor.accumulate`), so the file written here is the same stats file
(:mod:`actprune.core.wire.stats`) a server snapshot would give for the same tokens:

* ``layers.{i}.mlp.*``  — the input of layer i's ``mlp.down_proj``, (T, I);
* ``layers.{i}.router.*`` — instead, for an MoE layer: its router's top-k picks and weights,
  from the router logits with the model's own top-k and ``norm_topk_prob`` (docs/moe.md), and
  ``reap_sum``, which a server cannot give: Σ routing weight × ‖expert output‖ per expert (REAP,
  :mod:`actprune.core.tensor.expert_norms`; one more pass over the routed experts per batch);
* ``layers.{i}.attn.*`` — the input of layer i's ``self_attn.o_proj``, (T, H*D);
* ``layers.{i}.block.*`` — cosine between the residual stream entering and leaving layer i.

Every token of every text is a prefill token (``tokens_decode`` is 0). Batches are right
padded, and padding rows are masked out with ``valid`` as in the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from actprune.core.archs import model_shape
from actprune.core.tensor.accumulate import (
    export_state,
    new_block_state,
    new_channel_state,
    new_router_state,
    update_block,
    update_channels,
    update_router,
)
from actprune.core.tensor.expert_norms import update_reap
from actprune.core.tensor.hf_model import HfModel
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.schema import (
    BLOCK_KIND,
    DEFAULT_NEAR_ZERO,
    FORMAT_NAME,
    FORMAT_VERSION,
    ROUTER_KIND,
    key,
)
from actprune.core.wire.stats import Stats, config_hash
from torch import nn
from tqdm.auto import tqdm

__all__ = ["LayerTaps", "Recorder", "batches", "budget", "decoder_taps", "record"]

HOOK_GROUP = "actprune.recorder"


@dataclass(frozen=True)
class LayerTaps:
    """The modules of one decoder layer the recorder listens to: ``down_proj`` of a dense
    layer or the ``router`` of an MoE layer (the other is None), and ``o_proj``."""

    layer: nn.Module
    down_proj: nn.Module | None
    o_proj: nn.Module
    router: nn.Module | None = None


def decoder_taps(model: nn.Module) -> list[LayerTaps]:
    """The decoder layers of a transformers causal LM and their ``down_proj`` (or router) /
    ``o_proj``, found by the model's registry spec."""
    view = HfModel.of(model)
    taps = []
    for ly in view.layers:
        router = view.router(ly)
        taps.append(LayerTaps(ly, None if router is not None else view.mlp(ly)[2], view.o_proj(ly), router))
    return taps


class Recorder:
    """Holds one accumulator state per layer and the hooks that feed them."""

    def __init__(self, model: nn.Module, near_zero_threshold: float = DEFAULT_NEAR_ZERO) -> None:
        self.model = model
        self.threshold = near_zero_threshold
        self.taps = decoder_taps(model)
        moe = HfModel.of(model).spec.moe
        # (experts, top-k, norm_topk_prob): transformers' router routes by the same config
        self.routing = moe.routing(model.config.to_dict()) if moe is not None else None
        # every accumulator lives on the device of the module it observes: with a device_map
        # ("auto": layers spread over GPUs) no activation crosses a device to be counted
        self.mlp = [new_channel_state(t.down_proj.in_features, _device(t.down_proj)) if t.down_proj is not None
                    else None for t in self.taps]
        self.router = [_router_state(t.router) if t.router is not None and self.routing else None
                       for t in self.taps]
        # per MoE layer: the experts module and expert e's output, for REAP's reap_sum
        self.experts = [HfModel.of(model).experts(t.layer) if t.router is not None else None for t in self.taps]
        self._logits: list[torch.Tensor | None] = [None] * len(self.taps)  # a router's, until its experts run
        self.attn = [new_channel_state(t.o_proj.in_features, _device(t.o_proj)) for t in self.taps]
        self.block = [new_block_state(_device(t.layer)) for t in self.taps]
        self.tokens = 0
        self._valid: torch.Tensor | None = None  # (B*T,) bool, set per batch
        self._h_in: list[torch.Tensor | None] = [None] * len(self.taps)
        self.hooks = HookRegistry()

    # ---- hooks -----------------------------------------------------------------------------
    def install(self) -> None:
        for i, t in enumerate(self.taps):
            if t.down_proj is not None:
                self.hooks.pre_hook(HOOK_GROUP, t.down_proj, self._channels_hook(self.mlp[i]))
            if t.router is not None:
                self.hooks.post_hook(HOOK_GROUP, t.router, self._router_hook(i))
            if self.experts[i] is not None:
                self.hooks.pre_hook(HOOK_GROUP, self.experts[i][0], self._experts_hook(i))
            self.hooks.pre_hook(HOOK_GROUP, t.o_proj, self._channels_hook(self.attn[i]))
            self.hooks.pre_hook(HOOK_GROUP, t.layer, self._layer_in_hook(i), with_kwargs=True)
            self.hooks.post_hook(HOOK_GROUP, t.layer, self._layer_out_hook(i))

    def remove(self) -> None:
        self.hooks.remove(HOOK_GROUP)

    def _channels_hook(self, state: dict[str, torch.Tensor]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            update_channels(state, x.reshape(-1, x.shape[-1]), self._valid_mask(x), self.threshold)

        return hook

    def _router_hook(self, i: int) -> Any:
        _, top_k, renormalize = self.routing

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # transformers' Qwen3MoeTopKRouter returns (logits (B*T, E), top-k weights, indices)
            logits = output[0] if isinstance(output, tuple) else output
            update_router(self.router[i], logits, self._valid_mask(logits), top_k, renormalize)
            self._logits[i] = logits

        return hook

    def _experts_hook(self, i: int) -> Any:
        _, top_k, renormalize = self.routing
        expert = self.experts[i][1]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x, logits = args[0], self._logits[i]  # (B*T, H) the experts' input, (B*T, E)
            self._logits[i] = None
            if logits is None:
                raise RuntimeError(f"layer {i}: experts ran without their router")
            update_reap(self.router[i]["reap_sum"], x, logits, self._valid_mask(x), top_k, renormalize, expert)

        return hook

    def _layer_in_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._h_in[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _layer_out_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            h_out = output[0] if isinstance(output, tuple) else output
            h_in = self._h_in[i]
            self._h_in[i] = None
            if h_in is None:
                raise RuntimeError(f"layer {i}: output hook ran without its input hook")
            update_block(
                self.block[i],
                h_in.reshape(-1, h_in.shape[-1]),  # (B*T, H)
                h_out.reshape(-1, h_out.shape[-1]),
                self._valid_mask(h_in),
            )

        return hook

    def _valid_mask(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self._valid is None or self._valid.numel() != rows:
            raise RuntimeError("Recorder.forward must be used so that padding can be masked")
        return self._valid.to(x.device)

    # ---- driving ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """One batch. input_ids, attention_mask: (B, T), right padded."""
        self._valid = attention_mask.reshape(-1).bool()  # (B*T,)
        try:
            dev = next(self.model.parameters()).device
            self.model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=False)
        finally:
            self._valid = None
        self.tokens += int(attention_mask.sum())

    def stats(self, model_name: str, config: dict[str, Any]) -> Stats:
        tensors = {}
        for i in range(len(self.taps)):
            groups = (("mlp", self.mlp[i]), (ROUTER_KIND, self.router[i]), ("attn", self.attn[i]),
                      (BLOCK_KIND, self.block[i]))
            for kind, state in groups:
                for f, a in (export_state(state) if state is not None else {}).items():
                    tensors[key(i, kind, f)] = a
        arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
        shape = model_shape(config)  # the one place a config's geometry is derived
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": model_name,
            "architecture": arch,
            "config_hash": config_hash(config),
            # as a server's snapshot: `stats show` needs head_dim to show heads
            "num_layers": shape.num_layers,
            "head_dim": shape.head_dim,
            "tensor_parallel_size": 1,
            "near_zero_threshold": self.threshold,
            "tokens_prefill": self.tokens,
            "tokens_decode": 0,
            "source": "offline-recorder",
        }
        return Stats(tensors=tensors, meta=meta)


def _router_state(router: nn.Module) -> dict[str, torch.Tensor]:
    """A router's accumulators, sized by the router itself (a checkpoint of the actprune
    architecture has its own expert count per layer), with REAP's ``reap_sum`` (E,)."""
    e = int(getattr(router, "num_experts", 0) or router.weight.shape[0])
    dev = _device(router)
    return {**new_router_state(e, dev), "reap_sum": torch.zeros(e, dtype=torch.float64, device=dev)}


def _device(module: nn.Module) -> torch.device:
    """Where ``module``'s weights are (CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def batches(
    token_lists: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask) pairs, each (B, T_max of the batch)."""
    out = []
    for s in range(0, len(token_lists), batch_size):
        chunk = token_lists[s : s + batch_size]
        t_max = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), t_max), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(chunk), t_max), dtype=torch.int64)
        for r, seq in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            mask[r, : len(seq)] = 1
        out.append((ids, mask))
    return out


def budget(token_lists: Sequence[Sequence[int]], max_len: int, max_tokens: int | None) -> list[list[int]]:
    """Truncate each text to ``max_len`` tokens and keep texts until ``max_tokens`` in all
    (the last one cut so the total is exact). Empty texts are skipped."""
    out: list[list[int]] = []
    total = 0
    for ids in token_lists:
        ids = list(ids[:max_len])
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if ids:
            out.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return out


def record(
    model: nn.Module,
    token_lists: Sequence[Sequence[int]],
    *,
    model_name: str,
    config: dict[str, Any],
    batch_size: int = 4,
    pad_id: int = 0,
    near_zero_threshold: float = DEFAULT_NEAR_ZERO,
    progress: bool = True,
) -> Stats:
    """Run ``model`` over every token list and return the stats snapshot."""
    rec = Recorder(model, near_zero_threshold)
    rec.install()
    try:
        todo = batches(token_lists, batch_size, pad_id)
        bar = tqdm(total=sum(len(t) for t in token_lists), unit="tok", desc="recording",
                   disable=not progress)
        for ids, mask in todo:
            rec.forward(ids, mask)
            bar.update(int(mask.sum()))
        bar.close()
    finally:
        rec.remove()
    return rec.stats(model_name, config)
