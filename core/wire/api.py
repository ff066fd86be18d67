"""HTTP bodies of the actprune routes, defined once for server and client.

The server passes these models to FastAPI as ``response_model=`` (so ``/openapi.json``
describes them); the client validates what it receives against the very same classes.
Light on purpose: pydantic only.

Routes (same process and port as vLLM's OpenAI API)::

    GET  /activations/stats[?k=10]              -> StatsSummary (JSON; k least-important units)
    GET  /activations/stats?format=safetensors  -> the stats file (see ``wire/stats.py``)
    GET  /activations/status                    -> StatusResponse
    GET  /activations/metrics                   -> actprune's Prometheus series (text)
    POST /activations/reset                     -> ResetResponse
    POST /activations/pause                     -> PauseResponse
    POST /activations/resume                    -> PauseResponse
    POST /prune/plan                            -> the plan (JSON)

Every POST body is JSON (``Content-Type: application/json``; ``{}`` when a route takes no
fields). Every error answer is an :class:`ErrorBody` (``{"detail": "..."}``), FastAPI's
convention.

Floats that cannot be computed (a layer that has seen no token, an overflowing activation) are
``null``, never NaN or Infinity, so every answer is strict JSON.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "PLAN_PATH",
    "SAFETENSORS_MEDIA_TYPE",
    "STATS_PATH",
    "STATUS_PATH",
    "SUMMARY_VERSION",
    "ChannelGroupSummary",
    "ErrorBody",
    "ExpertsSummary",
    "HeadsSummary",
    "LayerSummary",
    "PauseResponse",
    "ResetResponse",
    "SnapshotMeta",
    "Spread",
    "StatsSummary",
    "StatusResponse",
    "UnitScore",
    "control_path",
]

STATS_PATH = "/activations/stats"
STATUS_PATH = "/activations/status"
PLAN_PATH = "/prune/plan"
SAFETENSORS_MEDIA_TYPE = "application/vnd.actprune.stats+safetensors"
SUMMARY_VERSION = 1
_CONTROL_ACTIONS = ("reset", "pause", "resume")


def control_path(action: str) -> str:
    """``/activations/{reset,pause,resume}``."""
    if action not in _CONTROL_ACTIONS:
        raise ValueError(f"action must be one of {_CONTROL_ACTIONS}, got {action!r}")
    return f"/activations/{action}"


class ErrorBody(BaseModel):
    """Body of every 4xx/5xx answer of an actprune route."""

    detail: str = Field(description="What went wrong and, for a user mistake, how to fix it.")


class StatusResponse(BaseModel):
    """``GET /activations/status``: what the capture is doing right now."""

    capturing: bool = Field(description="True while hooks fold activations into the accumulators.")
    paused: bool = Field(description="True after POST /activations/pause, until /resume.")
    tokens_prefill: int = Field(ge=0, description="Prompt tokens counted since the last reset.")
    tokens_decode: int = Field(ge=0, description="Generated tokens counted since the last reset.")
    tokens_cached: int | None = Field(
        default=0, ge=0, description="Prompt tokens served from vLLM's prefix cache since the last reset, "
        "not seen by the capture (0 when prefix caching is off; null when vLLM keeps no count)."
    )
    prefix_caching: bool = Field(default=False, description="True when the server runs with prefix caching.")
    tokens_unsampled: int = Field(
        default=0, ge=0, description="Tokens of the forward steps the capture skipped since the last reset "
        "(capture option step_sample < 1); not in the statistics."
    )
    step_sample: float = Field(default=1.0, gt=0, le=1, description="The chance that a forward step is "
                               "captured (1: every step; capture option step_sample).")
    window_start: float = Field(description="Unix time of the last reset (or of the first start).")
    last_snapshot_time: float | None = Field(
        description="Unix time the snapshot was last written to disk; null if never."
    )
    model: str
    architecture: str
    config_hash: str = Field(description="Hash of the shape-deciding config; 'same model' means equal.")
    tensor_parallel_size: int = Field(ge=1)
    pipeline_parallel_size: int = Field(ge=1)
    num_layers: int = Field(ge=0)
    near_zero_threshold: float = Field(ge=0, description="|x| at or below this counts as zero.")
    instance_id: str | None = Field(
        default=None, description="The server's identity (stable across its restarts); null from older servers."
    )

    @property
    def tokens(self) -> int:
        return self.tokens_prefill + self.tokens_decode


class ResetResponse(BaseModel):
    """``POST /activations/reset``: the accumulators are zero; ``status`` is after the reset."""

    ok: bool = True
    status: StatusResponse


class PauseResponse(BaseModel):
    """``POST /activations/pause`` and ``/resume``; ``status`` is after the change."""

    ok: bool = True
    status: StatusResponse


# ---- the JSON summary of a snapshot -----------------------------------------------------------
class Spread(BaseModel):
    """Minimum, mean and maximum of one per-unit figure across the units of a layer."""

    min: float | None
    mean: float | None
    max: float | None


class UnitScore(BaseModel):
    """One unit (a neuron or a head, by index within its layer) and its score."""

    index: int = Field(ge=0)
    score: float | None


class ChannelGroupSummary(BaseModel):
    """Per-channel figures of one group (MLP neurons at the input of ``down_proj``, or attention
    channels at the input of ``o_proj``), summarised across its channels."""

    width: int = Field(ge=0, description="Number of channels.")
    mean: Spread = Field(description="Per-channel mean of x.")
    std: Spread = Field(description="Per-channel standard deviation of x.")
    mean_abs: Spread = Field(description="Per-channel mean |x| (the summary's score).")
    sparsity: Spread = Field(description="Per-channel fraction of tokens with |x| <= threshold.")
    frac_sparse_90: float | None = Field(description="Fraction of channels more than 90% sparse.")
    max_abs: float | None = Field(description="Largest |x| seen on any channel.")
    least_important: list[UnitScore] = Field(
        description="The k channels with the smallest mean |x|, smallest first."
    )


class HeadsSummary(BaseModel):
    """Attention heads of one layer; a head's figure is the mean over its ``head_dim`` channels."""

    num_heads: int = Field(ge=0)
    head_dim: int = Field(ge=1)
    mean_abs: list[float | None] = Field(description="Per head: mean over channels of mean |x|.")
    std: list[float | None] = Field(description="Per head: mean over channels of std(x).")
    sparsity: list[float | None] = Field(description="Per head: mean over channels of sparsity.")
    least_important: list[UnitScore] = Field(
        description="The k heads with the smallest mean |x|, smallest first."
    )


class ExpertsSummary(BaseModel):
    """The router of an MoE layer: how the layer's tokens were routed to its experts."""

    num_experts: int = Field(ge=1)
    frequency: list[float | None] = Field(
        description="Per expert: fraction of tokens whose top-k holds it (sums to top-k).")
    mean_weight: list[float | None] = Field(
        description="Per expert: mean routing weight over the tokens that picked it (renormalised "
                    "over the top-k when the model's norm_topk_prob).")
    least_used: list[UnitScore] = Field(
        description="The k experts with the smallest router-weighted frequency (weight sum per "
                    "token), smallest first.")


class LayerSummary(BaseModel):
    layer: int = Field(ge=0)
    tokens: int = Field(ge=0, description="Tokens folded into this layer's accumulators.")
    mlp: ChannelGroupSummary | None = Field(description="Null for an MoE layer (see experts).")
    experts: ExpertsSummary | None = Field(default=None, description="An MoE layer's router; null for a dense layer.")
    attn: ChannelGroupSummary
    heads: HeadsSummary | None = Field(
        description="Null when the snapshot's metadata has no head_dim."
    )
    block_influence: float | None = Field(
        description="ShortGPT's block influence, 1 - mean cos(residual in, out); null if no token."
    )


class SnapshotMeta(BaseModel):
    """The stats file's metadata; keys beyond these are kept as they are."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    architecture: str
    config_hash: str
    tensor_parallel_size: int
    near_zero_threshold: float
    tokens_prefill: int
    tokens_decode: int
    tokens_cached: int | None = None  # prompt tokens served from the prefix cache, not seen
    prefix_caching: bool = False
    tokens_unsampled: int = 0  # tokens of the steps a sampling capture skipped (step_sample), not seen
    format_version: int
    merged_from: int = 1


class StatsSummary(BaseModel):
    """``GET /activations/stats`` (JSON): every layer of the snapshot, summarised.

    ``score`` names the importance score behind ``least_important``: ``mean_abs`` is the
    per-unit mean |x| over all tokens, the simplest activation-magnitude criterion. The pruning
    planner may use other scores; this summary is for a quick look.
    """

    summary_version: int = SUMMARY_VERSION
    score: Literal["mean_abs"] = "mean_abs"
    k: int = Field(ge=0, description="How many least-important units each list holds at most.")
    meta: SnapshotMeta
    layers: list[LayerSummary]

    @property
    def tokens(self) -> int:
        return self.meta.tokens_prefill + self.meta.tokens_decode
