"""Slice one decoder layer of a transformers model in place, as the sliced checkpoint would be.

The calibration and sensitivity passes prune the model they run on layer by layer, so that the
later layers see (or are measured with) the pruned earlier ones; these two functions give the
in-memory layer exactly the weights the slicer writes (:mod:`actprune.pruning.checkpoint.slicer`).

- :func:`apply_mlp`: keep neurons ``k``: gate/up rows, down_proj columns (H, K), optional new
  down_proj weight and bias.
- :func:`apply_attention`: keep query heads ``h`` and KV heads ``g`` (the plan's lists, GQA-legal:
  each kept query head's KV head is kept, and every kept group keeps as many query heads):
  q rows (h·D), k/v rows (g·D), o_proj columns (H, h·D), optional new o_proj weight and bias.
  Query head ``j`` of the sliced layer reads KV head ``j // (|h| / |g|)``, as in the stock model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from actprune.core.tensor.hf_model import HfModel
from torch import nn

__all__ = ["apply_attention", "apply_mlp", "head_channels"]


def head_channels(heads: list[int], head_dim: int) -> list[int]:
    """The (h·D,) channel indices of heads ``heads`` in a (…, heads·D) activation."""
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    """A copy of ``lin`` keeping output rows ``idx`` (and their bias entries)."""
    new = nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None, dtype=lin.weight.dtype,
                    device=lin.weight.device)
    new.weight.data = lin.weight.data.index_select(0, idx).clone()
    if lin.bias is not None:
        new.bias.data = lin.bias.data.index_select(0, idx).clone()
    return new


def _output(old: nn.Linear, w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An output projection with weight ``w`` (H, K); a fitted ``bias`` adds to ``old``'s own
    (the targets are ``W x`` without it), as in the slicer."""
    dt, dev = old.weight.dtype, old.weight.device
    new = nn.Linear(w.shape[1], old.out_features, bias=bias is not None or old.bias is not None,
                    dtype=dt, device=dev)
    new.weight.data = w.to(dt).to(dev).clone()
    if new.bias is not None:
        b = torch.zeros(old.out_features, dtype=dt, device=dev) if bias is None else bias.to(dt).to(dev)
        new.bias.data = b + (old.bias.data if old.bias is not None else 0.0)
    return new


def apply_mlp(view: HfModel, layer: nn.Module, keep: list[int], w_down: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> None:
    """Slice one layer's MLP to the ``keep`` neurons in place (gate/up rows, down columns), with
    an optional new ``down_proj`` weight (H, K) and bias (H,). Equals the sliced checkpoint."""
    gate, up, down = view.mlp(layer)
    k = torch.as_tensor(keep, dtype=torch.long, device=down.weight.device)
    w = down.weight.data.index_select(1, k) if w_down is None else w_down
    view.set_mlp(layer, _rows(gate, k), _rows(up, k), _output(down, w, bias))


def apply_attention(view: HfModel, layer: nn.Module, heads: list[int], kv_heads: list[int], head_dim: int,
                    w_o: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> Callable[[], None]:
    """Slice one layer's attention to query heads ``heads`` and KV heads ``kv_heads`` in place,
    with an optional new ``o_proj`` weight (H, |heads|·D) and bias (H,). Returns a function that
    puts the dense attention back (for passes that prune one layer at a time)."""
    attn, q, k, v, o = view.attention(layer)
    groups = attn.num_key_value_groups
    dev = o.weight.device
    qc = torch.as_tensor(head_channels(heads, head_dim), dtype=torch.long, device=dev)  # (h·D,)
    kc = torch.as_tensor(head_channels(kv_heads, head_dim), dtype=torch.long, device=dev)  # (g·D,)
    w = o.weight.data.index_select(1, qc) if w_o is None else w_o  # (H, h·D)
    view.set_attention(layer, _rows(q, qc), _rows(k, kc), _rows(v, kc), _output(o, w, bias))
    attn.num_key_value_groups = len(heads) // len(kv_heads)  # repeat_kv / GQA reads it

    def undo() -> None:
        view.set_attention(layer, q, k, v, o)
        attn.num_key_value_groups = groups

    return undo
