"""Intermediate-feature distillation: the student's residual stream follows the teacher's, layer
by layer (Minitron's intermediate-state loss), beside the logit KL of :mod:`.finetune`.

Why: the logit KL says only what the last layer should produce; a pruned layer whose output
drifts is corrected through 30 layers of gradient. Matching each layer's output to the dense
model's output on the *same tokens* gives every layer its own target (as the local stage of
:mod:`.blockwise` does, but end to end: the student's layers see the student's inputs, so
errors that compound are trained away too).

The loss, for pairs (student layer s, teacher layer t) and hidden states (B, L, H)::

    feature_loss = mean over pairs and tokens of ‖h_s − h_t‖² / ‖h_t‖²

normalised per token: the residual stream grows with depth and a few tokens (the first, the
"attention sinks") carry norms hundreds of times the others', which a ratio of sums would let
dominate. Pairs: layer i with layer i when the counts match; a student with dropped layers pairs
each kept layer with its source, read from the plan the slicer wrote (``actprune_plan.json``).
The teacher must be live (its hidden states are too large to cache: layers × tokens × hidden).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from actprune.core.files import read_json_record
from actprune.core.tensor.hf_model import HfModel
from actprune.core.tensor.hooks import HookRegistry
from actprune.pruning.checkpoint.slicer import PLAN_RECORD
from actprune.pruning.data import DataError

__all__ = ["LayerOutputs", "feature_loss", "layer_pairs", "recorders"]


def layer_pairs(student_dir: str | Path, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) for every student layer. DataError when the student's
    layers cannot be traced to the teacher's (another model, or several slices in a row whose
    last plan does not start from the teacher)."""
    if n_student == n_teacher:
        return [(i, i) for i in range(n_student)]
    path = Path(student_dir) / PLAN_RECORD
    kept: list[int] = []
    layers = read_json_record(path).get("layers")  # {} for a missing or torn record: said below
    if isinstance(layers, list) and len(layers) == n_teacher:
        kept = [int(lp["index"]) for lp in layers if not lp.get("drop")]
    if len(kept) != n_student:
        raise DataError(f"--kd-hidden pairs the student's layers with the teacher's: the student has {n_student}, the "
                        f"teacher {n_teacher}, and {path} does not say which teacher layers the student kept "
                        f"(a plan over the teacher's {n_teacher} layers is needed)")
    return list(enumerate(kept))


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs and tokens of ‖s − t‖² / ‖t‖² (float32); student[k], teacher[k]: (B, L, H)
    hidden states of the k-th pair."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature_loss needs as many student as teacher states, got {len(student)} and {len(teacher)}")
    per_pair = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.to(s.device).float()
        err = (s - t).pow(2).sum(-1)  # (B, L)
        per_pair.append((err / t.pow(2).sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(per_pair).mean()


class LayerOutputs:
    """Collects the outputs of chosen decoder layers during one forward call, through the hook
    registry. Only inside :meth:`recording` (gradient checkpointing re-runs the forward during
    backward; those calls are not recorded)."""

    def __init__(self, model: Any, layers: list[int], group: str) -> None:
        all_layers = HfModel.of(_unwrap(model)).layers
        self.registry = HookRegistry()
        self._want = {idx: k for k, idx in enumerate(layers)}
        self._out: list[torch.Tensor | None] = [None] * len(layers)
        self._on = False
        for idx in layers:
            self.registry.post_hook(group, all_layers[idx], self._hook(self._want[idx]))

    def _hook(self, k: int):
        def hook(module, args, out):
            if self._on:
                self._out[k] = out[0] if isinstance(out, tuple) else out  # (B, L, H)
        return hook

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Yields the list the call's layer outputs land in (in ``layers`` order)."""
        self._out = [None] * len(self._want)
        got: list[torch.Tensor] = []
        self._on = True
        try:
            yield got
        finally:
            self._on = False
        missing = [k for k, o in enumerate(self._out) if o is None]
        if missing:
            raise RuntimeError(f"actprune: layers {missing} of the feature loss produced no output in this call")
        got.extend(o for o in self._out if o is not None)
        self._out = [None] * len(self._want)

    def __len__(self) -> int:
        return len(self._want)

    def remove(self) -> None:
        self.registry.remove_all()


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft (LoRA) wrapper


def recorders(student: Any, teacher: Any, student_dir: str | Path) -> tuple[LayerOutputs, LayerOutputs]:
    """(student, teacher) layer-output recorders of the hidden-state loss, paired by
    :func:`layer_pairs`: the k-th output of one goes with the k-th of the other."""
    pairs = layer_pairs(student_dir, len(HfModel.of(_unwrap(student)).layers), len(HfModel.of(teacher).layers))
    return (LayerOutputs(student, [s for s, _ in pairs], "kd-hidden-student"),
            LayerOutputs(teacher, [t for _, t in pairs], "kd-hidden-teacher"))
