"""Gradual pruning: prune → recover → re-collect → prune further, while quality holds.

One step per entry of ``ratios`` (fractions of the *original* model's MLP neurons removed, e.g.
0.2 → 0.3 → 0.4)::

    stats   of the current model (step 1: given, e.g. pulled from the server; later: recorded
            offline on the recovered model of the previous step, with the same accumulators)
    plan    the step's local ratio, so that the result keeps (1 - ratio) of the original width:
            local = 1 - (1 - ratio) · original_total / current_total
    prune   slice (optionally refit the kept down_proj columns, or FLAP bias)
    recover fine-tune, by default distilling from the *original* model (not the previous step)
    eval    perplexity of the recovered model on held-out text, relative to the original's

and stops at the first step whose recovered perplexity exceeds ``max_ppl_ratio`` × the original;
the accepted model is then the previous step's. Everything lands under the work directory::

    WORK/iterate.json                 config, original perplexity, one record per finished step
    WORK/step-1-20/{stats.safetensors, plan.json, pruned/, recovered/}

A rerun with the same config resumes after the last finished step (a step is finished when its
record is in iterate.json); a different config is refused unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from actprune.core.errors import ActpruneError
from actprune.core.files import atomic_write, read_json_record
from actprune.pruning.recover.recipe_config import loop_recovery

__all__ = ["IterateConfig", "IterateError", "StepResult", "local_ratio", "run_iterate", "table"]

# Options that may change between a run and its resume without changing any step's result.
_RESUME_FREE = ("progress", "overwrite", "max_ppl_ratio", "trust_remote_code")
# Options added after runs existed: in the key only when set, so those runs still resume.
_KEYED_WHEN_SET = ("refit_anchor", "refit_anchor_weight")


class IterateError(ActpruneError):
    """A configuration or work-directory problem the user can fix."""


@dataclass
class IterateConfig:
    model: str  # the original checkpoint
    output: str  # work directory
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4])
    max_ppl_ratio: float = 1.3  # stop when recovered perplexity > this × the original's
    stats: str | None = None  # stats of the original for step 1 (else recorded offline)
    calibration: str = "wiki:calibration"
    calibration_tokens: int = 50_000
    calibration_text_field: str | None = None
    train_data: str = "wiki:train"
    text_field: str | None = None
    finetune_steps: int = 100
    distil: bool = True
    eval_data: str = "wiki:heldout"
    eval_text_field: str | None = None
    eval_tokens: int = 20_000
    eval_seq_len: int = 256
    refit: bool = False  # refit kept down_proj columns on the calibration data
    refit_anchor: str | None = None  # other domains' text mixed into the refit (refit_for_plan)
    refit_anchor_weight: float | None = None
    bias_compensation: bool = False
    plan: dict[str, Any] = field(default_factory=dict)  # PlanRequest fields besides mlp_ratio
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig overrides
    trust_remote_code: bool = False  # run code named by the original's auto_map (steps are actprune's own)
    progress: bool = True
    overwrite: bool = False

    def key(self) -> str:
        """Hash of everything that decides the steps' results."""
        d = {k: v for k, v in asdict(self).items()
             if k not in _RESUME_FREE and not (k in _KEYED_WHEN_SET and v is None)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StepResult:
    step: int
    ratio: float  # target: fraction of the original MLP neurons removed
    achieved_ratio: float  # after rounding / width multiples
    local_ratio: float  # what this step's plan removed from the current model
    mlp_neurons: int
    parameters: int
    pruned_perplexity: float
    recovered_perplexity: float
    ppl_ratio: float  # recovered / original
    accepted: bool
    pruned: str
    recovered: str


def local_ratio(ratio: float, original_total: int, current_total: int) -> float:
    """Fraction of the current model's MLP neurons to remove so that ``ratio`` of the original's
    are gone: ``1 - (1 - ratio) · original / current``. Raises when the current model is already
    at or past the target."""
    if not 0 < ratio < 1:
        raise IterateError(f"ratios must be in (0, 1), got {ratio}")
    local = 1.0 - (1.0 - ratio) * original_total / current_total
    if local <= 0:
        raise IterateError(f"ratio {ratio} is not above the current model's "
                           f"{1 - current_total / original_total:.3f}; give increasing ratios")
    return local


def _mlp_total(model_dir: Path) -> int:
    from actprune.core.archs import model_shape
    from actprune.core.config import read_config

    return sum(model_shape(read_config(model_dir)).mlp_widths)


def _perplexity(model_dir: Path, rows: Any, progress: bool, trust_remote_code: bool = False) -> float:
    from actprune.pruning.checkpoint.hf_io import compute_device, load_causal_lm
    from actprune.pruning.evaluate.perplexity import nll_and_kl

    model = load_causal_lm(model_dir, trust_remote_code=trust_remote_code).to(compute_device())
    nll, _, tokens = nll_and_kl([model], rows, batch_size=4, progress=progress,
                                desc=f"eval {model_dir.parent.name}/{model_dir.name}")
    return math.exp(nll[0] / tokens)


def _load_state(work: Path, cfg: IterateConfig) -> dict[str, Any]:
    path = work / "iterate.json"
    if path.is_file():
        state = read_json_record(path)  # {}: torn or edited by hand (it is written atomically)
        if state.get("key") == cfg.key():
            return state
        if not cfg.overwrite:
            what = "a run with another configuration" if state else f"an unreadable {path.name}"
            raise IterateError(f"{work} holds {what}; choose a new directory or pass --overwrite "
                               "to start over")
        for old in work.glob("step-*"):
            shutil.rmtree(old)
    return {"key": cfg.key(), "config": asdict(cfg), "original": None, "steps": []}


def _save_state(work: Path, state: dict[str, Any]) -> None:
    atomic_write(work / "iterate.json", (json.dumps(state, indent=2) + "\n").encode())


def _step(cfg: IterateConfig, n: int, ratio: float, current: Path, original_total: int,
          stats_in: Any, rows: Any, original_ppl: float) -> StepResult:
    from actprune.pruning import workflow as api

    work = Path(cfg.output) / f"step-{n}-{round(ratio * 100)}"
    work.mkdir(parents=True, exist_ok=True)
    if stats_in is None:  # re-collect on the current (recovered) model
        stats_in = api.record_stats(current, cfg.calibration, text_field=cfg.calibration_text_field,
                                    max_tokens=cfg.calibration_tokens, progress=cfg.progress,
                                    trust_remote_code=cfg.trust_remote_code)
    stats_in.save(work / "stats.safetensors")
    local = local_ratio(ratio, original_total, _mlp_total(current))
    plan = api.make_plan(stats_in, current, output=work / "plan.json", **{**cfg.plan, "mlp_ratio": local})
    refit = attn = None
    if cfg.refit:
        from actprune.pruning.compensate.refit_plan import refit_for_plan

        plan, refit, attn = refit_for_plan(current, plan, cfg.calibration, tokens=cfg.calibration_tokens,
                                     text_field=cfg.calibration_text_field, progress=cfg.progress,
                                     trust_remote_code=cfg.trust_remote_code, anchor=cfg.refit_anchor,
                                     anchor_weight=cfg.refit_anchor_weight)
    from actprune.pruning.checkpoint.slicer import slice_checkpoint

    pruned = slice_checkpoint(current, plan, work / "pruned", overwrite=True, progress=cfg.progress,
                              stats=stats_in if cfg.bias_compensation else None, mlp_refit=refit,
                              attn_refit=attn)
    recovered = pruned
    if cfg.finetune_steps > 0:
        ft = loop_recovery(cfg.finetune_steps, **{"text_field": cfg.text_field, "progress": cfg.progress,
                                                  **cfg.finetune, "trust_remote_code": cfg.trust_remote_code})
        if (work / "recovered").exists():
            shutil.rmtree(work / "recovered")  # a killed step starts its recovery over
        recovered = api.finetune(pruned, cfg.train_data, work / "recovered",
                                 teacher=cfg.model if cfg.distil else None, **ft)
    pruned_ppl = _perplexity(pruned, rows, cfg.progress)
    rec_ppl = pruned_ppl if recovered == pruned else _perplexity(recovered, rows, cfg.progress)
    from actprune.core.tensor.checkpoint import ShardIndex

    params = ShardIndex(recovered).parameters()  # from the headers
    total = _mlp_total(recovered)
    return StepResult(
        step=n, ratio=ratio, achieved_ratio=1 - total / original_total, local_ratio=local,
        mlp_neurons=total, parameters=params, pruned_perplexity=pruned_ppl,
        recovered_perplexity=rec_ppl, ppl_ratio=rec_ppl / original_ppl,
        accepted=rec_ppl / original_ppl <= cfg.max_ppl_ratio, pruned=str(pruned), recovered=str(recovered),
    )


def run_iterate(cfg: IterateConfig) -> dict[str, Any]:
    """Run (or resume) the gradual loop; returns the iterate.json record. ``final`` in it is the
    path of the last accepted model (None when even the first step exceeds the threshold)."""
    from actprune.core.wire.stats import Stats
    from actprune.pruning import workflow as api
    from actprune.pruning.checkpoint.hf_io import load_tokenizer
    from actprune.pruning.data import packed_rows

    if not cfg.ratios or any(b <= a for a, b in zip(cfg.ratios, cfg.ratios[1:], strict=False)):
        raise IterateError(f"ratios must be increasing, got {cfg.ratios}")
    if cfg.max_ppl_ratio <= 0:
        raise IterateError(f"max_ppl_ratio must be > 0, got {cfg.max_ppl_ratio}")
    if cfg.refit and cfg.bias_compensation:
        raise IterateError("refit fits the bias itself; choose refit or bias compensation")
    if cfg.refit_anchor is not None and not cfg.refit:
        raise IterateError("a refit anchor needs refit")
    if "mlp_ratio" in cfg.plan:
        raise IterateError("the steps' MLP ratios come from ratios; do not set mlp_ratio in plan")
    original = Path(cfg.model)
    work = Path(cfg.output)
    work.mkdir(parents=True, exist_ok=True)
    state = _load_state(work, cfg)
    tok = load_tokenizer(original, trust_remote_code=cfg.trust_remote_code)
    rows = packed_rows(tok, cfg.eval_data, cfg.eval_text_field, cfg.eval_seq_len)[
        : max(1, cfg.eval_tokens // cfg.eval_seq_len)]  # (N, L)
    if state["original"] is None:
        state["original"] = {"perplexity": _perplexity(original, rows, cfg.progress, cfg.trust_remote_code),
                             "mlp_neurons": _mlp_total(original)}
        _save_state(work, state)
    original_ppl, original_total = state["original"]["perplexity"], state["original"]["mlp_neurons"]
    # The threshold may change on a resume: finished steps are judged again against it (their
    # records are kept, so relaxing it later reuses them) and the loop stops at the first one
    # past it.
    done = [StepResult(**{**s, "accepted": s["ppl_ratio"] <= cfg.max_ppl_ratio}) for s in state["steps"]]
    current, final = original, None
    for n, ratio in enumerate(cfg.ratios, 1):
        if n > len(done):
            stats_in = None
            if n == 1:
                stats_in = Stats.load(cfg.stats) if cfg.stats else api.record_stats(
                    original, cfg.calibration, text_field=cfg.calibration_text_field,
                    max_tokens=cfg.calibration_tokens, progress=cfg.progress,
                    trust_remote_code=cfg.trust_remote_code)
            done.append(_step(cfg, n, ratio, current, original_total, stats_in, rows, original_ppl))
            state["steps"] = [asdict(s) for s in done]
            _save_state(work, state)
        if not done[n - 1].accepted:
            break
        current = final = Path(done[n - 1].recovered)
    state["steps"] = [asdict(s) for s in done]
    state["final"] = None if final is None else str(final)
    _save_state(work, state)
    return state


def table(state: dict[str, Any]) -> str:
    """The steps as a Markdown table."""
    o = state["original"]
    lines = ["| step | MLP removed | parameters | pruned ppl | recovered ppl | × original | accepted |",
             "|---|---|---|---|---|---|---|",
             f"| original | 0 % | – | {o['perplexity']:.2f} | – | 1.00× | – |"]
    for s in state["steps"]:
        lines.append(f"| {s['step']} | {s['achieved_ratio'] * 100:.1f} % | {s['parameters']:,} | "
                     f"{s['pruned_perplexity']:.2f} | {s['recovered_perplexity']:.2f} | "
                     f"{s['ppl_ratio']:.2f}× | {'yes' if s['accepted'] else 'no'} |")
    return "\n".join(lines)
