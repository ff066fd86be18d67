"""Offline calibration passes for MLP compensation (the maths is in :mod:`.compensate`).

Two passes over calibration text:

- :class:`GramRecorder`: one forward of the dense model; every layer's full second moment
  ``G = Σ [x;1][x;1]ᵀ`` of the ``down_proj`` input, (I+1, I+1) float64 per layer. Plan
  independent (any kept set can be refitted from it), but memory is ``L · (I+1)² · 8`` bytes:
  0.57 GB for SmolLM2-135M, 335 GB for Qwen3-32B. For benchmarks and small models.
- :func:`layerwise_refit`: the shippable pass. Layer by layer, it holds the calibration hidden
  states ``(N, T, H)`` and one layer's kept-unit moments ``A (K+1, K+1)``, ``B (K+1, H)``, solves
  the refit, installs it and moves on. Memory at Qwen3-32B shapes (H 5120, I 25600, K 17920 at
  30 %): A 2.6 GB + B 0.7 GB float64, one layer's weights, and the hidden states (25k tokens:
  0.5 GB float32), so about 4 GB beside the model, whatever the depth. Time: one layer forward per
  layer (``sequential=False``), two (``"local"``) or three (``"dense"``), plus one (K+1)³ solve
  per layer (~6 TFLOP at 32B widths). With ``sequential`` the layers see the already pruned
  earlier layers, and the target is the dense MLP output on the pruned trajectory
  (``"local"``) or on the dense trajectory (``"dense"``, which also corrects upstream error).

Packed rows without padding are expected (causal attention, no mask), as :func:`data.pack`
gives. Weight names stay in :func:`mlp_modules`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from actprune.client.wire.plan import Plan
from actprune.server.registry import HookRegistry
from torch import nn
from tqdm.auto import tqdm

from .compensate import DEFAULT_RIDGE, choose_ridge, obs_select, refit, update_gram, update_moments

__all__ = ["GramRecorder", "apply_mlp", "layerwise_refit", "mlp_modules", "refit_for_plan"]

HOOK_GROUP = "actprune.calibrate"
HOLD_OUT = 5  # ridge="auto": every 5th batch of rows is held out to choose the ridge


def mlp_modules(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """(gate_proj, up_proj, down_proj) of a Llama-family decoder layer."""
    mlp = layer.mlp
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def _layers(model: nn.Module) -> nn.ModuleList:
    return getattr(model, "model", model).layers


def apply_mlp(layer: nn.Module, keep: list[int], w_down: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> None:
    """Slice one layer's MLP to the ``keep`` neurons in place (gate/up rows, down columns), with
    an optional new ``down_proj`` weight (H, K) and bias (H,). Equals the sliced checkpoint."""
    gate, up, down = mlp_modules(layer)
    k = torch.as_tensor(keep, dtype=torch.long)
    dt = down.weight.dtype
    for name, lin in (("gate_proj", gate), ("up_proj", up)):
        new = nn.Linear(lin.in_features, len(keep), bias=False, dtype=dt)
        new.weight.data = lin.weight.data.index_select(0, k).clone()
        setattr(layer.mlp, name, new)
    w = down.weight.data.index_select(1, k) if w_down is None else w_down
    old_b = down.bias.data if down.bias is not None else None
    new = nn.Linear(len(keep), down.out_features, bias=bias is not None or old_b is not None, dtype=dt)
    new.weight.data = w.to(dt).clone()
    if new.bias is not None:
        # A fitted bias adds to the layer's own (the targets are W x, without it), as in the slicer.
        b = torch.zeros(down.out_features, dtype=dt) if bias is None else bias.to(dt)
        new.bias.data = b + (old_b if old_b is not None else 0.0)
    layer.mlp.down_proj = new


class GramRecorder:
    """Full second moments of every layer's ``down_proj`` input, over valid tokens."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        downs = [mlp_modules(ly)[2] for ly in _layers(model)]
        self.grams = [torch.zeros(d.in_features + 1, d.in_features + 1, dtype=torch.float64) for d in downs]
        self.hooks = HookRegistry()
        self.valid: torch.Tensor | None = None
        for i, d in enumerate(downs):
            self.hooks.pre_hook(HOOK_GROUP, d, self._hook(i))

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # (B*T, I)
            if self.valid is not None:
                x = x[self.valid.to(x.device)]
            update_gram(self.grams[i], x.cpu())

        return hook

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        self.valid = None if attention_mask is None else attention_mask.reshape(-1).bool()
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self.valid = None

    def close(self) -> list[torch.Tensor]:
        self.hooks.remove(HOOK_GROUP)
        return self.grams


# ---- layer by layer -------------------------------------------------------------------------
class Capture:
    """Pre-hook on one down_proj: hands the (T, I) input to ``sink`` while armed."""

    def __init__(self) -> None:
        self.sink: Callable[[torch.Tensor], None] | None = None

    def __call__(self, _m: nn.Module, args: tuple[Any, ...]) -> None:
        if self.sink is not None:
            self.sink(args[0].reshape(-1, args[0].shape[-1]))


def embed_rows(model: nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Start of a layer-by-layer pass over packed rows (N, T): the embeddings h (N, T, H), the
    rotary position embeddings and the position ids (1, T), all on the model's device."""
    base = getattr(model, "model", model)
    dev = next(model.parameters()).device
    rows = rows.to(dev)
    h = base.embed_tokens(rows)  # (N, T, H)
    pos = torch.arange(rows.shape[1], device=dev)[None]  # (1, T)
    return h, base.rotary_emb(h[:1], position_ids=pos), pos


def run_layer(layer: nn.Module, h: torch.Tensor, pe: Any, pos: torch.Tensor, batch: int) -> torch.Tensor:
    """Layer output for hidden states h (N, T, H), ``batch`` rows at a time."""
    outs = []
    for hb in h.split(batch):
        o = layer(hb, attention_mask=None, position_ids=pos, position_embeddings=pe)
        outs.append(o[0] if isinstance(o, tuple) else o)
    return torch.cat(outs)  # (N, T, H)


@torch.no_grad()
def layerwise_refit(
    model: nn.Module,
    rows: torch.Tensor,
    keep: dict[int, list[int]],
    *,
    ridge: float | str = DEFAULT_RIDGE,
    sequential: bool | str = False,
    reselect: bool = False,
    obs_step: int = 8,
    batch: int = 4,
    progress: bool = True,
    chosen: dict[int, float] | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Refitted ``(down_proj weight (H, K), bias (H,))`` per pruned layer; ``model`` is left
    pruned and refitted in place. rows: (N, T) packed token ids; keep: layer -> kept neurons
    (layers absent are left whole). ``sequential``: False, "local" or "dense" (see module doc).
    ``reselect``: keep as many units per layer, but choose them by greedy OBS
    (:func:`compensate.obs_select`) on the moments of all units, (I+1)² per layer, and write
    the choice back into ``keep``. ``ridge="auto"``: every ``HOLD_OUT``-th batch of rows is held
    out, each layer takes the ridge of :data:`compensate.RIDGE_GRID` whose fit on the other
    batches leaves the least output error on the held-out ones (:func:`compensate.choose_ridge`),
    then refits on all rows with it; the choices go into ``chosen`` (layer -> ridge)."""
    if sequential not in (False, "local", "dense"):
        raise ValueError(f"sequential must be False, 'local' or 'dense', got {sequential!r}")
    if isinstance(ridge, str) and ridge != "auto":
        raise ValueError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}")
    base = getattr(model, "model", model)
    dev = next(model.parameters()).device
    h, pe, pos = embed_rows(model, rows)
    h_dense = h if sequential == "dense" else None
    hooks, out = HookRegistry(), {}
    for i, layer in enumerate(tqdm(base.layers, desc="refit", unit="layer", disable=not progress)):
        down = mlp_modules(layer)[2]
        cap = Capture()
        hooks.pre_hook(HOOK_GROUP, down, cap)
        try:
            if i not in keep:
                h = run_layer(layer, h, pe, pos, batch)
                if h_dense is not None:
                    h_dense = run_layer(layer, h_dense, pe, pos, batch)
                continue
            k = torch.arange(w_in := down.in_features, device=dev) if reselect else \
                torch.as_tensor(keep[i], dtype=torch.long, device=dev)
            w = down.weight.detach()
            hid = w.shape[0]
            a = torch.zeros(len(k) + 1, len(k) + 1, dtype=torch.float64, device=dev)
            b = torch.zeros(len(k) + 1, hid, dtype=torch.float64, device=dev)
            held = (torch.zeros_like(a), torch.zeros_like(b), torch.zeros((), dtype=torch.float64, device=dev))
            n_batch = [0]
            targets: list[torch.Tensor] = []
            if sequential == "dense":  # dense MLP output on the dense trajectory, chunk by chunk
                cap.sink = lambda x, w=w, targets=targets: targets.append(x @ w.T)
                h_dense = run_layer(layer, h_dense, pe, pos, batch)
            it = iter(targets)

            def acc(x: torch.Tensor, w=w, k=k, a=a, b=b, it=it, held=held, n_batch=n_batch) -> None:
                t = next(it) if sequential == "dense" else x @ w.T  # (T, H)
                if ridge == "auto" and n_batch[0] % HOLD_OUT == HOLD_OUT - 1:
                    update_moments(held[0], held[1], x.index_select(1, k), t)
                    held[2].add_((t.double() ** 2).sum())
                else:
                    update_moments(a, b, x.index_select(1, k), t)
                n_batch[0] += 1

            cap.sink = acc
            h_in = h
            h_out = run_layer(layer, h_in, pe, pos, batch)
            cap.sink = None
            a, b = a.cpu(), b.cpu()
            a_h, b_h, e_h = held[0].cpu(), held[1].cpu(), float(held[2])
            if reselect:
                keep[i] = obs_select(a + a_h, b + b_h, len(keep[i]), DEFAULT_RIDGE if ridge == "auto" else ridge,
                                     obs_step)
                kb = torch.tensor([*keep[i], w_in])  # (K+1,) the constant stays
                a, b, k = a[kb][:, kb], b[kb], torch.as_tensor(keep[i], device=dev)
                a_h, b_h = a_h[kb][:, kb], b_h[kb]
            w_k = w.index_select(1, k).cpu()
            r = ridge
            if ridge == "auto":
                # Too few batches to hold any out: the default, rather than a choice from nothing.
                r = choose_ridge((a, b), (a_h, b_h, e_h), w_k)[0] if e_h > 0 else DEFAULT_RIDGE
                a, b = a + a_h, b + b_h
            if chosen is not None:
                chosen[i] = float(r)
            w_new, bias = refit(a, b, w_k, float(r))
            out[i] = (w_new, bias)
            apply_mlp(layer, keep[i], w_new.to(dev), bias.to(dev))
            h = run_layer(layer, h_in, pe, pos, batch) if sequential else h_out
        finally:
            hooks.remove(HOOK_GROUP)
    return out


def refit_for_plan(
    model_dir: str | Path,
    plan: Plan,
    data: str,
    *,
    tokens: int = 32768,
    seq_len: int = 512,
    ridge: float | str = DEFAULT_RIDGE,
    sequential: bool | str = False,
    text_field: str | None = None,
    reselect: bool = False,
    progress: bool = True,
) -> tuple[Plan, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`layerwise_refit` of the kept MLP neurons of ``plan`` over ``tokens`` tokens of
    ``data`` (a ``wiki:PART`` name or a .txt/.jsonl file), for ``slice_checkpoint(mlp_refit=)``.
    Returns the plan (with ``reselect``, the same widths but the OBS-chosen neurons) and the
    refits. The activations are those of the model with only its MLPs pruned: a plan that also
    drops layers is refused (their inputs would differ)."""
    from .data import DataError, load_texts, pack, tokenize
    from .hf_io import load_causal_lm, load_tokenizer

    if plan.dropped_layers:
        raise DataError("MLP refit does not support plans that drop layers; plan without --drop-layers")
    tok = load_tokenizer(model_dir)
    texts = load_texts(data, text_field, tok)
    rows = pack(tokenize(tok, texts), seq_len, tok.eos_token_id)[: max(tokens // seq_len, 1)]  # (N, L)
    model = load_causal_lm(model_dir, torch.float32)
    full = [mlp_modules(ly)[2].in_features for ly in _layers(model)]
    keep = {lp.index: lp.mlp_keep for lp in plan.layers if len(lp.mlp_keep) < full[lp.index]}
    refits = layerwise_refit(model, rows, keep, ridge=ridge, sequential=sequential, reselect=reselect,
                             progress=progress)
    if reselect:
        layers = [lp.model_copy(update={"mlp_keep": sorted(keep[lp.index])}) if lp.index in keep else lp
                  for lp in plan.layers]
        plan = plan.model_copy(update={"layers": layers})
        plan.check(source="refit")
    return plan, refits
