"""The teacher's top-k next-token distribution, computed once and kept on disk, so distillation
does not keep the teacher in memory (or run it) during training.

One pass of the teacher over the packed training rows writes, per row and position, the k most
likely next tokens and their log-probabilities at the distillation temperature T::

    indices  (N, L, k) int32    top-k token ids, most likely first
    logprobs (N, L, k) float32  log p_T(v) = z_v / T - logsumexp(z / T), of the FULL softmax

Because the log-probabilities are of the full softmax, the mass the top-k leave out is known,
``1 - Σ_k p_T``, and the loss (:func:`topk_kd_loss`) is the KL divergence between teacher and
student *on k + 1 outcomes* — the k tokens and "any other token" — exact for that partition and
never more than the full KL (grouping outcomes cannot increase a KL divergence). At k = 64 the
tail of a 150k vocabulary holds a few per cent of the mass; the test compares with the full KL.

Rows are found by content (a hash of their token ids), so the training order, resumes and
duplicate rows need no bookkeeping. The file records the hash of all rows, k, T and the
teacher's config: a cache that does not match the run is rebuilt, never silently reused.
Size: N · L · k · 8 bytes (256k tokens at k = 64: 131 MB).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from actprune.core.files import atomic_write
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

__all__ = ["FORMAT", "TeacherCache", "build_cache", "rows_digest", "teacher_id", "topk_kd_loss"]

FORMAT = "actprune.teacher_topk"


def rows_digest(rows: torch.Tensor) -> str:
    """sha256 of (N, L) int64 token rows: which data a cache belongs to."""
    return hashlib.sha256(rows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def teacher_id(model_dir: str | Path) -> str:
    """What identifies a teacher for its cache: its config and the name, size and modification
    time of each weight file (a re-trained teacher of the same shape is written anew, so its
    times differ; hashing the content would read the whole teacher). Delete the cache, or pass
    another --teacher-cache, to force a new pass."""
    d = Path(model_dir)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.glob("*.safetensors"))
    config = (d / "config.json").read_bytes() if (d / "config.json").is_file() else b""
    return hashlib.sha256(config + json.dumps(files).encode()).hexdigest()[:16]


def _row_key(row: torch.Tensor) -> bytes:
    return hashlib.blake2b(row.to(torch.int64).contiguous().numpy().tobytes(), digest_size=16).digest()


def _meta(rows: torch.Tensor, k: int, temperature: float, teacher_id: str) -> dict[str, str]:
    return {"format": FORMAT, "rows_sha256": rows_digest(rows), "k": str(k),
            "temperature": repr(float(temperature)), "teacher": teacher_id}


@torch.no_grad()
def build_cache(
    teacher: Any, rows: torch.Tensor, path: Path, *, k: int, temperature: float, teacher_id: str,
    batch_size: int = 8, device: torch.device | None = None, progress: bool = True,
) -> Path:
    """Run ``teacher`` over ``rows`` (N, L) and write the top-k file at ``path`` (atomically)."""
    n, length = rows.shape
    indices = torch.empty(n, length, k, dtype=torch.int32)
    logprobs = torch.empty(n, length, k, dtype=torch.float32)
    device = device or next(teacher.parameters()).device
    bar = tqdm(total=n * length, desc="teacher top-k", unit="tok", disable=not progress)
    for start in range(0, n, batch_size):
        ids = rows[start : start + batch_size].to(device)
        logits = teacher(input_ids=ids).logits.float() / temperature  # (B, L, V)
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        top = logp.topk(k, dim=-1)  # values sorted, most likely first
        logprobs[start : start + len(ids)] = top.values.cpu()
        indices[start : start + len(ids)] = top.indices.to(torch.int32).cpu()
        bar.update(ids.numel())
    bar.close()
    meta = _meta(rows, k, temperature, teacher_id)
    return atomic_write(path, save({"indices": indices, "logprobs": logprobs}, metadata=meta))


class TeacherCache:
    """A top-k file opened for one run: ``lookup(ids)`` gives the teacher's top-k of those rows."""

    def __init__(self, path: Path, rows: torch.Tensor) -> None:
        with safe_open(str(path), framework="pt") as f:
            self.meta = f.metadata() or {}
            self.indices = f.get_tensor("indices")  # (N, L, k) int32
            self.logprobs = f.get_tensor("logprobs")  # (N, L, k) float32
        self._row_of = {_row_key(r): i for i, r in enumerate(rows)}

    @classmethod
    def open_if_valid(cls, path: Path, rows: torch.Tensor, *, k: int, temperature: float,
                      teacher_id: str) -> TeacherCache | None:
        """The cache at ``path`` when it was built for these rows, k, T and teacher; else None."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # a damaged file is rebuilt
            return None
        if meta != _meta(rows, k, temperature, teacher_id):
            return None
        return cls(path, rows)

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs (B, L, k) float32, indices (B, L, k) int64) of the rows ``ids`` (B, L)."""
        try:
            at = torch.tensor([self._row_of[_row_key(r)] for r in ids.cpu()])
        except KeyError:
            raise KeyError("a training row is not in the teacher cache; it was built for other data") from None
        return self.logprobs[at], self.indices[at].to(torch.int64)


def topk_kd_loss(student: torch.Tensor, t_logprobs: torch.Tensor, t_indices: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) over the k cached tokens plus one "any other token" outcome,
    mean over the predicting positions (the last position predicts nothing, as in kd_loss).

    student: (B, L, V) logits; t_logprobs, t_indices: (B, L, k), log-probabilities of the full
    teacher softmax at T and their token ids."""
    s_logp = torch.log_softmax(student[:, :-1].float() / temperature, dim=-1)  # (B, L-1, V)
    t_logp = t_logprobs[:, :-1].to(s_logp.device)  # (B, L-1, k)
    s_top = s_logp.gather(-1, t_indices[:, :-1].to(s_logp.device))  # (B, L-1, k)
    t_p = t_logp.exp()
    kl_top = (t_p * (t_logp - s_top)).sum(-1)  # (B, L-1)
    # the rest of the vocabulary as one outcome: r = 1 - Σ_k p, in log space for precision
    t_rest = _log1mexp(torch.logsumexp(t_logp, dim=-1))
    s_rest = _log1mexp(torch.logsumexp(s_top, dim=-1))
    kl_rest = t_rest.exp() * (t_rest - s_rest)
    return (kl_top + kl_rest).mean() * temperature**2


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends; -inf clamped to a very small mass so that
    0 · log 0 terms stay 0."""
    x = x.clamp(max=-1e-7)
    out = torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return out.clamp(min=-80.0)

