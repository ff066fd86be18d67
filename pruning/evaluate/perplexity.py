"""Side-by-side evaluation of checkpoints (original first, then pruned / recovered ones).

For every model, on the same packed held-out rows (documents joined by EOS, cut into rows of
``seq_len`` tokens, every position but the first predicted)::

    perplexity = exp(Σ NLL / predicted tokens)
    kl         = mean over predicted tokens of KL(p_first ‖ p_model)   (0 for the first model)

plus greedy generations for a prompt set, and, when tasks are named, task accuracy through
lm-eval (:mod:`.harness`). At most two models are in memory at once: the first
(the reference) and the one being scored, so the reference runs once more per compared model
(one extra forward each) instead of every checkpoint sharing the memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from actprune.core.archs import model_shape
from tqdm.auto import tqdm

__all__ = [
    "DEFAULT_PROMPTS",
    "ModelResult",
    "evaluate_models",
    "generate_greedy",
    "load_prompts",
    "mean_losses",
    "nll_and_kl",
]

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Neural networks learn",
    "The museum opens at",
    "Question: where is the station?\nAnswer:",
]


@dataclass
class ModelResult:
    name: str
    path: str
    perplexity: float
    nll: float  # mean NLL per predicted token
    tokens: int
    kl_vs_first: float
    parameters: int
    mlp_widths: list[int]
    generations: list[str] = field(default_factory=list)
    # lm-eval task -> metrics with standard errors ({"acc": …, "acc_stderr": …, "n": …})
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def nll_and_kl(
    models: Sequence[torch.nn.Module], rows: torch.Tensor, batch_size: int = 4, progress: bool = True,
    desc: str = "perplexity",
) -> tuple[list[float], list[float], int]:
    """Σ NLL and Σ KL(p_models[0] ‖ p_model) over the predicted tokens of ``rows`` (N, L);
    returns (nll sums, kl sums, predicted tokens)."""
    nll = [0.0] * len(models)
    kl = [0.0] * len(models)
    tokens = 0
    for ids in tqdm(rows.split(batch_size), desc=desc, unit="batch", disable=not progress):
        target = ids[:, 1:].flatten()  # (B*(L-1),)
        ref_logp = None
        for j, m in enumerate(models):
            dev = next(m.parameters()).device
            logits = m(input_ids=ids.to(dev), use_cache=False).logits[:, :-1]  # (B, L-1, V)
            logp = F.log_softmax(logits.float().flatten(0, 1), dim=-1).cpu()  # (B*(L-1), V)
            nll[j] += F.nll_loss(logp, target, reduction="sum").item()
            if ref_logp is None:
                ref_logp = logp
            else:
                kl[j] += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        tokens += target.numel()
    return nll, kl, tokens


def mean_losses(model_dir: Path, sets: dict[str, torch.Tensor], trust_remote_code: bool = False,
                progress: bool = True, device: str | None = None) -> dict[str, float]:
    """Mean next-token loss of the checkpoint at ``model_dir``, loaded as a user would (fp32), on
    each named set of token rows (N, L) — compress's validation — on ``device`` (None: a GPU
    when one is visible)."""
    from actprune.pruning.checkpoint.hf_io import load_causal_lm

    model = load_causal_lm(model_dir, torch.float32, trust_remote_code=trust_remote_code,
                           device=device or "auto")
    out = {}
    for name, rows in sets.items():
        nll, _, tokens = nll_and_kl([model], rows, batch_size=2, progress=progress, desc=f"validation {name}")
        out[name] = nll[0] / tokens
    return out


@torch.no_grad()
def generate_greedy(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuation of each prompt (one at a time: no padding to get wrong)."""
    out = []
    dev = next(model.parameters()).device
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt").to(dev)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def load_prompts(path: str | None) -> list[str]:
    """Prompts from a .txt file (one per line) or .jsonl (field ``prompt``); default set if None."""
    from actprune.pruning.data import DataError

    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--prompts {path}: no such file")
    if p.suffix == ".jsonl":
        from actprune.core.files import JsonlError, read_jsonl

        try:
            records = read_jsonl(p)
        except JsonlError as e:
            raise DataError(f"--prompts: {e}") from e
        prompts = []
        for n, rec in records:
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
                raise DataError(f"{p}:{n}: 'prompt' must be a non-empty string")
            prompts.append(rec["prompt"])
    else:
        prompts = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise DataError(f"--prompts {path}: no prompts")
    return prompts


def evaluate_models(
    model_dirs: Sequence[str],
    rows: torch.Tensor,
    prompts: Sequence[str],
    *,
    batch_size: int = 4,
    max_new_tokens: int = 32,
    progress: bool = True,
    trust_remote_code: bool = False,
    tasks: Any = None,
) -> list[ModelResult]:
    """Load every checkpoint, score them on ``rows`` against the first, generate, and with
    ``tasks`` (a :class:`~actprune.pruning.evaluate.harness.TaskSuite`) measure task
    accuracy through lm-eval (``trust_remote_code``: run code their ``auto_map`` names, see
    checkpoint.trust)."""
    from actprune.core.config import read_config
    from actprune.pruning.checkpoint.hf_io import compute_device, load_causal_lm, load_tokenizer

    configs = [read_config(d) for d in model_dirs]
    vocab = {c.get("vocab_size") for c in configs}
    if len(vocab) > 1:
        from actprune.core.config import CheckpointError

        raise CheckpointError(f"the models have different vocabularies {sorted(vocab)}; KL needs one")
    device = compute_device()
    tok = load_tokenizer(model_dirs[0], trust_remote_code=trust_remote_code)
    ref = load_causal_lm(model_dirs[0], trust_remote_code=trust_remote_code).to(device)
    results = []
    for j, (d, cfg) in enumerate(zip(model_dirs, configs, strict=True)):
        m = ref if j == 0 else load_causal_lm(d, trust_remote_code=trust_remote_code).to(device)
        desc = f"{Path(d).name} ({j + 1}/{len(model_dirs)})"
        nll, kl, tokens = nll_and_kl([ref] if j == 0 else [ref, m], rows, batch_size, progress, desc=desc)
        mean_nll = nll[-1] / tokens
        r = ModelResult(
            name=Path(d).name, path=str(d), perplexity=math.exp(mean_nll), nll=mean_nll,
            tokens=tokens, kl_vs_first=kl[-1] / tokens, parameters=sum(p.numel() for p in m.parameters()),
            mlp_widths=model_shape(cfg).mlp_widths,
        )
        r.generations = generate_greedy(m, tok, prompts, max_new_tokens)
        if tasks is not None:
            r.tasks = tasks.run(m, tok)
        results.append(r)
        if m is not ref:
            del m  # free it before the next checkpoint loads
    return results
