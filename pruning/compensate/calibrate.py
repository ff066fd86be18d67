"""Offline calibration passes for MLP and attention compensation (the maths is in :mod:`.maths`).

The attention refit is the MLP one applied to ``o_proj``: its input is the (T, heads·D)
concatenated head outputs, the kept units are the kept heads' channels, and the target is the
dense ``o_proj`` output (:func:`layerwise_refit` with ``attention=``).

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
from typing import Any

import torch
from actprune.core.tensor.hf_model import HfModel
from actprune.core.tensor.hooks import HookRegistry
from actprune.pruning.compensate.layers import apply_attention, apply_mlp, head_channels
from actprune.pruning.compensate.maths import (
    DEFAULT_RIDGE,
    choose_ridge,
    obs_select,
    refit,
    update_gram,
    update_moments,
)
from actprune.pruning.compensate.reconstruct import MlpSamples, Reconstruction, reconstruct_layer
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "GramRecorder",
    "InputTap",
    "LayerMoments",
    "apply_mlp",
    "embed_rows",
    "layerwise_refit",
    "run_layer",
]

HOOK_GROUP = "actprune.calibrate"
HOLD_OUT = 5  # ridge="auto": every 5th batch of rows is held out to choose the ridge


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
    moments (A, B and Σ‖t‖²) that choose the ridge instead. ``weights``: each batch's (T,) token
    weights, in the order the batches come (every pass over the rows comes in the same order)."""

    def __init__(self, w: torch.Tensor, kept: torch.Tensor, *, hold_out: bool,
                 targets: list[torch.Tensor] | None = None, weights: list[torch.Tensor] | None = None) -> None:
        self.w, self.kept, self.hold_out = w, kept, hold_out  # w: (H, I); kept: (K,)
        n, dev = len(kept) + 1, w.device
        self.a = torch.zeros(n, n, dtype=torch.float64, device=dev)  # (K+1, K+1)
        self.b = torch.zeros(n, w.shape[0], dtype=torch.float64, device=dev)  # (K+1, H)
        self.a_held, self.b_held = torch.zeros_like(self.a), torch.zeros_like(self.b)
        self.energy_held = torch.zeros((), dtype=torch.float64, device=dev)
        self.targets = iter(targets) if targets is not None else None
        self.weights = weights
        self.batches = 0

    def add(self, x: torch.Tensor) -> None:
        t = next(self.targets) if self.targets is not None else x @ self.w.T  # (T, H)
        wt = None if self.weights is None else self.weights[self.batches % len(self.weights)].to(x.device)  # (T,)
        if self.hold_out and self.batches % HOLD_OUT == HOLD_OUT - 1:
            update_moments(self.a_held, self.b_held, x.index_select(1, self.kept), t, wt)
            e = (t.double() ** 2).sum(1)  # (T,)
            self.energy_held.add_(e.sum() if wt is None else (e * wt.double()).sum())
        else:
            update_moments(self.a, self.b, x.index_select(1, self.kept), t, wt)
        self.batches += 1


Refits = dict[int, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def layerwise_refit(
    model: nn.Module,
    rows: torch.Tensor,
    keep: dict[int, list[int]],
    *,
    attention: dict[int, tuple[list[int], list[int]]] | None = None,
    attn_out: Refits | None = None,
    ridge: float | str = DEFAULT_RIDGE,
    sequential: bool | str = False,
    reselect: bool = False,
    obs_step: int = 8,
    batch: int = 4,
    progress: bool = True,
    chosen: dict[int, float] | None = None,
    row_weights: torch.Tensor | None = None,
    reconstruct: int = 0,
    mlp_rows: Refits | None = None,
) -> Refits:
    """Refitted ``(down_proj weight (H, K), bias (H,))`` per pruned layer; ``model`` is left
    pruned and refitted in place. rows: (N, T) packed token ids; keep: layer -> kept neurons
    (layers absent keep their MLP whole). ``attention``: layer -> (kept query heads, kept KV
    heads); those layers' ``o_proj`` is refitted the same way over the kept heads' channels
    (weight (H, h·D), bias (H,), into ``attn_out``; same ridge, never reselected). The kept
    heads' ``o_proj`` input does not depend on the removed heads (each query head reads only
    its own KV head, which a GQA-legal plan keeps), so it is the least-squares fit of the dense
    attention output exactly as for the MLP. ``sequential``: False, "local" or "dense" (see
    module doc; sequential passes refit a layer's attention first, then its MLP on the pruned
    attention's output). ``reselect``: keep as many units per layer, but choose them by greedy OBS
    (:func:`maths.obs_select`) on the moments of all units, (I+1)² per layer, and write
    the choice back into ``keep``. ``ridge="auto"``: every ``HOLD_OUT``-th batch of rows is held
    out, each layer takes the ridge of :data:`maths.RIDGE_GRID` whose fit on the other
    batches leaves the least output error on the held-out ones (:func:`maths.choose_ridge`),
    then refits on all rows with it; the MLP choices go into ``chosen`` (layer -> ridge).
    ``row_weights``: (N,) each row's weight in every least-squares fit (its tokens'), e.g. to mix
    text of several domains in fixed shares (:func:`mixture_weights`); None: all equal.
    ``reconstruct``: after each MLP's refit, that many passes of local reconstruction
    (:func:`.reconstruct.reconstruct_mlp`: the kept gate/up rows and the refitted down_proj
    trained towards the dense MLP output on the rows); the trained (gate (K, H), up (K, H)) go
    into ``mlp_rows``, the down_proj and its bias into the refits as before. Not with
    ``sequential`` or ``reselect``."""
    if sequential not in (False, "local", "dense"):
        raise ValueError(f"sequential must be False, 'local' or 'dense', got {sequential!r}")
    if reconstruct and (sequential or reselect):
        raise ValueError("reconstruct works on the one-pass refit: not with sequential or reselect")
    if isinstance(ridge, str) and ridge != "auto":
        raise ValueError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}")
    view = HfModel.of(model)
    attention = attention or {}
    h, pe, pos = embed_rows(view, rows)
    h_dense = h if sequential == "dense" else None
    out: Refits = {}
    weights = None if row_weights is None else [  # one (batch · T,) per batch of rows, as run_layer cuts them
        w.repeat_interleave(rows.shape[1]) for w in row_weights.double().split(batch)]
    pass_ = _LayerPass(view, pe, pos, batch, ridge, sequential, reselect, obs_step, weights,
                       (reconstruct, row_weights, {} if mlp_rows is None else mlp_rows))
    for i, layer in enumerate(tqdm(view.layers, desc="refit", unit="layer", disable=not progress)):
        if i not in keep and i not in attention:
            h = run_layer(layer, h, pe, pos, batch)
            if h_dense is not None:
                h_dense = run_layer(layer, h_dense, pe, pos, batch)
            continue
        h, h_dense = pass_.layer(i, layer, h, h_dense, keep, attention.get(i), out, attn_out, chosen)
    gains = sorted(1 - r.after / r.before for r in pass_.reconstructed.values() if r.before > 0)
    if gains and progress:
        tqdm.write(f"reconstruct: {len(gains)} MLPs, held-out error {gains[len(gains) // 2]:.1%} below the refit's "
                   f"(median; {gains[0]:.1%} to {gains[-1]:.1%})")
    elif pass_.reconstructed and progress:  # NaN: fewer rows than reconstruct.HOLD_OUT
        tqdm.write(f"reconstruct: {rows.shape[0]} calibration rows, too few to hold any out: the refits stand")
    return out


class _LayerPass:
    """One layer of :func:`layerwise_refit`: tap the ``o_proj`` / ``down_proj`` inputs, solve,
    install the sliced and refitted projections, return the next hidden states."""

    def __init__(self, view: HfModel, pe: Any, pos: torch.Tensor, batch: int, ridge: float | str,
                 sequential: bool | str, reselect: bool, obs_step: int, weights: list[torch.Tensor] | None,
                 reconstruct: tuple[int, torch.Tensor | None, Refits]) -> None:
        self.view, self.pe, self.pos, self.batch, self.weights = view, pe, pos, batch, weights
        self.ridge, self.sequential, self.reselect, self.obs_step = ridge, sequential, reselect, obs_step
        # (passes, (N,) row weights, layer -> trained (gate, up)): see reconstruct.reconstruct_layer
        self.epochs, self.row_weights, self.mlp_rows = reconstruct
        self.reconstructed: dict[int, Reconstruction] = {}

    def _run(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return run_layer(layer, h, self.pe, self.pos, self.batch)

    def layer(self, i: int, layer: nn.Module, h: torch.Tensor, h_dense: torch.Tensor | None,
              keep: dict[int, list[int]], heads: tuple[list[int], list[int]] | None, out: Refits,
              attn_out: Refits | None, chosen: dict[int, float] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        view, hooks = self.view, HookRegistry()
        attn, o, down = view.attention(layer)[0], view.o_proj(layer), view.mlp(layer)[2]
        tap_o, tap_d = InputTap(), InputTap()
        hooks.pre_hook(HOOK_GROUP, o, tap_o)
        hooks.pre_hook(HOOK_GROUP, down, tap_d)
        try:
            t_o = [] if heads is not None and h_dense is not None else None
            t_d = [] if i in keep and h_dense is not None else None
            if h_dense is not None:  # dense outputs on the dense trajectory, chunk by chunk
                tap_o.sink = None if t_o is None else (lambda x, w=o.weight, t=t_o: t.append(x @ w.T))
                tap_d.sink = None if t_d is None else (lambda x, w=down.weight, t=t_d: t.append(x @ w.T))
                h_dense = self._run(layer, h_dense)
                tap_o.sink = tap_d.sink = None
            hold = self.ridge == "auto"
            m_o = m_d = None
            if heads is not None:
                ch = head_channels(heads[0], attn.head_dim)
                m_o = LayerMoments(o.weight.detach(), torch.tensor(ch, device=o.weight.device), hold_out=hold,
                                   targets=t_o, weights=self.weights)
            if i in keep:
                units = range(down.in_features) if self.reselect else keep[i]
                m_d = LayerMoments(down.weight.detach(), torch.as_tensor(list(units), device=down.weight.device),
                                   hold_out=hold, targets=t_d, weights=self.weights)
            h_out = None
            samples = MlpSamples(view, layer, hooks, HOOK_GROUP) if self.epochs and i in keep else None
            if not self.sequential:  # one pass: both taps on the dense layer
                tap_o.sink = m_o.add if m_o else None
                tap_d.sink = m_d.add if m_d else None
                if samples is not None:
                    samples.on = True
                h_out = self._run(layer, h)
                tap_o.sink = tap_d.sink = None
                if samples is not None:
                    samples.on = False
            if m_o is not None:
                if self.sequential:
                    tap_o.sink = m_o.add
                    self._run(layer, h)
                    tap_o.sink = None
                w_o, b_o, _ = _solve(m_o, {i: ch}, i, self.ridge, False, self.obs_step)
                if attn_out is not None:
                    attn_out[i] = (w_o, b_o)
                apply_attention(view, layer, heads[0], heads[1], attn.head_dim, w_o, b_o)
            if m_d is not None:
                if self.sequential:  # the MLP sees this layer's pruned attention
                    tap_d.sink = m_d.add
                    self._run(layer, h)
                    tap_d.sink = None
                w_d, b_d, r = _solve(m_d, keep, i, self.ridge, self.reselect, self.obs_step)
                if chosen is not None:
                    chosen[i] = float(r)
                out[i] = (w_d, b_d)
                apply_mlp(view, layer, keep[i], w_d, b_d)
                if samples is not None:  # the refit is the start of the local reconstruction
                    out[i], self.mlp_rows[i], self.reconstructed[i] = reconstruct_layer(
                        view, layer, samples, h.shape[0], down.bias, self.row_weights, self.epochs)
        finally:
            hooks.remove(HOOK_GROUP)
        return (self._run(layer, h) if h_out is None else h_out), h_dense


def _solve(m: LayerMoments, keep: dict[int, list[int]], i: int, ridge: float | str, reselect: bool,
           obs_step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(W' (H, K), bias (H,), ridge used) from one layer's moments, returned on the CPU but
    solved where the moments are (the model's device, a GPU's when ``--device`` put it there);
    with ``reselect`` the kept units are chosen first (OBS on all units) and written into
    ``keep[i]``."""
    a, b, a_h, b_h, kept = m.a, m.b, m.a_held, m.b_held, m.kept
    e_h = float(m.energy_held)
    if reselect:
        r0 = DEFAULT_RIDGE if ridge == "auto" else ridge
        keep[i] = obs_select(a + a_h, b + b_h, len(keep[i]), r0, obs_step)
        kb = torch.tensor([*keep[i], len(kept)], device=a.device)  # (K+1,) the constant stays last
        a, b, a_h, b_h = a[kb][:, kb], b[kb], a_h[kb][:, kb], b_h[kb]
        kept = torch.as_tensor(keep[i], device=a.device)
    w_k = m.w.index_select(1, kept)  # (H, K) the plain slice
    r = ridge
    if ridge == "auto":
        # Too few batches to hold any out: the default, rather than a choice from nothing.
        r = choose_ridge((a, b), (a_h, b_h, e_h), w_k)[0] if e_h > 0 else DEFAULT_RIDGE
        a, b = a + a_h, b + b_h
    w_new, bias = refit(a, b, w_k, float(r))
    return w_new.cpu(), bias.cpu(), float(r)
