"""The request that makes a pruning plan: what to prune, as the CLI flags and the HTTP body give it.

Separate from :mod:`.plan` (the document a planner writes and the slicer reads) because it is the
other side of the planner: its input, validated here, field by field, before any planning starts.
Defined once here and shared by the planner, ``actprune plan`` (every flag is a field), the server
route (``POST /prune/plan``) and the client. Light on purpose: stdlib and pydantic only.
"""

from __future__ import annotations

import math
from typing import Literal

from actprune.core.archs import LIMITS
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ImportanceWeights", "PlanRequest"]


class ImportanceWeights(BaseModel):
    """Weights of the `importance` composite (normalised per layer, then summed)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    magnitude: float = Field(0.3, ge=0)
    variance: float = Field(0.4, ge=0)
    sparsity: float = Field(0.3, ge=0)

    @model_validator(mode="after")
    def _not_all_zero(self) -> ImportanceWeights:
        if self.magnitude + self.variance + self.sparsity <= 0:
            raise ValueError("importance weights must not all be zero")
        return self


class PlanRequest(BaseModel):
    """What to prune. Field names equal the `actprune plan` flags (`mlp_ratio` = `--mlp-ratio`).

    Ratios are fractions *removed*: ``mlp_ratio=0.3`` removes 30 % of MLP neurons. Every number
    must be finite (``1e999`` parses as infinity and is refused, naming the field).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    strategy: str = Field("wifv", description="unit scoring strategy")
    layer_strategy: str = Field("block_influence", description="layer scoring strategy")
    weights: ImportanceWeights = Field(default_factory=ImportanceWeights)
    mlp_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of MLP neurons removed")
    head_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of attention heads removed")
    head_mode: Literal["kv_groups", "query_heads"] = Field(
        "kv_groups", description="remove whole KV groups, or query heads evenly within every group"
    )
    keep_layers: list[int] | None = Field(
        None, max_length=LIMITS.layers,
        description="decoder layers kept whole: never dropped, none of their neurons, heads or experts removed "
        "(-1 is the last layer); every ratio and budget is still a share of the whole model, taken from the "
        "other layers (CLI: 0-3,28,29 or =-2,-1)",
    )
    drop_layers: int | None = Field(None, ge=0, description="number of decoder layers to drop")
    drop_layer_ratio: float | None = Field(None, ge=0, lt=1, description="fraction of layers dropped")
    param_ratio: float | None = Field(
        None, gt=0, lt=1, description="fraction of all parameters removed, split by the planner"
    )
    width_multiple: int = Field(1, ge=1, description="kept MLP widths are multiples of this")
    tp_size: int = Field(1, ge=1, description="tensor-parallel size the result must support")
    min_mlp_width: int = Field(1, ge=1, description="minimum MLP neurons kept per layer")
    min_kv_heads: int = Field(1, ge=1, description="minimum KV heads kept per layer")
    per_layer: bool = Field(
        False, description="per-layer widths from scores standardised per layer (else uniform)"
    )
    expert_ratio: float | None = Field(
        None, ge=0, lt=1, description="fraction of routed experts removed (MoE): from every sparse layer, or "
        "with per_layer from all of them together, by one threshold on the expert score")
    expert_strategy: str = Field("router_weighted", description="expert scoring strategy (MoE): "
                                 "router_weighted (mean routing weight per token), frequency (top-k share) or "
                                 "reap (mean routing weight × expert output norm; stats from actprune record only)")
    expert_multiple: int = Field(1, ge=1, description="kept experts per layer are multiples of this "
                                 "(e.g. the expert-parallel size)")
    min_experts: int = Field(1, ge=1, le=LIMITS.experts, description="minimum routed experts kept per sparse "
                             "layer (MoE; never fewer than top-k)")
    layer_sensitivity: list[float] | None = Field(
        None,
        max_length=LIMITS.layers,
        description="per-layer loss increases from `actprune sensitivity` (CLI: the JSON file); "
        "with per_layer and mlp_ratio, MLP widths come from them (removed fraction ∝ Δ^-sensitivity_exponent, "
        "at most 2× the ratio); "
        "with param_ratio and head_sensitivity, the budget is allocated across layers and kinds",
    )
    sensitivity_exponent: float = Field(
        1.0, ge=0, le=4,
        description="with layer_sensitivity and per_layer: a layer's removed MLP fraction ∝ Δ^-e (0: uniform "
        "widths; 1/2 spreads the cut more evenly than 1, 2 less; docs/plan.md)",
    )
    head_sensitivity: list[float] | None = Field(
        None,
        max_length=LIMITS.layers,
        description="per-layer loss increases when that layer alone loses heads (`actprune sensitivity` on a plan "
        "with head_ratio; the file's attn_deltas); with param_ratio and layer_sensitivity, heads and MLP "
        "neurons of every layer share the budget by least modelled loss per parameter",
    )
    sensitivity_at: dict[str, float] | None = Field(
        None,
        description="removed fractions the sensitivities were measured at: {'mlp': neurons, 'attn': query heads} "
        "(CLI: from the sensitivity file)",
    )

    head_cap: float | None = Field(
        None, ge=0, lt=1,
        description="with param_ratio and head_sensitivity: the largest fraction of a layer's query heads the "
        "budget may take (0 keeps every head: the budget goes to MLP neurons); default twice the measured share",
    )

    @property
    def removes_nothing(self) -> bool:
        """No field asks for anything to be removed (all absent or 0): a plan of it is the model
        itself, which a user never means to ask for (the CLI and the route refuse it)."""
        return not any((self.param_ratio, self.mlp_ratio, self.head_ratio, self.expert_ratio, self.drop_layers,
                        self.drop_layer_ratio))

    @model_validator(mode="after")
    def _consistent(self) -> PlanRequest:
        if self.drop_layers is not None and self.drop_layer_ratio is not None:
            raise ValueError("give drop_layers or drop_layer_ratio, not both")
        if self.layer_sensitivity is not None and not all(math.isfinite(d) for d in self.layer_sensitivity):
            raise ValueError("layer_sensitivity values must be finite numbers")
        if self.head_sensitivity is not None and not all(math.isfinite(d) for d in self.head_sensitivity):
            raise ValueError("head_sensitivity values must be finite numbers")
        budget = self.param_ratio is not None and self.head_sensitivity is not None
        if budget and (self.layer_sensitivity is None or self.sensitivity_at is None):
            raise ValueError("head_sensitivity allocates param_ratio across kinds: it needs layer_sensitivity "
                             "and sensitivity_at (give the sensitivity file of a plan with mlp_ratio and head_ratio)")
        if self.head_cap is not None and self.param_ratio is None:
            raise ValueError("head_cap limits the heads the whole-model budget takes: it needs param_ratio")
        if self.head_sensitivity is not None and self.param_ratio is None:
            raise ValueError("head_sensitivity is used with param_ratio (the whole-model budget)")
        at = self.sensitivity_at or {}
        if budget and not all(0 < at.get(k, 0) <= 1 and math.isfinite(at[k]) for k in ("mlp", "attn")):
            raise ValueError("sensitivity_at needs 'mlp' and 'attn' fractions in (0, 1]")
        if self.layer_sensitivity is not None and not (self.per_layer and self.mlp_ratio) and not budget:
            raise ValueError("layer_sensitivity sets per-layer MLP widths: it needs per_layer and mlp_ratio")
        if self.param_ratio is not None and (self.mlp_ratio is not None or self.head_ratio is not None):
            raise ValueError("param_ratio splits the budget itself; do not combine it with mlp_ratio/head_ratio")
        return self
