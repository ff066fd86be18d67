"""Offline calibration passes for MLP compensation (the maths is in :mod:`.maths`).

Two passes over calibration text:

- :class:`GramRecorder`: one forward of the dense model; every layer's full second moment
  ``G = Σ [x;1][x;1]ᵀ`` of the ``down_proj`` input, (I+1, I+1) float64 per layer. Plan
  independent (any kept set can be refitted from it), but memory is ``L · (I+1)² · 8`` bytes:
  0.57 GB for SmolLM2-135M, 335 GB for Qwen3-32B. For benchmarks and small models.
- :func:`layerwise_refit`: the shippable pass. Layer by layer, it holds the calibration hidden
  states ``(N, T, H)`` and one layer's kept-unit moments ``A (K+1, K+1)``, ``B (K+1, H)``
  (:class:`LayerMoments`), solves the refit, installs it and moves on. Memory at Qwen3-32B
  shapes (H 5120, I 25600, K 17920 at 30 %): A 2.6 GB + B 0.7 GB float64, one layer's weights,
  and the hidden states (25k tokens: 0.5 GB float32), so about 4 GB beside the model, whatever
  the depth. Time: one layer forward per layer (``sequential=False``), two (``"local"``) or
  three (``"dense"``), plus one (K+1)³ solve per layer (~6 TFLOP at 32B widths). With
  ``sequential`` the layers see the already pruned earlier layers, and the target is the dense
  MLP output on the pruned trajectory (``"local"``) or on the dense trajectory (``"dense"``,
  which also corrects upstream error).

Packed rows without padding are expected (causal attention, no mask), as :func:`data.pack`
gives. Modules are found through the architecture registry (:class:`HfModel`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from actprune.core.tensor.hf_model import HfModel
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.plan import Plan
from actprune.pruning.compensate.maths import (
    DEFAULT_RIDGE,
    choose_ridge,
    obs_select,
    refit,
    update_gram,
    update_moments,
)
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "GramRecorder",
    "InputTap",
    "LayerMoments",
    "apply_mlp",
    "embed_rows",
    "layerwise_refit",
    "refit_for_plan",
    "run_layer",
]

HOOK_GROUP = "actprune.calibrate"
HOLD_OUT = 5  # ridge="auto": every 5th batch of rows is held out to choose the ridge


def apply_mlp(view: HfModel, layer: nn.Module, keep: list[int], w_down: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> None:
    """Slice one layer's MLP to the ``keep`` neurons in place (gate/up rows, down columns), with
    an optional new ``down_proj`` weight (H, K) and bias (H,). Equals the sliced checkpoint."""
    gate, up, down = view.mlp(layer)
    k = torch.as_tensor(keep, dtype=torch.long)
    dt = down.weight.dtype
    rows = []
    for lin in (gate, up):
        new = nn.Linear(lin.in_features, len(keep), bias=False, dtype=dt)
        new.weight.data = lin.weight.data.index_select(0, k).clone()
        rows.append(new)
    w = down.weight.data.index_select(1, k) if w_down is None else w_down
    old_b = down.bias.data if down.bias is not None else None
    new = nn.Linear(len(keep), down.out_features, bias=bias is not None or old_b is not None, dtype=dt)
    new.weight.data = w.to(dt).clone()
    if new.bias is not None:
        # A fitted bias adds to the layer's own (the targets are W x, without it), as in the slicer.
        b = torch.zeros(down.out_features, dtype=dt) if bias is None else bias.to(dt)
        new.bias.data = b + (old_b if old_b is not None else 0.0)
    view.set_mlp(layer, rows[0], rows[1], new)


class GramRecorder:
    """Full second moments of every layer's ``down_proj`` input, over valid tokens."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        view = HfModel.of(model)
        downs = [view.mlp(ly)[2] for ly in view.layers]
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
class InputTap:
    """Pre-hook on one module: hands its (T, C) input to ``sink`` while one is set."""

    def __init__(self) -> None:
        self.sink: Callable[[torch.Tensor], None] | None = None

    def __call__(self, _m: nn.Module, args: tuple[Any, ...]) -> None:
        if self.sink is not None:
            self.sink(args[0].reshape(-1, args[0].shape[-1]))


def embed_rows(view: HfModel, rows: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Start of a layer-by-layer pass over packed rows (N, T): the embeddings h (N, T, H), the
    rotary position embeddings and the position ids (1, T), all on the model's device."""
    dev = next(view.model.parameters()).device
    rows = rows.to(dev)
    h = view.embed(rows)  # (N, T, H)
    pos = torch.arange(rows.shape[1], device=dev)[None]  # (1, T)
    return h, view.rotary(h[:1], position_ids=pos), pos


def run_layer(layer: nn.Module, h: torch.Tensor, pe: Any, pos: torch.Tensor, batch: int) -> torch.Tensor:
    """Layer output for hidden states h (N, T, H), ``batch`` rows at a time."""
    outs = []
    for hb in h.split(batch):
        o = layer(hb, attention_mask=None, position_ids=pos, position_embeddings=pe)
        outs.append(o[0] if isinstance(o, tuple) else o)
    return torch.cat(outs)  # (N, T, H)


class LayerMoments:
    """The refit moments of one layer's kept units, accumulated batch by batch.

    ``add(x)`` folds one batch of ``down_proj`` inputs x (T, I) with its target t (T, H) — the
    dense output ``x Wᵀ``, or the next of ``targets`` (the dense-trajectory output, for
    ``sequential="dense"``). With ``hold_out``, every ``HOLD_OUT``-th batch goes to the held-out
    moments (A, B and Σ‖t‖²) that choose the ridge instead."""

    def __init__(self, w: torch.Tensor, kept: torch.Tensor, *, hold_out: bool,
                 targets: list[torch.Tensor] | None = None) -> None:
        self.w, self.kept, self.hold_out = w, kept, hold_out  # w: (H, I); kept: (K,)
        n, dev = len(kept) + 1, w.device
        self.a = torch.zeros(n, n, dtype=torch.float64, device=dev)  # (K+1, K+1)
        self.b = torch.zeros(n, w.shape[0], dtype=torch.float64, device=dev)  # (K+1, H)
        self.a_held, self.b_held = torch.zeros_like(self.a), torch.zeros_like(self.b)
        self.energy_held = torch.zeros((), dtype=torch.float64, device=dev)
        self.targets = iter(targets) if targets is not None else None
        self.batches = 0

    def add(self, x: torch.Tensor) -> None:
        t = next(self.targets) if self.targets is not None else x @ self.w.T  # (T, H)
        if self.hold_out and self.batches % HOLD_OUT == HOLD_OUT - 1:
            update_moments(self.a_held, self.b_held, x.index_select(1, self.kept), t)
            self.energy_held.add_((t.double() ** 2).sum())
        else:
            update_moments(self.a, self.b, x.index_select(1, self.kept), t)
        self.batches += 1


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
    (:func:`maths.obs_select`) on the moments of all units, (I+1)² per layer, and write
    the choice back into ``keep``. ``ridge="auto"``: every ``HOLD_OUT``-th batch of rows is held
    out, each layer takes the ridge of :data:`maths.RIDGE_GRID` whose fit on the other
    batches leaves the least output error on the held-out ones (:func:`maths.choose_ridge`),
    then refits on all rows with it; the choices go into ``chosen`` (layer -> ridge)."""
    if sequential not in (False, "local", "dense"):
        raise ValueError(f"sequential must be False, 'local' or 'dense', got {sequential!r}")
    if isinstance(ridge, str) and ridge != "auto":
        raise ValueError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}")
    view = HfModel.of(model)
    h, pe, pos = embed_rows(view, rows)
    h_dense = h if sequential == "dense" else None
    hooks, out = HookRegistry(), {}
    for i, layer in enumerate(tqdm(view.layers, desc="refit", unit="layer", disable=not progress)):
        down = view.mlp(layer)[2]
        tap = InputTap()
        hooks.pre_hook(HOOK_GROUP, down, tap)
        try:
            if i not in keep:
                h = run_layer(layer, h, pe, pos, batch)
                if h_dense is not None:
                    h_dense = run_layer(layer, h_dense, pe, pos, batch)
                continue
            w = down.weight.detach()  # (H, I)
            units = range(w.shape[1]) if reselect else keep[i]
            targets: list[torch.Tensor] | None = None
            if sequential == "dense":  # dense MLP output on the dense trajectory, chunk by chunk
                targets = []
                tap.sink = lambda x, w=w, targets=targets: targets.append(x @ w.T)
                h_dense = run_layer(layer, h_dense, pe, pos, batch)
            m = LayerMoments(w, torch.as_tensor(list(units), dtype=torch.long, device=w.device),
                             hold_out=ridge == "auto", targets=targets)
            tap.sink = m.add
            h_in = h
            h_out = run_layer(layer, h_in, pe, pos, batch)
            tap.sink = None
            w_new, bias, r = _solve(m, keep, i, ridge, reselect, obs_step)
            if chosen is not None:
                chosen[i] = float(r)
            out[i] = (w_new, bias)
            apply_mlp(view, layer, keep[i], w_new.to(w.device), bias.to(w.device))
            h = run_layer(layer, h_in, pe, pos, batch) if sequential else h_out
        finally:
            hooks.remove(HOOK_GROUP)
    return out


def _solve(m: LayerMoments, keep: dict[int, list[int]], i: int, ridge: float | str, reselect: bool,
           obs_step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(W' (H, K), bias (H,), ridge used) from one layer's moments; with ``reselect`` the kept
    units are chosen first (OBS on all units) and written into ``keep[i]``."""
    a, b = m.a.cpu(), m.b.cpu()
    a_h, b_h, e_h = m.a_held.cpu(), m.b_held.cpu(), float(m.energy_held)
    kept = m.kept.cpu()
    if reselect:
        r0 = DEFAULT_RIDGE if ridge == "auto" else ridge
        keep[i] = obs_select(a + a_h, b + b_h, len(keep[i]), r0, obs_step)
        kb = torch.tensor([*keep[i], len(kept)])  # (K+1,) the constant stays last
        a, b, a_h, b_h = a[kb][:, kb], b[kb], a_h[kb][:, kb], b_h[kb]
        kept = torch.as_tensor(keep[i])
    w_k = m.w.cpu().index_select(1, kept)  # (H, K) the plain slice
    r = ridge
    if ridge == "auto":
        # Too few batches to hold any out: the default, rather than a choice from nothing.
        r = choose_ridge((a, b), (a_h, b_h, e_h), w_k)[0] if e_h > 0 else DEFAULT_RIDGE
        a, b = a + a_h, b + b_h
    w_new, bias = refit(a, b, w_k, float(r))
    return w_new, bias, float(r)


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
    trust_remote_code: bool = False,
) -> tuple[Plan, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`layerwise_refit` of the kept MLP neurons of ``plan`` over ``tokens`` tokens of
    ``data`` (a ``wiki:PART`` name or a .txt/.jsonl file), for ``slice_checkpoint(mlp_refit=)``.
    Returns the plan (with ``reselect``, the same widths but the OBS-chosen neurons) and the
    refits. The activations are those of the model with only its MLPs pruned: a plan that also
    drops layers is refused (their inputs would differ). ``trust_remote_code``: run code the
    checkpoint's ``auto_map`` names (see :mod:`actprune.pruning.checkpoint.trust`)."""
    from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
    from actprune.pruning.data import DataError, load_texts, pack, tokenize

    if plan.dropped_layers:
        raise DataError("MLP refit does not support plans that drop layers; plan without --drop-layers")
    plan.refuse_experts("MLP refit")  # before the calibration pass, not after
    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    texts = load_texts(data, text_field, tok)
    rows = pack(tokenize(tok, texts), seq_len, tok.eos_token_id)[: max(tokens // seq_len, 1)]  # (N, L)
    model = load_causal_lm(model_dir, torch.float32, trust_remote_code=trust_remote_code)
    view = HfModel.of(model)
    full = [view.mlp(ly)[2].in_features for ly in view.layers]
    keep = {lp.index: lp.mlp_keep for lp in plan.layers if len(lp.mlp_keep) < full[lp.index]}
    refits = layerwise_refit(model, rows, keep, ridge=ridge, sequential=sequential, reselect=reselect,
                             progress=progress)
    if reselect:
        layers = [lp.model_copy(update={"mlp_keep": sorted(keep[lp.index])}) if lp.index in keep else lp
                  for lp in plan.layers]
        plan = plan.model_copy(update={"layers": layers})
        plan.check(source="refit")
    return plan, refits
