"""The pruning plan: what to keep, as a versioned JSON document (the request that makes one is
:mod:`.plan_request`).

Defined once here (documented in ``docs/plan.md`` and ``docs/formats.md``) and shared by the
planner (``actprune plan``), the server route (``POST /prune/plan``), the slicer (``actprune
prune``) and the client. Light on purpose: stdlib and pydantic only.

Indices in a plan always refer to the *source* checkpoint: layer ``i`` of ``layers`` is layer
``i`` of the model the plan was made for, neuron ``j`` is row ``j`` of its ``gate_proj``; the
slicer renumbers. ``widths`` describe the *output* model, one entry per kept layer, in order.

Versions: 1 is every dense plan (and what this module writes for one, so older readers keep
reading them); 2 adds routed experts (``num_experts`` in widths, ``experts_keep`` per layer),
written only for a mixture-of-experts model. Both load here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from actprune.core.archs import LIMITS, model_shape, spec_for_config
from actprune.core.errors import ActpruneError
from actprune.core.files import atomic_write
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .plan_request import ImportanceWeights

__all__ = [
    "DENSE_PLAN_VERSION",
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "LayerPlan",
    "LayerWidths",
    "Plan",
    "PlanError",
    "Provenance",
    "SourceModel",
    "format_validation_error",
]

PLAN_FORMAT = "actprune.plan"
PLAN_VERSION = 2  # the newest this reader understands
DENSE_PLAN_VERSION = 1  # what a plan without experts is written as
# A plan of Llama-3.1-405B is ~80 MB (one index per line); this bounds what `load` parses.
MAX_PLAN_BYTES = 512 << 20


class PlanError(ActpruneError):
    """A plan that is malformed or does not fit the model it is applied to."""


def format_validation_error(e: ValidationError) -> str:
    """The problems on one line, each naming the field (pydantic's own text is too noisy for
    users); the first few only, with a count of the rest."""
    errors = e.errors()
    parts = []
    for err in errors[:_MAX_REPORTED]:
        loc = ".".join(_printable(str(x)) for x in err["loc"]) or "request"
        parts.append(f"{loc}: {err['msg']}")
    if len(errors) > _MAX_REPORTED:
        parts.append(f"and {len(errors) - _MAX_REPORTED} more problems")
    return "; ".join(parts)


_MAX_REPORTED = 5


def _printable(name: str, limit: int = 64) -> str:
    """A field name as a user sent it, on one short line (a body can name any key it likes)."""
    text = name if name.isprintable() else repr(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LayerWidths(BaseModel):
    """Shape of one decoder layer of the *output* model (the `actprune_layer_widths` entry)."""

    model_config = ConfigDict(extra="forbid")
    intermediate_size: int = Field(ge=1, le=LIMITS.width)
    num_attention_heads: int = Field(ge=1, le=LIMITS.heads)
    num_key_value_heads: int = Field(ge=1, le=LIMITS.heads)
    # routed experts of a sparse (MoE) layer, whose intermediate_size is one expert's width
    num_experts: int | None = Field(None, ge=1, le=LIMITS.experts)

    @model_validator(mode="after")
    def _whole_kv_groups(self) -> LayerWidths:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads {self.num_key_value_heads} does not divide "
                             f"num_attention_heads {self.num_attention_heads}")
        return self


class LayerPlan(BaseModel):
    """What one source layer keeps. Index lists are sorted, unique, source numbering."""

    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0, lt=LIMITS.layers)
    drop: bool = False
    mlp_keep: list[int] = Field(default_factory=list)
    heads_keep: list[int] = Field(default_factory=list)
    kv_heads_keep: list[int] = Field(default_factory=list)
    experts_keep: list[int] | None = None  # sparse layers only: kept routed experts


class SourceModel(BaseModel):
    """The model a plan was made for; the slicer refuses any other."""

    model_config = ConfigDict(extra="forbid")
    architecture: str
    config_hash: str
    num_hidden_layers: int = Field(ge=1, le=LIMITS.layers)
    hidden_size: int = Field(ge=1, le=LIMITS.width)
    head_dim: int = Field(ge=1, le=LIMITS.head_dim)
    widths: list[LayerWidths] = Field(max_length=LIMITS.layers)


class Provenance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: str
    layer_strategy: str
    weights: ImportanceWeights
    request: dict[str, Any]
    stats_tokens: int
    stats_config_hash: str
    created: str
    actprune_version: str


class Plan(BaseModel):
    """A versioned pruning plan (see module docstring for the numbering rules)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["actprune.plan"] = PLAN_FORMAT
    format_version: int = DENSE_PLAN_VERSION  # PLAN_VERSION when it has experts
    source: SourceModel
    layers: list[LayerPlan] = Field(max_length=LIMITS.layers)
    dropped_layers: list[int] = Field(max_length=LIMITS.layers)
    widths: list[LayerWidths] = Field(max_length=LIMITS.layers)
    uniform: bool
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    provenance: Provenance

    # ---- serialisation ---------------------------------------------------------------------
    def to_json(self) -> str:
        """JSON text; the expert fields appear only on sparse layers, so a dense plan is the
        version-1 document older readers know."""
        raw = self.model_dump(mode="json")
        for entry in [*raw["widths"], *raw["source"]["widths"]]:
            if entry["num_experts"] is None:
                del entry["num_experts"]
        for lp in raw["layers"]:
            if lp["experts_keep"] is None:
                del lp["experts_keep"]
        return json.dumps(raw, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<plan>") -> Plan:
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, deep nesting
            raise PlanError(f"{source}: not JSON ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: not an actprune plan (format must be {PLAN_FORMAT!r})")
        version = raw.get("format_version", PLAN_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PlanError(f"{source}: format_version must be a positive integer, got {str(version)[:40]!r}")
        if version > PLAN_VERSION:
            raise PlanError(
                f"{source}: plan format_version {raw['format_version']} is newer than this "
                f"actprune understands ({PLAN_VERSION}); upgrade actprune"
            )
        try:
            plan = cls.model_validate(raw)
        except ValidationError as e:
            raise PlanError(f"{source}: {format_validation_error(e)}") from e
        plan.check(source=source)
        return plan

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a temporary file in the same directory, then rename."""
        return atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: no such plan file")
        if path.stat().st_size > MAX_PLAN_BYTES:  # parsing is ~10x the file in memory
            raise PlanError(f"{path}: {path.stat().st_size:,} bytes, more than a plan can be ({MAX_PLAN_BYTES:,})")
        return cls.from_json(path.read_bytes(), source=str(path))

    # ---- validation ------------------------------------------------------------------------
    def check(self, *, source: str = "<plan>") -> None:
        """Internal consistency: every layer listed once, lists sorted and in range, GQA groups
        kept whole and even, and `widths` equal to what the keep lists give."""
        src = self.source
        if self.format_version < PLAN_VERSION and any(w.num_experts is not None for w in src.widths):
            raise PlanError(f"{source}: a plan with experts has format_version {PLAN_VERSION}, not {self.format_version}")
        if [lp.index for lp in self.layers] != list(range(src.num_hidden_layers)):
            raise PlanError(f"{source}: `layers` must list layers 0..{src.num_hidden_layers - 1} in order")
        if len(src.widths) != src.num_hidden_layers:
            raise PlanError(f"{source}: source.widths has {len(src.widths)} entries for {src.num_hidden_layers} layers")
        dropped = [lp.index for lp in self.layers if lp.drop]
        if dropped != self.dropped_layers:
            raise PlanError(f"{source}: dropped_layers {self.dropped_layers} disagrees with layers[].drop {dropped}")
        if len(dropped) == src.num_hidden_layers:
            raise PlanError(f"{source}: the plan drops every layer")
        out = [self._layer_widths(lp, src.widths[lp.index], source) for lp in self.layers if not lp.drop]
        if out != self.widths:
            raise PlanError(f"{source}: `widths` disagree with the keep lists")

    @staticmethod
    def _layer_widths(lp: LayerPlan, w: LayerWidths, source: str) -> LayerWidths:
        where = f"{source}: layer {lp.index}"
        _check_index_list(lp.mlp_keep, w.intermediate_size, f"{where} mlp_keep")
        _check_index_list(lp.heads_keep, w.num_attention_heads, f"{where} heads_keep")
        _check_index_list(lp.kv_heads_keep, w.num_key_value_heads, f"{where} kv_heads_keep")
        group = w.num_attention_heads // w.num_key_value_heads
        per_group: dict[int, int] = {}
        for h in lp.heads_keep:
            per_group[h // group] = per_group.get(h // group, 0) + 1
        if sorted(per_group) != lp.kv_heads_keep:
            raise PlanError(
                f"{where}: query heads {lp.heads_keep} use KV groups {sorted(per_group)} but "
                f"kv_heads_keep is {lp.kv_heads_keep}; every kept KV head needs query heads and back"
            )
        if len(set(per_group.values())) > 1:
            raise PlanError(
                f"{where}: KV groups keep unequal numbers of query heads {per_group}; "
                "grouped-query attention needs the same number in every group"
            )
        return LayerWidths(
            intermediate_size=len(lp.mlp_keep),
            num_attention_heads=len(lp.heads_keep),
            num_key_value_heads=len(lp.kv_heads_keep),
            num_experts=_experts_kept(lp, w, where),
        )

    def validate_for(self, config: dict[str, Any], config_hash: str) -> None:
        """Raise PlanError unless this plan was made for the model described by ``config``: the
        same architecture and config hash, and — since the slicer cuts rows by the plan's own
        numbers — the same hidden size, head_dim and per-layer widths as the config's."""
        try:
            shape = model_shape(config)
        except ActpruneError as e:  # CheckpointError, UnsupportedArchitecture
            raise PlanError(f"model config: {e}") from None
        src = self.source
        archs = config.get("architectures") or []
        if src.architecture not in archs and src.architecture != config.get("actprune_base_architecture"):
            raise PlanError(f"plan is for {src.architecture}, the model is {archs}; make a plan for this model")
        if shape.num_layers != src.num_hidden_layers:
            raise PlanError(f"plan is for {src.num_hidden_layers} layers, the model has {shape.num_layers}")
        if config_hash != src.config_hash:
            raise PlanError(
                f"plan was made for a model with config hash {src.config_hash}, this model "
                f"has {config_hash} (different widths or heads); make a plan for this model"
            )
        # The hash matches: a field that still differs was edited in the plan file.
        for name, mine, theirs in (("hidden_size", src.hidden_size, shape.hidden_size),
                                   ("head_dim", src.head_dim, shape.head_dim)):
            if mine != theirs:
                raise PlanError(f"plan source.{name} is {mine}, the model's is {theirs}; "
                                "the plan file was edited: make a plan for this model")
        for i, (w, s) in enumerate(zip(src.widths, shape.layers, strict=True)):
            if w.model_dump() != vars(s):
                raise PlanError(f"plan source.widths[{i}] is {w.model_dump()}, the model's layer {i} is "
                                f"{vars(s)}; the plan file was edited: make a plan for this model")
        moe = spec_for_config(config).moe
        top_k = moe.routing(config)[1] if moe is not None else 1
        for lp in self.layers:
            if lp.experts_keep is not None and not lp.drop and len(lp.experts_keep) < top_k:
                raise PlanError(f"layer {lp.index} keeps {len(lp.experts_keep)} experts, fewer than the "
                                f"model routes each token to ({top_k}); keep at least that many")

    @property
    def has_experts(self) -> bool:
        """True for a plan of a mixture-of-experts model (some layer has routed experts)."""
        return any(w.num_experts is not None for w in self.source.widths)

    def refuse_experts(self, what: str) -> None:
        """PlanError naming ``what`` when this plan is of a mixture-of-experts model."""
        if self.has_experts:
            raise PlanError(f"{what} does not support mixture-of-experts models yet (docs/moe.md)")

    @property
    def is_identity(self) -> bool:
        """True when the plan keeps every unit of every layer."""
        return self.widths == self.source.widths


def _experts_kept(lp: LayerPlan, w: LayerWidths, where: str) -> int | None:
    """Kept experts of a sparse layer (None for a dense one); an expert keeps all its neurons."""
    if w.num_experts is None:
        if lp.experts_keep is not None:
            raise PlanError(f"{where}: experts_keep on a layer without routed experts")
        return None
    if lp.experts_keep is None:
        raise PlanError(f"{where}: a sparse layer needs experts_keep")
    _check_index_list(lp.experts_keep, w.num_experts, f"{where} experts_keep")
    if len(lp.mlp_keep) != w.intermediate_size:
        raise PlanError(f"{where}: pruning neurons inside experts is not supported; keep every one in mlp_keep")
    return len(lp.experts_keep)


def _check_index_list(xs: list[int], n: int, what: str) -> None:
    if not xs:
        raise PlanError(f"{what} is empty; a kept layer needs at least one unit")
    if any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
        raise PlanError(f"{what} must be sorted and unique")
    if xs[0] < 0 or xs[-1] >= n:
        raise PlanError(f"{what} has index {xs[-1] if xs[-1] >= n else xs[0]} outside 0..{n - 1}")
