"""The names inside a stats file, defined once: accumulator fields, channel kinds, tensor keys.

Every tensor of a stats file is named ``layers.{i}.{kind}.{field}``:

    kind ``mlp``   the input of layer i's ``down_proj``  (MLP neurons),         fields GROUP_FIELDS
    kind ``attn``  the input of layer i's ``o_proj``     (attention channels),  fields GROUP_FIELDS
    kind ``block`` the residual stream around layer i,                          fields BLOCK_FIELDS
    kind ``router`` the router of an MoE layer (instead of ``mlp``),            fields ROUTER_FIELDS

The server's accumulators, the offline recorder, the file reader, the planner and the slicer all
build and parse names with :func:`key` / :func:`parse_key`.
"""

from __future__ import annotations

import re

__all__ = [
    "BLOCK_FIELDS",
    "BLOCK_KIND",
    "CHANNEL_KINDS",
    "DEFAULT_NEAR_ZERO",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GROUP_FIELDS",
    "REPLICATED_KINDS",
    "ROUTER_FIELDS",
    "ROUTER_OFFLINE_FIELDS",
    "ROUTER_KIND",
    "SCALAR_FIELDS",
    "SPARSE_FRACTION",
    "SUMMED_FIELDS",
    "group_name",
    "group_prefix",
    "key",
    "parse_key",
]

FORMAT_NAME = "actprune.stats"
FORMAT_VERSION = 1

# Per-channel accumulators of one group; ``count`` is a scalar (every token reaches every channel).
GROUP_FIELDS = ("count", "mean", "m2", "sum", "sum_sq", "sum_abs", "max_abs", "near_zero")
SUMMED_FIELDS = ("sum", "sum_sq", "sum_abs", "near_zero")  # merge by adding
# (count, mean, m2) merge with Chan's formula; max_abs by maximum (stats_math.merge_channel_arrays)
BLOCK_FIELDS = ("cos_sum", "count")
SCALAR_FIELDS = ("count", "cos_sum")
CHANNEL_KINDS = ("mlp", "attn")
BLOCK_KIND = "block"
# Per expert of a sparse (MoE) layer, over the tokens it routed (docs/moe.md):
#   count (), topk_count (E,) times in the top-k, weight_sum (E,) Σ routing weight when in the
#   top-k (renormalised over the k when norm_topk_prob), prob_sum (E,) Σ full-softmax probability.
# A layer holds ``mlp`` (dense MLP) or ``router`` (experts), never both.
ROUTER_KIND = "router"
ROUTER_FIELDS = ("count", "topk_count", "weight_sum", "prob_sum")
# Optional, written by the offline recorder only (vLLM's fused kernel hides expert outputs):
#   reap_sum (E,) Σ routing weight × ‖expert output‖₂ over the tokens whose top-k holds e (REAP)
ROUTER_OFFLINE_FIELDS = ("reap_sum",)
# Kinds every tensor-parallel rank computes whole: a snapshot takes the lowest rank's.
REPLICATED_KINDS = (BLOCK_KIND, ROUTER_KIND)

# |x| at or below this counts as "near zero" unless the user chooses another threshold.
DEFAULT_NEAR_ZERO = 1e-3
# A channel is "mostly dead" when more than this fraction of tokens leave it near zero.
SPARSE_FRACTION = 0.9

_KEY_RE = re.compile(r"^layers\.(\d+)\.(mlp|attn|block|router)\.(\w+)$")


def group_name(layer: int, kind: str) -> str:
    """``layers.{layer}.{kind}``: the accumulator group of one layer and kind."""
    return f"layers.{layer}.{kind}"


def group_prefix(layer: int, kind: str) -> str:
    """``layers.{layer}.{kind}.``"""
    return group_name(layer, kind) + "."


def key(layer: int, kind: str, field: str) -> str:
    """``layers.{layer}.{kind}.{field}``"""
    return f"{group_name(layer, kind)}.{field}"


def parse_key(name: str) -> tuple[int, str, str] | None:
    """(layer, kind, field) of a stats tensor name, or None for a name outside the schema."""
    m = _KEY_RE.match(name)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None
