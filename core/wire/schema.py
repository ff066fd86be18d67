"""The names inside a stats file, defined once: accumulator fields, channel kinds, tensor keys.

Every tensor of a stats file is named ``layers.{i}.{kind}.{field}``:

    kind ``mlp``   the input of layer i's ``down_proj``  (MLP neurons),         fields GROUP_FIELDS
    kind ``attn``  the input of layer i's ``o_proj``     (attention channels),  fields GROUP_FIELDS
    kind ``block`` the residual stream around layer i,                          fields BLOCK_FIELDS

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

# |x| at or below this counts as "near zero" unless the user chooses another threshold.
DEFAULT_NEAR_ZERO = 1e-3
# A channel is "mostly dead" when more than this fraction of tokens leave it near zero.
SPARSE_FRACTION = 0.9

_KEY_RE = re.compile(r"^layers\.(\d+)\.(mlp|attn|block)\.(\w+)$")


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
