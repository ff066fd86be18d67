"""Local reconstruction of a pruned MLP by gradient descent: compensation past the refit.

The refit (:func:`.maths.refit`) is the least-squares ``down_proj`` for the gate and up rows the
slice kept; those rows stay as they were in the dense model. Here the kept MLP as a whole —
gate and up rows, the refitted ``down_proj`` and its bias — is trained to reproduce the dense
MLP's output on the calibration tokens, layer by layer: the loss is local (one MLP's output,
no labels, nothing downstream), so it is compensation, not fine-tuning, and costs a few passes
of one MLP over the calibration tokens per layer.

Adam with a cosine schedule from the refit as the start, for ``epochs`` passes over the
training rows in random batches; after each pass the relative error on held-out rows (every
``HOLD_OUT``-th row, never trained on) is measured, and the parameters of the best pass are
kept — the refit itself when no pass beats it. Rows carry weights (the refit's ``--refit-anchor``
mixture) in the loss as in the least-squares fit. Measured on SmolLM2-135M (BENCHMARKS.md,
issue 13): held-out local error 4–12 % lower per layer, perplexity lower in and out of domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from actprune.core.tensor.hf_model import HfModel
from actprune.core.tensor.hooks import HookRegistry
from torch import nn

__all__ = ["DEFAULT_LR", "HOLD_OUT", "MlpSamples", "Reconstruction", "reconstruct_layer", "reconstruct_mlp"]

HOLD_OUT = 5  # every 5th calibration row is held out to choose the pass kept
# Adam's step relative to each weight's RMS: 3e-4 on SmolLM2-135M's MLPs (RMS ~0.19), the rate
# its 3-pass runs were measured with (BENCHMARKS.md, issue 13)
DEFAULT_LR = 1.6e-3


@dataclass(frozen=True)
class Reconstruction:
    """How one layer's reconstruction went: the held-out relative error ‖f(u) − y‖² / ‖y‖² of
    the refit (``before``) and of the pass kept (``after``), and which pass that was (0: none
    beat the refit, which stays)."""

    before: float
    after: float
    kept_pass: int


def _step_sizes(mlp: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Adam parameter groups: each linear's weight at ``lr`` × its RMS, its bias at the same."""
    groups = []
    for m in mlp.modules():
        if isinstance(m, nn.Linear):
            rms = float(m.weight.detach().double().pow(2).mean().sqrt().clamp_min(1e-12))
            groups.append({"params": [q for q in (m.weight, m.bias) if q is not None], "lr": lr * rms})
    if sum(len(g["params"]) for g in groups) != len(list(mlp.parameters())):
        raise ValueError("reconstruct: the MLP block holds parameters outside its linear projections")
    return groups


def _held_error(mlp: nn.Module, u: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Σ‖mlp(u) − y‖² / Σ‖y‖² over rows u, y (M, H), ``batch`` rows at a time."""
    err = 0.0
    with torch.no_grad():
        for ub, yb in zip(u.split(batch), y.split(batch), strict=True):
            err += float(((mlp(ub) - yb).double() ** 2).sum())
    return err / max(float((y.double() ** 2).sum()), 1e-30)


def reconstruct_mlp(mlp: nn.Module, u: torch.Tensor, y: torch.Tensor, *, row_weights: torch.Tensor | None = None,
                    epochs: int = 3, lr: float = DEFAULT_LR, batch_tokens: int = 1024, seed: int = 0) -> Reconstruction:
    """Train ``mlp`` (a pruned, refitted MLP block: its forward maps (…, H) -> (…, H)) in place
    towards the dense output. u: (N, T, H) the MLP's inputs on the calibration rows, y: (N, T, H)
    the dense MLP's outputs there; row_weights: (N,) each row's weight (None: equal); every
    ``HOLD_OUT``-th row is held out. ``lr`` is relative: each weight tensor's Adam step size is
    ``lr`` × its RMS (a bias takes its layer's weight's), since Adam moves every entry by about
    its step size whatever the gradient's scale, and models' weights differ in scale (SmolLM2's
    MLP RMS 0.19, a model initialised at std 0.02 ten times less). Parameters keep their dtype
    and device (u, y move there)."""
    if epochs < 1 or lr <= 0 or batch_tokens < 1:
        raise ValueError(f"need epochs >= 1, lr > 0, batch_tokens >= 1 (got {epochs}, {lr}, {batch_tokens})")
    p0 = next(mlp.parameters())
    n, t, h = u.shape
    held = torch.arange(n) % HOLD_OUT == HOLD_OUT - 1  # (N,)
    if held.all() or not held.any():  # fewer than HOLD_OUT rows: nothing to choose the pass on
        return Reconstruction(float("nan"), float("nan"), 0)
    u, y = u.to(p0), y.to(p0)
    u_fit, y_fit = u[~held].reshape(-1, h), y[~held].reshape(-1, h)  # (M, H)
    u_held, y_held = u[held].reshape(-1, h), y[held].reshape(-1, h)
    w = torch.ones(n, dtype=p0.dtype) if row_weights is None else row_weights.to(p0.dtype)
    w_fit = w[~held].repeat_interleave(t).to(p0.device)  # (M,) each token its row's weight
    w_fit = w_fit / w_fit.mean()
    scale = float((y_fit.double() ** 2).mean().clamp_min(1e-30))  # the loss in units of the target
    before = best = _held_error(mlp, u_held, y_held, batch_tokens)
    best_state, kept = {k: v.detach().clone() for k, v in mlp.state_dict().items()}, 0
    params = [q for q in mlp.parameters()]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.Adam(_step_sizes(mlp, lr))
    steps = epochs * math.ceil(u_fit.shape[0] / batch_tokens)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    try:
        for e in range(1, epochs + 1):
            for b in torch.randperm(u_fit.shape[0], generator=gen).split(batch_tokens):
                b = b.to(p0.device)
                with torch.enable_grad():
                    r = mlp(u_fit[b]) - y_fit[b]  # (B, H)
                    loss = ((r**2).mean(1) * w_fit[b]).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            err = _held_error(mlp, u_held, y_held, batch_tokens)
            if err < best:
                best, kept = err, e
                best_state = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    finally:
        for q in params:
            q.requires_grad_(False)
            q.grad = None
    mlp.load_state_dict(best_state)
    return Reconstruction(before, best, kept)


class MlpSamples:
    """What one dense MLP sees and gives on the calibration rows, gathered while the refit's
    one pass runs the dense layer: the block's input u (gate_proj's) and its output y
    (down_proj's, with any bias it has), (rows·T, H) a batch, in the order the rows come.
    ``on`` arms the hooks for that pass only."""

    def __init__(self, view: HfModel, layer: nn.Module, hooks: HookRegistry, group: str) -> None:
        gate, up, down = view.mlp(layer)
        if gate.bias is not None or up.bias is not None:
            raise ValueError("reconstruct: gate/up projections with biases are not supported")
        self.u: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.on = False
        hooks.pre_hook(group, view.mlp_block(layer), self._input)
        hooks.post_hook(group, down, self._output)

    def _input(self, _m: nn.Module, args: tuple[Any, ...]) -> None:
        if self.on:
            self.u.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    def _output(self, _m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
        if self.on:
            self.y.append(out.detach().reshape(-1, out.shape[-1]))

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, y), each (n, T, H), and the lists emptied."""
        u, y = torch.cat(self.u), torch.cat(self.y)
        self.u, self.y = [], []
        return u.view(n, -1, u.shape[-1]), y.view(n, -1, y.shape[-1])


def reconstruct_layer(view: HfModel, layer: nn.Module, samples: MlpSamples, n_rows: int, dense_bias: torch.Tensor | None,
                      row_weights: torch.Tensor | None, epochs: int) -> tuple[tuple, tuple, Reconstruction]:
    """Reconstruct one layer's refitted MLP in place from ``samples``; returns (down_proj weight
    (H, K), the fitted bias (H,): the dense ``dense_bias`` taken off, as the slicer adds it),
    (gate (K, H), up (K, H)), all on the CPU, and how it went."""
    u, y = samples.rows(n_rows)
    rec = reconstruct_mlp(view.mlp_block(layer), u, y, row_weights=row_weights, epochs=epochs)
    gate, up, down = view.mlp(layer)
    bias = down.bias.detach() - (0.0 if dense_bias is None else dense_bias.to(down.bias))
    cpu = [t.detach().cpu().clone() for t in (down.weight, bias, gate.weight, up.weight)]
    return (cpu[0], cpu[1]), (cpu[2], cpu[3]), rec
