"""The pruning workflow as plain functions, for notebooks and scripts.

Every function is a thin layer over the module that does the work, and takes the same inputs
as the matching CLI command (``actprune record / plan / prune / finetune / eval``)::

    from actprune.pruning import workflow as api

    stats = api.load_stats("stats.safetensors")            # or api.pull_stats(url) / record_stats(dir)
    table = api.analyze(stats)                              # per-layer figures
    weak = api.pruning_candidates(stats, 0.3, "importance")  # layer -> lowest-scored MLP neurons
    plan = api.make_plan(stats, "Qwen3-8B/", mlp_ratio=0.3)
    api.prune("Qwen3-8B/", plan, "pruned/")
    api.finetune("pruned/", "wiki:train", "recovered/", teacher="Qwen3-8B/", max_steps=200)
    results = api.evaluate(["Qwen3-8B/", "pruned/", "recovered/"], output="eval/")

    result = api.run_pipeline("Qwen3-8B/", "work/", mlp_ratio=0.3)   # all of the above

Errors are the library's own (``PlanError``, ``SliceError``, ``DataError``, ``CheckpointError``,
``StatsFormatError``), each with a message naming the problem.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from actprune.core.archs import model_shape, spec_for_config
from actprune.core.config import read_config
from actprune.core.planning.planner import make_plan as _make_plan
from actprune.core.planning.scores import (
    STRATEGIES,
    GroupFigures,
    ScoreInput,
    describe_group,
    head_scores,
    layer_scores,
)
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.wire.plan import Plan, PlanError, format_validation_error
from actprune.core.wire.plan_request import ImportanceWeights, PlanRequest
from actprune.core.wire.stats import Stats
from pydantic import ValidationError

__all__ = [
    "LayerAnalysis",
    "PipelineResult",
    "analyze",
    "drop_layers",
    "evaluate",
    "finetune",
    "load_stats",
    "make_plan",
    "prune",
    "prune_heads",
    "prune_mlp",
    "pruning_candidates",
    "pull_stats",
    "record_stats",
    "run_pipeline",
]

PathLike = str | os.PathLike[str]
Unit = Literal["mlp", "heads", "layers"]


# ---- statistics in ------------------------------------------------------------------------
def load_stats(path: PathLike) -> Stats:
    """A stats file (from the server, ``actprune stats pull`` or :func:`record_stats`), validated."""
    return Stats.load(path)


def pull_stats(base_urls: str | list[str], output: PathLike | None = None, **client_kw: Any) -> Stats:
    """Download and merge the live stats of one or more servers (``actprune stats pull``).
    ``client_kw``: ``api_key``, ``timeout``, ``retries`` (see :class:`actprune.client.Client`)."""
    from actprune.client.http import merge_from

    stats = merge_from([base_urls] if isinstance(base_urls, str) else list(base_urls), **client_kw)
    if output is not None:
        stats.save(output)
    return stats


def record_stats(
    model_dir: PathLike, data: str = "wiki:calibration", *, text_field: str | None = None,
    max_tokens: int | None = 200_000, max_len: int = 2048, batch_size: int = 4,
    near_zero_threshold: float | None = None, dtype: str | None = None,
    output: PathLike | None = None, progress: bool = True, trust_remote_code: bool = False,
) -> Stats:
    """Record stats offline with transformers (``actprune record``): no vLLM server needed.
    ``trust_remote_code``: run code the checkpoint's ``auto_map`` names (not needed for
    actprune's own pruned checkpoints)."""
    import torch
    from actprune.core.wire.schema import DEFAULT_NEAR_ZERO
    from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
    from actprune.pruning.data import load_texts, tokenize
    from actprune.pruning.record import budget, record

    config = read_config(model_dir)
    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    texts = load_texts(data, text_field, tok)
    model = load_causal_lm(model_dir, getattr(torch, dtype) if dtype else None, trust_remote_code=trust_remote_code)
    token_lists = budget(tokenize(tok, texts), max_len, max_tokens)
    threshold = DEFAULT_NEAR_ZERO if near_zero_threshold is None else near_zero_threshold
    stats = record(model, token_lists, model_name=Path(model_dir).name, config=config,
                   batch_size=batch_size, pad_id=tok.pad_token_id, near_zero_threshold=threshold,
                   progress=progress)
    if output is not None:
        stats.save(output)
    return stats


# ---- analysis -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerAnalysis:
    """Figures of one decoder layer: MLP neurons (input of down_proj; None for an MoE layer,
    whose experts' figures are the stats file's router group), attention channels (input of
    o_proj), and block influence (1 - mean cos(residual in, residual out))."""

    layer: int
    tokens: int
    mlp: GroupFigures | None
    attn: GroupFigures
    block_influence: float

    def row(self) -> dict[str, float | int]:
        """Scalar figures as one flat dict: ``pandas.DataFrame([a.row() for a in analyze(s)])``."""
        out: dict[str, float | int] = {"layer": self.layer, "tokens": self.tokens,
                                       "block_influence": self.block_influence}
        for kind in ("mlp", "attn"):
            group = getattr(self, kind)
            for k, v in (asdict(group) if group is not None else {}).items():
                if not isinstance(v, np.ndarray):
                    out[f"{kind}_{k}"] = v
        return out


def analyze(stats: Stats) -> list[LayerAnalysis]:
    """Per-layer L1/L2 norms, mean |x|, variance, sparsity and the share of >90 %-sparse
    channels (see :class:`actprune.core.planning.scores.GroupFigures`), plus block influence."""
    return [
        LayerAnalysis(
            layer=i, tokens=int(stats.figures(i, "attn").count),
            mlp=describe_group(stats.group(i, "mlp")) if stats.router(i) is None else None,
            attn=describe_group(stats.group(i, "attn")),
            block_influence=stats.block_influence(i),
        )
        for i in stats.layers
    ]


def pruning_candidates(
    stats: Stats, ratio: float, strategy: str = "wifv", *, unit: Unit = "mlp",
    model_dir: PathLike | None = None, weights: ImportanceWeights | None = None,
) -> dict[int, list[int]]:
    """The lowest-scored ``ratio`` of units, least important first.

    ``unit="mlp"``: layer -> MLP neuron indices; ``"heads"``: layer -> query-head indices
    (needs ``model_dir`` for the head count); ``"layers"``: ``{-1: layer indices}`` by block
    influence. Scores are those of ``actprune plan`` (:mod:`actprune.core.planning.scores`); weight-
    aware strategies (``wifv``, ``wanda_sp``) read column norms from ``model_dir``. This only
    ranks; :func:`make_plan` also applies widths, GQA and tensor-parallel constraints.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    if unit == "layers":
        scores = layer_scores(stats, stats.layers)
        n = round(ratio * len(scores))
        return {-1: [stats.layers[j] for j in np.argsort(scores, kind="stable")[:n]]}
    if unit not in ("mlp", "heads"):
        raise ValueError(f"unit must be 'mlp', 'heads' or 'layers', got {unit!r}")
    if unit == "mlp" and any(stats.router(i) is not None for i in stats.layers):
        raise ValueError("these stats are of a mixture-of-experts model, whose sparse layers have experts, "
                         "not MLP neurons; ranking experts is not built yet (docs/moe.md)")
    strat = STRATEGIES[strategy]
    shape = norms = None
    if model_dir is not None:
        config = read_config(model_dir)
        shape = model_shape(config)
        norms = ColumnNorms(model_dir, spec_for_config(config))
    elif strat.needs_weights or unit == "heads":
        raise ValueError(f"unit={unit!r} with strategy={strategy!r} needs model_dir (the checkpoint)")
    out = {}
    for i in stats.layers:
        kind = "mlp" if unit == "mlp" else "attn"
        col = norms(i, kind) if strat.needs_weights else None
        s = strat.fn(ScoreInput(stats.figures(i, kind), weights or ImportanceWeights(), col))
        if unit == "heads":
            s = head_scores(np.asarray(s), shape.layers[i].num_attention_heads)
        s = np.nan_to_num(np.asarray(s, dtype=np.float64), nan=0.0)
        out[i] = [int(j) for j in np.argsort(s, kind="stable")[: round(ratio * len(s))]]
    return out


# ---- plan and prune -----------------------------------------------------------------------
def make_plan(stats: Stats | PathLike, model_dir: PathLike, *, output: PathLike | None = None,
              **request: Any) -> Plan:
    """A pruning plan (``actprune plan``). ``request``: the fields of ``PlanRequest`` /
    the CLI flags, e.g. ``mlp_ratio=0.3, head_ratio=0.25, drop_layers=2, strategy="wifv",
    width_multiple=64, tp_size=2, per_layer=True``; see docs/plan.md."""

    try:
        req = PlanRequest(**request)
    except ValidationError as e:
        raise PlanError(format_validation_error(e)) from None
    stats = stats if isinstance(stats, Stats) else Stats.load(stats)
    config = read_config(model_dir)
    plan = _make_plan(stats, config, req, ColumnNorms(model_dir, spec_for_config(config)))
    if output is not None:
        plan.save(output)
    return plan


def prune(model_dir: PathLike, plan: Plan | PathLike, out: PathLike, *,
          bias_stats: Stats | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Slice ``model_dir`` by ``plan`` into ``out`` (``actprune prune``): neurons, heads and
    layers the plan removes are gone from the weights. ``bias_stats``: FLAP bias compensation."""
    from actprune.pruning.checkpoint.slicer import slice_checkpoint

    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    return slice_checkpoint(model_dir, plan, out, stats=bias_stats, overwrite=overwrite,
                            progress=progress)


def prune_mlp(model_dir: PathLike, stats: Stats, ratio: float, out: PathLike, *,
              strategy: str = "wifv", overwrite: bool = False, **request: Any) -> Path:
    """Remove ``ratio`` of every layer's MLP neurons (plan + slice in one call)."""
    plan = make_plan(stats, model_dir, mlp_ratio=ratio, strategy=strategy, **request)
    return prune(model_dir, plan, out, overwrite=overwrite)


def prune_heads(model_dir: PathLike, stats: Stats, ratio: float, out: PathLike, *,
                strategy: str = "wifv", head_mode: str = "kv_groups",
                overwrite: bool = False, **request: Any) -> Path:
    """Remove ``ratio`` of attention heads (whole KV groups, or query heads evenly per group)."""
    plan = make_plan(stats, model_dir, head_ratio=ratio, strategy=strategy, head_mode=head_mode, **request)
    return prune(model_dir, plan, out, overwrite=overwrite)


def drop_layers(model_dir: PathLike, stats: Stats, n: int, out: PathLike, *,
                overwrite: bool = False, **request: Any) -> Path:
    """Drop the ``n`` decoder layers with the lowest block influence (ShortGPT)."""
    plan = make_plan(stats, model_dir, drop_layers=n, **request)
    return prune(model_dir, plan, out, overwrite=overwrite)


# ---- recover and evaluate -----------------------------------------------------------------
def finetune(model_dir: PathLike, data: str, output: PathLike, *, teacher: PathLike | None = None,
             **config: Any) -> Path:
    """Fine-tune (or, with ``teacher``, distil into) a pruned checkpoint (``actprune
    finetune``). ``config``: the fields of :class:`~actprune.pruning.recover.finetune.FinetuneConfig`
    (``max_steps``, ``lr``, ``batch_size``, ``seq_len``, ``lora``, ``kd_alpha``, ...)."""
    from actprune.pruning.recover.finetune import FinetuneConfig, main

    cfg = FinetuneConfig(model=str(model_dir), data=data, output=str(output),
                         teacher=str(teacher) if teacher else None, **config)
    out = main(cfg)
    if out is None:  # only with stop_after_steps, which simulates a kill
        raise RuntimeError(f"fine-tuning stopped at step {cfg.stop_after_steps} before the end")
    return out


def evaluate(model_dirs: list[PathLike], data: str = "wiki:heldout", *, output: PathLike | None = None,
             text_field: str | None = None, prompts: list[str] | None = None, seq_len: int = 512,
             max_tokens: int = 100_000, batch_size: int = 4, max_new_tokens: int = 32,
             progress: bool = True, trust_remote_code: bool = False,
             tasks: list[str] | None = None) -> list[Any]:
    """Perplexity, KL against the first model and greedy generations (``actprune eval``),
    and with ``tasks`` accuracy on lm-eval tasks (``["actprune_facts", "hellaswag"]``); with
    ``output``, also results.json, report.md and plots there. Returns ``ModelResult``s."""
    from actprune.pruning.checkpoint.hf_io import load_tokenizer
    from actprune.pruning.data import packed_rows
    from actprune.pruning.evaluate.perplexity import DEFAULT_PROMPTS, evaluate_models
    from actprune.pruning.evaluate.report import write_report

    dirs = [str(d) for d in model_dirs]
    tok = load_tokenizer(dirs[0], trust_remote_code=trust_remote_code)
    rows = packed_rows(tok, data, text_field, seq_len)[: max(1, max_tokens // seq_len)]  # (N, L)
    prompts = list(prompts or DEFAULT_PROMPTS)
    suite = None
    if tasks:
        from actprune.pruning.evaluate.harness import TaskSuite

        suite = TaskSuite.load(tasks, batch_size=batch_size)
    results = evaluate_models(dirs, rows, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              progress=progress, trust_remote_code=trust_remote_code, tasks=suite)
    if output is not None:
        meta = {"data": data, "text_field": text_field, "seq_len": seq_len, "rows": len(rows),
                "tasks": list(tasks or [])}
        write_report(output, results, prompts, meta)
    return results


# ---- the whole loop -----------------------------------------------------------------------
@dataclass
class PipelineResult:
    stats: Path
    plan: Plan
    pruned: Path
    recovered: Path | None
    results: list[Any]  # ModelResult: original, pruned, recovered
    report: Path | None
    paths: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{'model':>12}  {'parameters':>14}  {'perplexity':>11}  {'KL vs original':>14}"]
        for r in self.results:
            lines.append(f"{r.name:>12}  {r.parameters:>14,}  {r.perplexity:>11.3f}  {r.kl_vs_first:>14.4f}")
        return "\n".join(lines)


def run_pipeline(
    model_dir: PathLike, workdir: PathLike, *, stats: Stats | PathLike | None = None,
    calibration: str = "wiki:calibration", calibration_tokens: int = 50_000,
    train_data: str = "wiki:train", finetune_steps: int = 100, distil: bool = True,
    eval_data: str = "wiki:heldout", eval_tokens: int = 20_000, eval_seq_len: int = 256,
    finetune_config: dict[str, Any] | None = None, progress: bool = True, trust_remote_code: bool = False,
    **request: Any,
) -> PipelineResult:
    """stats → plan → prune → recover → evaluate, all written under ``workdir``.

    ``stats``: a stats file or object (e.g. pulled from a server); None records
    ``calibration_tokens`` of ``calibration`` offline. ``request``: plan fields (default
    ``mlp_ratio=0.3``). ``finetune_steps=0`` skips recovery; ``distil`` uses the original as
    teacher. ``trust_remote_code``: run code the original's ``auto_map`` names. Output:
    stats.safetensors, plan.json, pruned/, recovered/, eval/report.md.
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = {k: work / v for k, v in (("stats", "stats.safetensors"), ("plan", "plan.json"),
                                      ("pruned", "pruned"), ("recovered", "recovered"), ("eval", "eval"))}
    if stats is None:
        stats = record_stats(model_dir, calibration, max_tokens=calibration_tokens, progress=progress,
                             trust_remote_code=trust_remote_code)
    elif not isinstance(stats, Stats):
        stats = Stats.load(stats)
    stats.save(paths["stats"])
    plan = make_plan(stats, model_dir, output=paths["plan"], **(request or {"mlp_ratio": 0.3}))
    pruned = prune(model_dir, plan, paths["pruned"], overwrite=True, progress=progress)
    recovered = None
    if finetune_steps > 0:
        from actprune.pruning.recover.recipe_config import loop_recovery

        cfg = loop_recovery(finetune_steps, **{"progress": progress, **(finetune_config or {}),
                                               "trust_remote_code": trust_remote_code})
        recovered = finetune(pruned, train_data, paths["recovered"],
                             teacher=model_dir if distil else None, **cfg)
    models = [Path(model_dir), pruned, *([recovered] if recovered else [])]
    results = evaluate(models, eval_data, output=paths["eval"], max_tokens=eval_tokens,
                       seq_len=eval_seq_len, progress=progress, trust_remote_code=trust_remote_code)
    (work / "pipeline.json").write_text(json.dumps(
        {"request": plan.provenance.request, "models": [r.to_json() for r in results]}, indent=2) + "\n")
    return PipelineResult(stats=paths["stats"], plan=plan, pruned=pruned, recovered=recovered,
                          results=results, report=paths["eval"] / "report.md", paths=paths)
