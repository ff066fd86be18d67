"""Compensation for removed MLP neurons: pure maths on activation moments.

A layer's MLP ends in ``y = W x`` with ``x`` the (I,) activation at the input of ``down_proj``
and ``W`` its (H, I) weight. Removing neurons keeps ``K`` of them (index set ``k``). Three ways
to give the kept columns the job of the whole layer, from least to most information used:

- **slice**:  ``W[:, k]``, no bias (what plain structured pruning does);
- **bias** (FLAP): ``W[:, k]`` and ``b = W[:, r] @ mean(x_r)``, the removed units' mean output;
- **refit**: ridge least squares. With ``x̄ = [x_k; 1]`` over calibration tokens, choose
  ``Θ = [W'ᵀ; bᵀ]`` ((K+1, H)) minimising ``Σ ‖t − Θᵀ x̄‖² + λ ‖W' − W[:, k]‖²_F`` where ``t`` is
  the target output (``W x`` of the dense layer). The ridge pulls towards the plain slice, so
  ``λ → ∞`` gives slicing plus the least-squares bias (FLAP's bias when the kept and removed
  units are uncorrelated), ``λ = 0`` the full least-squares fit. Closed form::

      (A + λ D) Θ = B + λ D Θ0,  A = Σ x̄ x̄ᵀ (K+1, K+1),  B = Σ x̄ tᵀ (K+1, H),
      D = diag(1, …, 1, 0),  Θ0 = [W[:, k]ᵀ; 0],  λ = ridge · mean(diag A[:K, :K])

``A`` and ``B`` are all it needs: from a full second-moment matrix ``G = Σ [x;1][x;1]ᵀ``
(:func:`moments_from_gram`, when the target is the dense output ``W x``) or accumulated for the
kept units directly (:mod:`actprune.pruning.compensate.calibrate`, bounded memory, any target).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "DEFAULT_RIDGE",
    "augment",
    "flap_bias",
    "moments_from_gram",
    "obs_select",
    "output_error",
    "refit",
    "refit_residual",
    "RIDGE_GRID",
    "choose_ridge",
    "update_gram",
    "update_moments",
    "mixture_weights",
    "DEFAULT_ANCHOR_WEIGHT",
]

DEFAULT_RIDGE = 1e-2
RIDGE_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Append a column of ones: (T, C) -> (T, C+1), in float64."""
    x = x.double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def update_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += [x;1]ᵀ[x;1]`` in place. gram: (I+1, I+1) float64; x: (T, I). One batch's
    product is taken in x's precision (float32: half the time of float64 on CPU) and summed
    into the float64 total."""
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)  # (T, I+1)
    gram += (xb.T @ xb).double()


# The share of the refit's least-squares weight that ``--refit-anchor`` text gets, chosen on
# validation text (BENCHMARKS.md, issue 13: "A refit that holds up out of domain").
DEFAULT_ANCHOR_WEIGHT = 0.25


def mixture_weights(n_main: int, n_anchor: int, anchor_weight: float) -> torch.Tensor:
    """(n_main + n_anchor,) float64 row weights, mean 1: the first ``n_main`` rows share
    1 - ``anchor_weight`` of the total weight, the last ``n_anchor`` share ``anchor_weight``
    (the per-token mixture (1 - λ) E_main + λ E_anchor of the moments, whatever the row counts)."""
    if not 0.0 <= anchor_weight < 1.0:
        raise ValueError(f"anchor weight must be in [0, 1), got {anchor_weight}")
    if n_main < 1 or n_anchor < 0 or (anchor_weight > 0 and n_anchor < 1):
        raise ValueError(f"need rows of the main text, and of the anchor when it has weight "
                         f"(got {n_main} and {n_anchor})")
    n = n_main + n_anchor
    main = torch.full((n_main,), (1.0 - anchor_weight) * n / n_main, dtype=torch.float64)
    anchor = torch.full((n_anchor,), anchor_weight * n / max(n_anchor, 1), dtype=torch.float64)
    return torch.cat([main, anchor])


def update_moments(a: torch.Tensor, b: torch.Tensor, x_kept: torch.Tensor, target: torch.Tensor,
                   weight: torch.Tensor | None = None) -> None:
    """``A += x̄ᵀ W x̄``, ``B += x̄ᵀ W t`` in place (W = diag(weight), 1 when None). a: (K+1, K+1),
    b: (K+1, H) float64; x_kept: (T, K) kept activations; target: (T, H) the output the layer
    should reproduce; weight: (T,) each token's weight in the least-squares fit."""
    xb = augment(x_kept)  # (T, K+1)
    xw = xb if weight is None else xb * weight.to(xb)[:, None]  # (T, K+1)
    a += xw.T @ xb
    b += xw.T @ target.double()


def moments_from_gram(gram: torch.Tensor, w: torch.Tensor, keep: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the kept units for the target ``W x`` from G (I+1, I+1) and W (H, I)."""
    i = w.shape[1]
    kb = torch.cat([torch.as_tensor(list(keep), dtype=torch.long), torch.tensor([i])])  # (K+1,)
    a = gram.index_select(0, kb).index_select(1, kb)  # (K+1, K+1)
    b = gram.index_select(0, kb)[:, :i] @ w.double().T  # (K+1, I) @ (I, H) -> (K+1, H)
    return a, b


def refit(
    a: torch.Tensor, b: torch.Tensor, w_kept: torch.Tensor, ridge: float = DEFAULT_RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least-squares ``down_proj`` for the kept units: returns (W' (H, K), bias (H,)),
    float32, on ``a``'s device. a: (K+1, K+1), b: (K+1, H) moments; w_kept: (H, K) the plainly
    sliced weight."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    k, dev = w_kept.shape[1], a.device  # solved where the moments are (a GPU solves in seconds)
    a, b = a.double(), b.double().to(dev)
    lam = ridge * float(torch.diagonal(a)[:k].mean().clamp_min(1e-12))
    d = torch.ones(k + 1, dtype=torch.float64, device=dev)
    d[k] = 0.0  # the bias is not pulled towards anything
    theta0 = torch.cat([w_kept.double().T.to(dev),
                        torch.zeros(1, w_kept.shape[0], dtype=torch.float64, device=dev)])  # (K+1, H)
    lhs = a + lam * torch.diag(d)
    rhs = b + lam * d[:, None] * theta0
    # A tiny jitter keeps the solve defined when a unit never fired on the calibration text.
    jitter = 1e-10 * float(torch.diagonal(a).abs().max().clamp_min(1e-12))
    theta = torch.linalg.solve(lhs + jitter * torch.eye(k + 1, dtype=torch.float64, device=dev), rhs)  # (K+1, H)
    return theta[:k].T.float().contiguous(), theta[k].float().contiguous()


def refit_residual(a: torch.Tensor, b: torch.Tensor, target_energy: float, w_new: torch.Tensor,
                   bias: torch.Tensor) -> float:
    """``Σ ‖t − W' x_k − bias‖²`` over the calibration tokens, from the moments alone:
    ``Σ‖t‖² − 2 tr(Θᵀ B) + tr(Θᵀ A Θ)`` with ``Θ = [W'ᵀ; biasᵀ]`` ((K+1, H)). a: (K+1, K+1),
    b: (K+1, H); target_energy: ``Σ ‖t‖²`` (``tr(W G Wᵀ)`` for the dense output)."""
    theta = torch.cat([w_new.double().T, bias.double()[None]])  # (K+1, H)
    return float(target_energy - 2 * (theta * b.double()).sum() + (theta * (a.double() @ theta)).sum())


def choose_ridge(fit: tuple[torch.Tensor, torch.Tensor], held: tuple[torch.Tensor, torch.Tensor, float],
                 w_kept: torch.Tensor, grid: tuple[float, ...] = RIDGE_GRID) -> tuple[float, list[float]]:
    """The ridge of ``grid`` whose refit on the ``fit`` moments (A, B) leaves the least output
    error on held-out tokens (their moments A, B and target energy ``Σ‖t‖²``); also returns
    every ridge's held-out error (same order as ``grid``). w_kept: (H, K) the plain slice."""
    errors = [refit_residual(*held[:2], held[2], *refit(*fit, w_kept, r)) for r in grid]
    return grid[min(range(len(grid)), key=errors.__getitem__)], errors


def flap_bias(w: torch.Tensor, keep: list[int], mean: np.ndarray | torch.Tensor) -> torch.Tensor:
    """FLAP: ``W[:, removed] @ mean[removed]``, (H,) float32. w: (H, I); mean: (I,)."""
    removed = sorted(set(range(w.shape[1])) - set(int(j) for j in keep))
    if not removed:
        return torch.zeros(w.shape[0])
    idx = torch.tensor(removed, dtype=torch.long)
    m = torch.as_tensor(np.asarray(mean, dtype=np.float64))[idx]  # (R,)
    return (w.double().index_select(1, idx) @ m).float()


def output_error(x: torch.Tensor, w: torch.Tensor, keep: list[int], w_new: torch.Tensor, bias: torch.Tensor | None) -> float:
    """Mean squared error of the pruned layer's output against the dense one on tokens x (T, I)."""
    k = torch.as_tensor(keep, dtype=torch.long)
    dense = x.double() @ w.double().T  # (T, H)
    pruned = x.double().index_select(1, k) @ w_new.double().T  # (T, H)
    if bias is not None:
        pruned = pruned + bias.double()
    return float(((dense - pruned) ** 2).mean())


def obs_select(a: torch.Tensor, b: torch.Tensor, n_keep: int, ridge: float = DEFAULT_RIDGE,
               step: int = 1) -> list[int]:
    """Greedy optimal-brain-surgeon choice of the ``n_keep`` units to keep (sorted).

    a: (I+1, I+1), b: (I+1, H) moments of all units (constant last; :func:`moments_from_gram`
    with every unit kept, or accumulated against any target). With ``P = (A + λD)⁻¹`` and the
    least-squares map ``Θ = P B``, removing unit j and refitting the rest costs
    ``‖Θ[j]‖² / P_jj`` and changes ``Θ -= P[:, j] Θ[j] / P_jj``; ``P`` is downdated the same
    way (Schur complement). ``step`` units go per round: each costed alone, removed together
    exactly (block downdate). Refit the kept units afterwards with :func:`refit`."""
    i, dev = a.shape[0] - 1, a.device  # on the moments' device
    a = a.double()
    lam = ridge * float(torch.diagonal(a)[:i].mean().clamp_min(1e-12))
    d = torch.ones(i + 1, dtype=torch.float64, device=dev)
    d[i] = 0.0
    jitter = 1e-10 * float(a.diagonal().abs().max().clamp_min(1e-12))
    p = torch.linalg.inv(a + lam * torch.diag(d) + jitter * torch.eye(i + 1, dtype=torch.float64, device=dev))
    theta = p @ b.double().to(dev)  # (I+1, H)
    alive = torch.ones(i + 1, dtype=torch.bool, device=dev)
    while int(alive[:i].sum()) > n_keep:
        cost = (theta**2).sum(1) / torch.diagonal(p).clamp_min(1e-30)  # (I+1,)
        cost[~alive] = float("inf")
        cost[i] = float("inf")
        n = min(step, int(alive[:i].sum()) - n_keep)
        r = torch.argsort(cost)[:n]  # (n,) removed together: one block downdate (BLAS-3)
        prr = torch.linalg.inv(p[r][:, r])  # (n, n)
        pr = p[:, r]  # (I+1, n)
        theta -= pr @ (prr @ theta[r])
        p -= pr @ prr @ pr.T
        theta[r] = 0.0
        p[r] = 0.0
        p[:, r] = 0.0
        p[r, r] = 1.0  # keeps removed units inert in later downdates
        alive[r] = False
    return torch.nonzero(alive[:i]).flatten().tolist()
