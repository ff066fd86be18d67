"""The whole-model compression recipe (``actprune compress``): a parameter budget removed from
heads, KV groups and MLP neurons, every kept unit compensated, and of the ways to spend it the
one that validates best kept.

    setup → 1. uniform plan → 2. sensitivity → 3. candidate plans → 4. per candidate: refit +
    slice + validate → 5. the best candidate is OUT

1. ``uniform.json``: the planner's uniform split of ``param_ratio`` (every layer gives up the
   same share of MLP neurons and KV groups); it fixes the fractions sensitivity is measured at.
   A small budget's uniform split may take no KV group from any layer (SmolLM2 has three a
   layer: 10 % of its parameters leaves them all); then ``uniform-heads.json``, every layer
   losing its smallest legal step of heads, sets the heads' measured fraction instead, so that
   the heads are a candidate at every budget.
2. ``sensitivity.json``: each layer's loss increase when that layer alone loses its MLP share,
   and separately its heads, refitted (:mod:`.compensate.sensitivity`): Δ per layer and kind.
3. ``plan.json`` (``budget``: ``param_ratio`` allocated across layers and kinds by least modelled
   loss per parameter, :mod:`actprune.core.planning.budget`), ``plan-heads-capped.json``,
   ``plan-mlp.json``, (16+ layers) ``plan-mlp-ends.json``, ``plan-mlp-ends-even.json`` and
   ``plan-mlp-ends-bold.json`` (else ``plan-mlp-even.json``, ``plan-mlp-bold.json``): the
   candidates of :mod:`.candidates`, all removing the same parameters; the ends layouts with their own MLP Δ, measured on their own uniform layout
   (``uniform-ends.json`` → ``sensitivity-ends.json``: the layers they prune lose more).
4. each distinct candidate refitted (``down_proj`` and ``o_proj``, least squares with a bias,
   :mod:`.compensate.calibrate`), sliced into ``WORK/candidate-NAME`` and its loss measured on
   validation rows of ``--data`` that neither the sensitivity probe nor the refits read
   (:func:`.candidates.split_rows`), and on the first ``val_rows`` rows of each ``--val-data``
   source (text of other domains, read by nothing else); figures in ``candidates.json``. Only
   the best checkpoint so far is kept on disk.
5. ``OUT``: the candidate with the lowest validation loss — with ``--val-data``, the lowest mean
   loss above the dense model's over the sets (:func:`.candidates.excess_loss`) — except that
   the better MLP-only one is kept unless a candidate pruning heads beats it by more than 1 %
   (:data:`.candidates.PREFER_MARGIN`: closer than that, validation cannot tell them apart and
   MLP-only held up better out of domain); a table of all is printed.

``candidates`` (``--candidates``) builds and chooses among the named ones only; when they are all
``mlp-ends`` layouts, which measure their own Δ, steps 1 and 2 are skipped.

The files go into ``WORK`` (default ``OUT.steps``, beside ``OUT``). Resumable: a step whose
output exists and was made from the same inputs is skipped (the plans record their request and
source model, the sensitivity file the plan and data it measured, ``candidates.json`` each
candidate's plan, refit inputs and validation rows, a checkpoint its plan), so a killed run
starts again at the step it was in and a finished candidate is not built again. Data is
recorded by a digest of the token rows read, not only by its name: a file edited in place is
measured again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from actprune.core.errors import ActpruneError
from actprune.core.files import atomic_write, read_json_record
from actprune.core.wire.plan import Plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.pruning.candidates import CANDIDATES, DATA, MLP_ONLY, choose, figures, scores, table

__all__ = ["CANDIDATES_FILE", "CompressConfig", "CompressError", "compress"]

CANDIDATES_FILE = "candidates.json"
_CANDIDATES_FORMAT = "actprune.compress_candidates/2"  # /2: validation sets of --val-data ("extra")
_PLAN_FILES = {"budget": "plan.json", **{n: f"plan-{n}.json" for n in CANDIDATES if n != "budget"}}


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
    val_rows: int = 8
    val_data: tuple[str, ...] = ()  # other domains' text: validation only, first val_rows rows each
    candidates: tuple[str, ...] | None = None  # the candidates built and chosen among (None: every one that applies)
    ridge: float = 1e-2
    anchor: str | None = None  # other domains' text mixed into the refits (refit_for_plan)
    anchor_weight: float | None = None  # None: refit_for_plan's default
    overwrite: bool = False
    progress: bool = True
    trust_remote_code: bool = False
    device: str | None = None  # where the model runs in every pass (None: a GPU when one is visible)
    reconstruct: int = 0  # passes of local reconstruction after each MLP refit (refit_plan.refit_for_plan)
    log: Any = field(default=print)
    fit_digest: str | None = None  # set from the rows the fit reads (_split): an edited --data is seen

    @property
    def work_dir(self) -> Path:
        return self.work or self.output.with_name(self.output.name + ".steps")

    def fit_inputs(self) -> dict[str, Any]:
        """What a refit depends on besides the plan (recorded with each checkpoint)."""
        return {"data": self.data, "text_field": self.text_field, "tokens": self.tokens, "seq_len": self.seq_len,
                "ridge": self.ridge, "rows": self.fit_digest,
                **({"anchor": self.anchor, "anchor_weight": self.anchor_weight} if self.anchor else {}),
                **({"reconstruct": self.reconstruct} if self.reconstruct else {})}


def _digest(plan: Plan) -> str:
    """What a measurement depends on in a plan: source and keep lists."""
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


def _with_head_probe(cfg: CompressConfig, uniform: Plan, base: dict[str, Any], stats, config, norms) -> Plan:
    """``uniform``, or when it removes no head, ``uniform`` with each layer's heads from
    ``uniform-heads.json`` (:func:`.candidates.head_probe_requests`: one unit a layer; one file
    per distinct unit count, ``uniform-heads-U.json``, when layers differ): what sensitivity
    measures."""
    from actprune.pruning.candidates import head_probe_requests

    probes = head_probe_requests(base, uniform)
    if not probes:
        return uniform
    heads, names = {}, []
    for probe in probes:
        name = "uniform-heads.json" if len(probes) == 1 else f"uniform-heads-{probe.units}.json"
        plan = _plan_step(cfg, name, _request(probe.fields), stats, config, norms)
        heads |= {hp.index: hp for hp in plan.layers if hp.index in probe.layers}
        names.append(name)
    layers = [lp.model_copy(update={"heads_keep": heads[lp.index].heads_keep,
                                    "kv_heads_keep": heads[lp.index].kv_heads_keep}) if lp.index in heads else lp
              for lp in uniform.layers]
    cfg.log(f"sensitivity: the uniform plan removes no heads at this budget: heads are measured at "
            f"{' and '.join(names)}'s")
    return uniform.model_copy(update={"layers": layers})


def _sensitivity_step(cfg: CompressConfig, uniform: Plan, name: str = "sensitivity.json") -> dict[str, Any]:
    from actprune.pruning.compensate import sensitivity as sens

    path = cfg.work_dir / name
    inputs = {"plan": _digest(uniform), "data": cfg.data, "text_field": cfg.text_field, "tokens": cfg.tokens,
              "seq_len": cfg.seq_len, "probe_rows": cfg.probe_rows, "ridge": cfg.ridge, "rows": cfg.fit_digest}
    record = read_json_record(path)
    verb = "kept"
    if not (record.get("format") == sens.SENSITIVITY_FORMAT and record.get("inputs") == inputs and "deltas" in record):
        sens.sensitivity_for_plan(cfg.model, uniform, cfg.data, path, tokens=cfg.tokens, seq_len=cfg.seq_len,
                                  ridge=cfg.ridge, probe_rows=cfg.probe_rows, text_field=cfg.text_field,
                                  progress=cfg.progress, trust_remote_code=cfg.trust_remote_code,
                                  extra={"inputs": inputs}, device=cfg.device)
        record, verb = json.loads(path.read_text()), "wrote"
    for kind, key, se_key in (("MLP", "deltas", "delta_se"), ("heads", "attn_deltas", "attn_delta_se")):
        d = sorted(record.get(key) or [])
        if d:
            note = sens.noise_note(record[key], record.get(se_key))
            cfg.log(f"sensitivity: {verb} {path}: {kind} Δloss per layer min {d[0]:.4f}, median "
                    f"{d[len(d) // 2]:.4f}, max {d[-1]:.4f}" + (f" ({note})" if note else ""))
    if not record.get("attn_deltas") and name == "sensitivity.json":
        cfg.log("sensitivity: no heads measured (none to probe at this budget and --head-cap): MLP neurons only")
    return record


def _ends_delta(cfg: CompressConfig, fields: dict[str, Any], stats, config, norms) -> list[float]:
    """The MLP Δ of the ``mlp-ends`` layout (``fields``: its request or a twin's), measured on its
    own layout: ``uniform-ends.json`` (every layer outside ``keep_layers`` losing the same share,
    the share they lose on average, larger than the whole-model uniform plan's) →
    ``sensitivity-ends.json``. Measured where the
    cut is made, as for the other candidates; on SmolLM2 at 10 % this candidate validated 2.7 %
    better than when planned from the whole-model Δ (BENCHMARKS.md, issue 13)."""
    from actprune.pruning.compensate.sensitivity import request_fields

    # uniform widths: none of the per-layer fields (a twin's exponent too: the same uniform-ends.json)
    uniform = {k: v for k, v in fields.items() if k not in ("per_layer", "layer_sensitivity", "sensitivity_exponent")}
    plan = _plan_step(cfg, "uniform-ends.json", _request(uniform), stats, config, norms)
    return request_fields(_sensitivity_step(cfg, plan, "sensitivity-ends.json"))["layer_sensitivity"]


def _build(cfg: CompressConfig, plan: Plan, out: Path, name: str) -> bool:
    """Refit + slice ``plan`` into ``out`` unless ``out`` was made from it; True when built."""
    from actprune.pruning.checkpoint.slicer import slice_checkpoint
    from actprune.pruning.compensate.refit_plan import refit_for_plan

    if _made_from(cfg, plan, out):
        return False
    rows: dict = {}  # gate/up rows of the reconstruction
    plan, mlp, attn = refit_for_plan(cfg.model, plan, cfg.data, tokens=cfg.tokens, seq_len=cfg.seq_len,
                                     ridge=cfg.ridge, text_field=cfg.text_field, progress=cfg.progress,
                                     trust_remote_code=cfg.trust_remote_code, anchor=cfg.anchor,
                                     anchor_weight=cfg.anchor_weight, device=cfg.device,
                                     reconstruct=cfg.reconstruct, mlp_rows=rows)
    slice_checkpoint(cfg.model, plan, out, overwrite=True, progress=cfg.progress, mlp_refit=mlp, attn_refit=attn,
                     mlp_rows=rows, slice_record={"compress": cfg.fit_inputs(), "candidate": name})
    cfg.log(f"refit + slice ({name}): wrote {out}: {len(mlp)} MLPs and {len(attn)} attention blocks refitted, "
            f"{plan.params_after:,} parameters")
    return True


def _made_from(cfg: CompressConfig, plan: Plan, out: Path) -> bool:
    record = _plan_record(out)
    return (record.get("layers") == json.loads(plan.to_json())["layers"]
            and _slice_of(record).get("compress") == cfg.fit_inputs())


# ---- validation rows and candidates ------------------------------------------------------------
def _split(cfg: CompressConfig):
    """Pack ``--data`` once; returns (cfg with ``tokens`` = the rows the fit reads, the
    validation sets {"--data": rows (V, T), SOURCE: rows (V', T) of each ``--val-data``}, the
    split) — :func:`.candidates.split_rows`."""
    from actprune.pruning.candidates import split_rows
    from actprune.pruning.checkpoint.hf_io import load_tokenizer
    from actprune.pruning.data import packed_rows

    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    rows = packed_rows(tok, cfg.data, cfg.text_field, cfg.seq_len)  # (N, T)
    try:
        split = split_rows(len(rows), cfg.tokens // cfg.seq_len, cfg.probe_rows, cfg.val_rows)
    except ValueError as e:
        raise CompressError(f"--data {cfg.data} packs into {e}; give more text, or a smaller --val-rows, "
                            f"--probe-rows or --seq-len") from None
    a, b = split.val
    cfg.log(f"split: --data packs into {len(rows)} rows of {cfg.seq_len} tokens: rows 0–{split.fit - 1} for "
            f"sensitivity (probe: the first {cfg.probe_rows}) and refit, rows {a}–{b - 1} for validation"
            + (f" ({split.note})" if split.note else ""))
    sets = {DATA: rows[a:b]}
    for source in cfg.val_data:
        if source == cfg.data or source in sets:
            raise CompressError(f"--val-data {source}: named twice (or is --data, whose held-out rows are "
                                f"validated already)")
        try:
            extra = packed_rows(tok, source, None, cfg.seq_len)[:cfg.val_rows]
        except ActpruneError as e:  # load_texts names its source as --data; pack refuses < 1 row
            raise CompressError(f"--val-data {source}: {str(e).removeprefix(f'--data {source}: ')}") from None
        sets[source] = extra
        cfg.log(f"split: --val-data {source}: validation on its first {len(extra)} rows"
                + (f" (only {len(extra)}, not --val-rows {cfg.val_rows})" if len(extra) < cfg.val_rows else ""))
    return replace(cfg, tokens=split.fit * cfg.seq_len, fit_digest=_rows_digest(rows[:split.fit])), sets, split


def _rows_digest(rows: Any) -> str:
    """Of token rows (N, T): the records are keyed by what was read, not by a file's name, so a
    file edited in place between two runs is measured again."""
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]


def _validation_losses(cfg: CompressConfig, model_dir: Path, sets: dict[str, Any]) -> dict[str, float]:
    from actprune.pruning.evaluate.perplexity import mean_losses

    return mean_losses(model_dir, sets, trust_remote_code=cfg.trust_remote_code, progress=cfg.progress,
                       device=cfg.device)


def _candidate_dir(cfg: CompressConfig, name: str) -> Path:
    return cfg.work_dir / f"candidate-{name}"


def _candidates_step(cfg: CompressConfig, plans: dict[str, Plan], sets, split) -> dict[str, Any]:
    """Build and validate every candidate not yet in ``candidates.json`` (module doc, step 4);
    returns the record: ``dense`` and ``candidates`` (name -> loss, perplexity, parameters)."""
    path = cfg.work_dir / CANDIDATES_FILE
    validation = {"model": str(Path(cfg.model).resolve()), "data": cfg.data, "text_field": cfg.text_field,
                  "seq_len": cfg.seq_len, "rows": list(split.val),  # what the dense figures depend on
                  "sets": {k: _rows_digest(v) for k, v in sets.items()}}
    record = read_json_record(path)
    if record.get("format") != _CANDIDATES_FORMAT or record.get("validation") != validation:
        record = {"format": _CANDIDATES_FORMAT, "validation": validation, "candidates": {}}
    if not isinstance(record.get("dense"), dict):
        record["dense"] = figures(_validation_losses(cfg, cfg.model, sets))
        atomic_write(path, json.dumps(record, indent=1) + "\n")
    done = record["candidates"]
    for name, plan in plans.items():
        old = done.get(name)
        if isinstance(old, dict) and old.get("plan") == _digest(plan) and old.get("fit") == cfg.fit_inputs():
            cfg.log(f"candidate {name}: kept (validation perplexity {old['perplexity']:.3f})")
            continue
        ckpt = _candidate_dir(cfg, name)
        _build(cfg, plan, ckpt, name)
        done[name] = {"plan": _digest(plan), "fit": cfg.fit_inputs(), **figures(_validation_losses(cfg, ckpt, sets)),
                      "params_before": plan.params_before, "params_after": plan.params_after}
        atomic_write(path, json.dumps(record, indent=1) + "\n")
        cfg.log(f"candidate {name}: wrote {path}: validation perplexity {done[name]['perplexity']:.3f}")
        best = choose(scores(record, [n for n in plans if n in done]), prefer=MLP_ONLY)
        for other in cfg.work_dir.glob("candidate-*"):  # only the best so far stays on disk
            if other != _candidate_dir(cfg, best):
                shutil.rmtree(other, ignore_errors=True)
    return record


def _final_step(cfg: CompressConfig, name: str, plan: Plan) -> Path:
    """The chosen candidate's checkpoint becomes OUT (moved, or rebuilt if it is gone)."""
    from actprune.core.files import staged_directory
    from actprune.pruning.checkpoint.slicer import PLAN_RECORD

    out, src = cfg.output, _candidate_dir(cfg, name)
    if _made_from(cfg, plan, out):
        cfg.log(f"chosen: {name}: kept {out}")
    elif _made_from(cfg, plan, src):
        with staged_directory(out) as tmp:
            # the plan record first: a kill midway leaves src without one, so it is rebuilt, never half used
            for f in sorted(src.iterdir(), key=lambda p: p.name != PLAN_RECORD):
                shutil.move(str(f), str(tmp / f.name))
        cfg.log(f"chosen: {name}: moved {src} -> {out}")
    else:
        _build(cfg, plan, out, name)
        cfg.log(f"chosen: {name}: rebuilt {out} (its candidate checkpoint was gone)")
    for other in cfg.work_dir.glob("candidate-*"):
        shutil.rmtree(other, ignore_errors=True)
    return out


def compress(cfg: CompressConfig) -> Path:
    """Run the recipe (module doc); returns the output checkpoint."""
    from actprune.core.archs import model_shape, spec_for_config
    from actprune.core.config import read_config
    from actprune.core.tensor.checkpoint import ColumnNorms
    from actprune.core.wire.stats import Stats
    from actprune.pruning.candidates import OWN_DELTA, candidate_requests, needs_model_delta, select
    from actprune.pruning.compensate.sensitivity import request_fields

    if cfg.request.get("param_ratio") is None:
        raise CompressError("--param-ratio is required: the fraction of all parameters to remove")
    out, model = cfg.output.resolve(), Path(cfg.model).resolve()
    if out == model or model in out.parents or out in model.parents:
        raise CompressError(f"output {out} would overwrite or sit inside the input checkpoint {model}")
    if out.exists() and not cfg.overwrite and "compress" not in _slice_of(_plan_record(out)):
        raise CompressError(f"output {out} exists and is not from actprune compress; remove it or pass --overwrite")
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    config = read_config(cfg.model)
    stats = Stats.load(cfg.stats)
    norms = ColumnNorms(cfg.model, spec_for_config(config))
    cfg, sets, split = _split(cfg)
    base = {k: v for k, v in cfg.request.items() if v is not None}
    try:
        whole = needs_model_delta(cfg.candidates)  # checks the names too
    except ValueError as e:
        raise CompressError(f"--candidates: {e}") from None
    if whole:
        uniform = _plan_step(cfg, "uniform.json", _request(base), stats, config, norms)
        uniform = _with_head_probe(cfg, uniform, base, stats, config, norms)
        sens = request_fields(_sensitivity_step(cfg, uniform))
    else:  # only the ends layouts, which measure their own Δ below
        sens = {"layer_sensitivity": None}
        cfg.log(f"sensitivity: only {', '.join(cfg.candidates or ())} asked for: the whole-model pass is skipped")
    requests = candidate_requests(base, sens, model_shape(config))
    try:
        wanted = select(requests, cfg.candidates)
    except ValueError as e:
        raise CompressError(f"--candidates: {e}") from None
    for name in (n for n in cfg.candidates or () if n not in wanted):
        cfg.log(f"candidate {name}: not built for this model and budget (docs/plan.md says when each is)")
    plans: dict[str, Plan] = {}
    ends_delta: list[float] | None = None  # the ends layout's own Δ, measured once for mlp-ends and its twins
    for name, fields in wanted.items():
        if name in OWN_DELTA:  # mlp-ends and its twins: the same layout and Δ; only the exponent differs
            if ends_delta is None:
                ends_delta = _ends_delta(cfg, fields, stats, config, norms)
            fields = {**fields, "layer_sensitivity": ends_delta}
        plan = _plan_step(cfg, _PLAN_FILES[name], _request(fields), stats, config, norms)
        same = next((n for n, p in plans.items() if p.layers == plan.layers), None)
        if same is not None:
            cfg.log(f"candidate {name}: the same plan as {same}, not built twice")
            continue
        plans[name] = plan
    if not plans:
        raise CompressError(f"--param-ratio {base['param_ratio']}: no candidate can remove that much")
    record = _candidates_step(cfg, plans, sets, split)
    best = choose(scores(record, plans), prefer=MLP_ONLY)
    for line in table(record, list(plans), best, {n: cfg.work_dir / _PLAN_FILES[n] for n in plans}):
        cfg.log(line)
    return _final_step(cfg, best, plans[best])


def _plan_record(out: Path) -> dict[str, Any]:
    """The plan record of a checkpoint directory ({} if none or unreadable)."""
    from actprune.pruning.checkpoint.slicer import PLAN_RECORD

    return read_json_record(out / PLAN_RECORD)


def _slice_of(record: dict[str, Any]) -> dict[str, Any]:
    """A plan record's ``slice`` entry ({} when absent or not an object)."""
    s = record.get("slice")
    return s if isinstance(s, dict) else {}


def _request(fields: dict[str, Any]) -> PlanRequest:
    from actprune.core.wire.plan import format_validation_error
    from pydantic import ValidationError

    try:
        return PlanRequest(**fields)
    except ValidationError as e:
        raise CompressError(format_validation_error(e)) from e
