"""The whole-model compression recipe (``actprune compress``): a parameter budget spent on
heads, KV groups and MLP neurons where the measured loss is least, every kept unit compensated.

    setup → 1. uniform plan → 2. sensitivity → 3. budget plan → 4. refit + slice

1. ``uniform.json``: the planner's uniform split of ``param_ratio`` (every layer gives up the
   same share of MLP neurons and KV groups); it fixes the fractions sensitivity is measured at.
2. ``sensitivity.json``: each layer's loss increase when that layer alone loses its MLP share,
   and separately its heads, refitted (:mod:`.compensate.sensitivity`): Δ per layer and kind.
3. ``plan.json``: ``param_ratio`` allocated across layers and kinds by least modelled loss per
   parameter (:mod:`actprune.core.planning.budget`), under the request's constraints.
4. ``OUT``: the sliced checkpoint with ``down_proj`` and ``o_proj`` refitted (least squares with
   a bias, :mod:`.compensate.calibrate`).

Steps 1–3 write into ``WORK`` (default ``OUT.steps``, beside ``OUT``). Resumable: a step whose
output exists and was made from the same inputs is skipped (the plans record their request and
source model, the sensitivity file the plan and data it measured, the checkpoint its plan), so
a killed run starts again at the step it was in. Each step prints its figures.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actprune.core.errors import ActpruneError
from actprune.core.wire.plan import Plan, PlanRequest

__all__ = ["CompressConfig", "CompressError", "compress"]


class CompressError(ActpruneError):
    """A compress run that cannot go on (inputs that do not fit, an output in the way)."""


@dataclass
class CompressConfig:
    model: Path
    stats: Path
    data: str
    output: Path
    request: dict[str, Any]  # PlanRequest fields: param_ratio, strategy, head_mode, constraints
    work: Path | None = None
    text_field: str | None = None
    tokens: int = 32768
    seq_len: int = 512
    probe_rows: int = 8
    ridge: float = 1e-2
    overwrite: bool = False
    progress: bool = True
    trust_remote_code: bool = False
    log: Any = field(default=print)

    @property
    def work_dir(self) -> Path:
        return self.work or self.output.with_name(self.output.name + ".steps")


def _digest(plan: Plan) -> str:
    """What a sensitivity measurement depends on in a plan: source and keep lists."""
    body = json.dumps([plan.source.config_hash, [lp.model_dump() for lp in plan.layers]], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _plan_step(cfg: CompressConfig, name: str, request: PlanRequest, stats, config, norms) -> Plan:
    """Make (or reuse) the plan ``name`` for ``request``; print its figures."""
    from actprune.core.planning.planner import make_plan

    path = cfg.work_dir / name
    want = request.model_dump(mode="json")
    try:
        old = Plan.load(path) if path.is_file() else None
    except (ActpruneError, ValueError):
        old = None
    if old is not None and old.provenance.request == want and old.source.config_hash == stats.meta.get("config_hash"):
        plan, verb = old, "kept"
    else:
        plan, verb = make_plan(stats, config, request, norms), "wrote"
        plan.save(path)
    removed = 1 - plan.params_after / plan.params_before
    kv = sorted({w.num_key_value_heads for w in plan.widths})
    mlp = [w.intermediate_size for w in plan.widths]
    cfg.log(f"{name}: {verb} {path}: {plan.params_before:,} -> {plan.params_after:,} parameters "
            f"({removed:.1%} removed); MLP widths {min(mlp)}–{max(mlp)}, KV heads per layer {kv}")
    return plan


def _sensitivity_step(cfg: CompressConfig, uniform: Plan) -> dict[str, Any]:
    from actprune.pruning.compensate.sensitivity import SENSITIVITY_FORMAT, sensitivity_for_plan

    path = cfg.work_dir / "sensitivity.json"
    inputs = {"plan": _digest(uniform), "data": cfg.data, "text_field": cfg.text_field, "tokens": cfg.tokens,
              "seq_len": cfg.seq_len, "probe_rows": cfg.probe_rows, "ridge": cfg.ridge}
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        record = None
    verb = "kept"
    if not (isinstance(record, dict) and record.get("format") == SENSITIVITY_FORMAT
            and record.get("inputs") == inputs and record.get("attn_deltas") is not None):
        sensitivity_for_plan(cfg.model, uniform, cfg.data, path, tokens=cfg.tokens, seq_len=cfg.seq_len,
                             ridge=cfg.ridge, probe_rows=cfg.probe_rows, text_field=cfg.text_field,
                             progress=cfg.progress, trust_remote_code=cfg.trust_remote_code, extra={"inputs": inputs})
        record, verb = json.loads(path.read_text()), "wrote"
    if record.get("attn_deltas") is None:
        raise CompressError("the uniform plan removes no heads at this budget; use actprune plan --param-ratio "
                            "and actprune prune --refit (MLP only) instead")
    for kind, name in (("MLP", "deltas"), ("heads", "attn_deltas")):
        d = sorted(record[name])
        cfg.log(f"sensitivity: {verb} {path}: {kind} Δloss per layer min {d[0]:.4f}, median "
                f"{d[len(d) // 2]:.4f}, max {d[-1]:.4f}")
    return record


def _slice_step(cfg: CompressConfig, plan: Plan) -> Path:
    from actprune.pruning.checkpoint.slicer import slice_checkpoint
    from actprune.pruning.compensate.calibrate import refit_for_plan

    out = cfg.output
    done = _plan_record(out)
    inputs = {"data": cfg.data, "text_field": cfg.text_field, "tokens": cfg.tokens, "seq_len": cfg.seq_len,
              "ridge": cfg.ridge}
    if done.get("layers") == json.loads(plan.to_json())["layers"] and done.get("slice", {}).get("compress") == inputs:
        cfg.log(f"refit + slice: kept {out} (made from this plan)")
        return out
    plan, mlp, attn = refit_for_plan(cfg.model, plan, cfg.data, tokens=cfg.tokens, seq_len=cfg.seq_len,
                                     ridge=cfg.ridge, text_field=cfg.text_field, progress=cfg.progress,
                                     trust_remote_code=cfg.trust_remote_code)
    slice_checkpoint(cfg.model, plan, out, overwrite=True, progress=cfg.progress, mlp_refit=mlp, attn_refit=attn,
                     slice_record={"compress": inputs})
    cfg.log(f"refit + slice: wrote {out}: {len(mlp)} MLPs and {len(attn)} attention blocks refitted, "
            f"{plan.params_after:,} parameters")
    return out


def compress(cfg: CompressConfig) -> Path:
    """Run the recipe (module doc); returns the output checkpoint."""
    from actprune.core.archs import spec_for_config
    from actprune.core.config import read_config
    from actprune.core.tensor.checkpoint import ColumnNorms
    from actprune.core.wire.stats import Stats
    from actprune.pruning.compensate.sensitivity import request_fields

    if cfg.request.get("param_ratio") is None:
        raise CompressError("--param-ratio is required: the fraction of all parameters to remove")
    out, model = cfg.output.resolve(), Path(cfg.model).resolve()
    if out == model or model in out.parents or out in model.parents:
        raise CompressError(f"output {out} would overwrite or sit inside the input checkpoint {model}")
    if out.exists() and not cfg.overwrite and "compress" not in _slice_record(out):
        raise CompressError(f"output {out} exists and is not from actprune compress; remove it or pass --overwrite")
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    config = read_config(cfg.model)
    stats = Stats.load(cfg.stats)
    norms = ColumnNorms(cfg.model, spec_for_config(config))
    base = {k: v for k, v in cfg.request.items() if v is not None}
    uniform = _plan_step(cfg, "uniform.json", _request(base), stats, config, norms)
    record = _sensitivity_step(cfg, uniform)
    plan = _plan_step(cfg, "plan.json", _request({**base, **request_fields(record)}), stats, config, norms)
    return _slice_step(cfg, plan)


def _plan_record(out: Path) -> dict[str, Any]:
    """The plan record of a checkpoint directory ({} if none or unreadable)."""
    from actprune.pruning.checkpoint.slicer import PLAN_RECORD

    try:
        record = json.loads((out / PLAN_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _slice_record(out: Path) -> dict[str, Any]:
    s = _plan_record(out).get("slice")
    return s if isinstance(s, dict) else {}


def _request(fields: dict[str, Any]) -> PlanRequest:
    from actprune.core.wire.plan import format_validation_error
    from pydantic import ValidationError

    try:
        return PlanRequest(**fields)
    except ValidationError as e:
        raise CompressError(format_validation_error(e)) from e
