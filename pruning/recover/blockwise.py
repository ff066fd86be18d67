"""Local recovery before global training: each pruned decoder layer learns to reproduce the dense
layer's output from the dense layer's input (block-wise distillation, as in the layer-wise
reconstruction of LLM-Streamline / "local then global" recipes).

Why: a pruned layer's error is mostly its own — a smaller MLP or fewer heads computing from the
same residual stream. Matching it layer by layer is cheap (one layer's forward and backward per
step, on stored inputs; the layers are independent, so no error compounds) and needs no
labels. Global training (:mod:`.finetune`) then starts from a student whose layers already agree
with the teacher's, and spends its tokens on what only end-to-end training fixes.

How: one pass of the teacher over ``rows`` stores every layer's input and output — the hidden
states (B, L, H) and the keyword arguments the model passes its layers (rotary embeddings,
attention mask) — on the CPU; then for each layer i, the student's layer i is trained with
AdamW to minimise ``‖f_s(x) − f_t(x)‖² / ‖f_t(x) − x‖²`` (the error relative to what the dense
layer adds to the residual stream, so layers of different scales weigh alike), x = the dense
input. Memory: 2 · layers · tokens · hidden · 4 bytes (SmolLM2-135M, 16k tokens: 2.3 GB);
``max_tokens`` bounds it. The student's other layers are untouched, and the student must have
the teacher's layer count (a plan that drops layers is refused here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from actprune.core.tensor.hf_model import HfModel
from actprune.core.tensor.hooks import HookRegistry
from actprune.pruning.data import DataError
from tqdm.auto import tqdm

__all__ = ["LayerRecord", "blockwise_distill", "capture_layer_io", "relative_error"]


@dataclass
class LayerRecord:
    """One batch through one dense layer: its input, its output and the rest of its call."""

    hidden_in: torch.Tensor  # (B, L, H)
    hidden_out: torch.Tensor  # (B, L, H)
    kwargs: dict[str, Any]  # position embeddings, attention mask, ... (tensors on the CPU)


def relative_error(pred: torch.Tensor, target: torch.Tensor, hidden_in: torch.Tensor) -> torch.Tensor:
    """‖pred − target‖² / ‖target − hidden_in‖²: the layer's error relative to its contribution."""
    return (pred - target).pow(2).sum() / (target - hidden_in).pow(2).sum().clamp_min(1e-12)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def capture_layer_io(teacher: Any, rows: torch.Tensor, batch_size: int) -> list[list[LayerRecord]]:
    """records[i][b]: layer i of the teacher on batch b, stored on the CPU."""
    view = HfModel.of(teacher)
    device = next(teacher.parameters()).device
    records: list[list[LayerRecord]] = [[] for _ in view.layers]
    pending: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
    reg = HookRegistry()

    def pre(i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: _to(v, "cpu") for k, v in kwargs.items()
                    if k not in ("hidden_states", "past_key_values", "past_key_value")}
            pending[i] = (hidden.detach().cpu(), rest)
        return hook

    def post(i: int):
        def hook(module, args, kwargs, out):
            hidden_in, rest = pending.pop(i)
            records[i].append(LayerRecord(hidden_in, _first(out).detach().cpu(), rest))
        return hook

    try:
        for i, layer in enumerate(view.layers):
            reg.pre_hook("blockwise", layer, pre(i), with_kwargs=True)
            reg.post_hook("blockwise", layer, post(i), with_kwargs=True)
        for start in range(0, len(rows), batch_size):
            teacher(input_ids=rows[start : start + batch_size].to(device), use_cache=False)
    finally:
        reg.remove_all()
    return records


def blockwise_distill(
    student: Any, teacher: Any, rows: torch.Tensor, *, steps: int, lr: float, batch_size: int,
    max_tokens: int = 16384, progress: bool = True,
) -> list[dict[str, float]]:
    """Train each student layer on the teacher's stored layer inputs and outputs (in place).

    The last quarter of the batches (at least one, when there are two) is held out: each layer
    keeps the weights of its best held-out error, checked every few steps, so this stage never
    leaves a layer worse on held-out text than it found it. Returns per layer the relative error
    on the training and the held-out batches, before and after."""
    s_layers, t_layers = HfModel.of(student).layers, HfModel.of(teacher).layers
    if len(s_layers) != len(t_layers):
        raise DataError(f"--local-steps needs the teacher's layer count ({len(t_layers)}), the student has "
                        f"{len(s_layers)}: block-wise distillation pairs layer i with layer i")
    rows = rows[: max(1, max_tokens // rows.shape[1])]
    records = capture_layer_io(teacher, rows, batch_size)
    n_batches = len(records[0])
    held = n_batches // 4 or (1 if n_batches >= 2 else 0)
    device = next(student.parameters()).device
    check_every = max(1, steps // 10)
    report = []
    bar = tqdm(total=len(s_layers) * steps, desc="local (per layer)", unit="step", disable=not progress)
    try:
        for i, layer in enumerate(s_layers):
            train, val = records[i][: n_batches - held], records[i][n_batches - held :] or records[i]
            row = {"layer": i, "train_before": _layer_error(layer, train, device),
                   "heldout_before": _layer_error(layer, val, device)}
            best, best_state = row["heldout_before"], _copy_state(layer)
            trainable = [p for p in layer.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, foreach=False)
            for step in range(steps):
                layer.train()
                rec = train[step % len(train)]
                x, y = rec.hidden_in.to(device), rec.hidden_out.to(device)
                out = _first(layer(x, **{k: _to(v, device) for k, v in rec.kwargs.items()}))
                relative_error(out.float(), y.float(), x.float()).backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                bar.update(1)
                if (step + 1) % check_every == 0 or step + 1 == steps:
                    err = _layer_error(layer, val, device)
                    if err < best:
                        best, best_state = err, _copy_state(layer)
            layer.load_state_dict(best_state)
            layer.eval()
            row.update(train_after=_layer_error(layer, train, device), heldout_after=best)
            report.append(row)
    finally:
        bar.close()
    return report


def _copy_state(layer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


@torch.no_grad()
def _layer_error(layer: Any, records: list[LayerRecord], device: torch.device) -> float:
    layer.eval()
    num = den = 0.0
    for rec in records:
        x, y = rec.hidden_in.to(device), rec.hidden_out.to(device)
        out = _first(layer(x, **{k: _to(v, device) for k, v in rec.kwargs.items()})).float()
        num += (out - y.float()).pow(2).sum().item()
        den += (y.float() - x.float()).pow(2).sum().item()
    return num / max(den, 1e-12)
