"""The stats file: one safetensors file holding every accumulator of a snapshot.

This module is the single definition of the format (documented in ``docs/formats.md``); the
server writes it, the client reads and merges it (merging: :mod:`.stats_merge`), the pruning
package scores it. Loading validates names, shapes, dtypes and metadata and raises
:class:`StatsFormatError` with a message that names the problem, so a foreign or truncated file
never reaches the maths.

Tensors, for every decoder layer ``i`` present in the snapshot::

    layers.{i}.mlp.{count,mean,m2,sum,sum_sq,sum_abs,max_abs,near_zero}   # down_proj input, (I_i,)
    layers.{i}.attn.{...same...}                                         # o_proj input, (H_i*D,)
    layers.{i}.block.{cos_sum,count}                                     # scalars
    layers.{i}.router.{count,topk_count,weight_sum,prob_sum}             # MoE layer, (E,); no mlp

In the file, ``count`` / ``cos_sum`` are float64 scalars, ``sum`` is float64 and the other
per-channel arrays are float32; ``mean`` is not stored (it is ``sum / count``). A Qwen3-32B
snapshot is ~60 MB instead of ~110 MB. Accumulation happens in float64 on the device and loaded
arrays are float64 again (``max_abs`` stays float32), with ``mean`` derived on load. ``mean``
stays exact because merges of large-mean channels need it to full precision (Chan's update);
the rest carry one float32 rounding (relative 6e-8), far below what pruning decisions see.
Metadata values are strings (safetensors' rule); structured values are JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from actprune.core.archs import moe_shape
from actprune.core.archs.shape import LIMITS
from actprune.core.errors import ActpruneError
from actprune.core.files import atomic_write
from actprune.core.stats_math import ChannelFigures, figures
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .schema import (
    BLOCK_FIELDS,
    BLOCK_KIND,
    CHANNEL_KINDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUP_FIELDS,
    ROUTER_FIELDS,
    ROUTER_KIND,
    ROUTER_OFFLINE_FIELDS,
    group_prefix,
    key,
    parse_key,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GROUP_FIELDS",
    "Stats",
    "StatsFormatError",
    "StatsVersionError",
    "config_hash",
    "from_file_arrays",
    "read_metadata",
    "to_file_arrays",
]

REQUIRED_META = (
    "format", "format_version", "model", "architecture", "config_hash",
    "tensor_parallel_size", "near_zero_threshold", "tokens_prefill", "tokens_decode",
)
# Metadata kept as written: names and hashes, never numbers even when they look like one.
_STRING_META = ("format", "model", "architecture", "config_hash")
# A Qwen3-32B snapshot is ~60 MB; this bounds what `load` reads into memory.
MAX_STATS_BYTES = 2 << 30
# Config keys that decide tensor shapes; the hash of these is what "same model" means.
_HASHED_CONFIG_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "actprune_layer_widths",
)


class StatsFormatError(ActpruneError):
    """A stats file (or bytes) that does not follow the documented format."""


class StatsVersionError(StatsFormatError):
    """A stats file written by a newer actprune (a newer ``format_version``): valid, but not ours
    to read, nor to overwrite."""


def config_hash(config: dict[str, Any]) -> str:
    """Stable hash of the shape-deciding part of a Hugging Face config dict."""
    picked = {k: config.get(k) for k in _HASHED_CONFIG_KEYS if config.get(k) is not None}
    if "head_dim" not in picked and picked.get("num_attention_heads"):
        try:
            picked["head_dim"] = picked["hidden_size"] // picked["num_attention_heads"]
        except (KeyError, TypeError):  # a malformed config: model_shape names the field
            pass
    if picked.get("num_key_value_heads") is None and picked.get("num_attention_heads"):
        picked["num_key_value_heads"] = picked["num_attention_heads"]
    picked.update(moe_shape(config))  # empty for a dense model
    blob = json.dumps(picked, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stats:
    """A snapshot: flat ``name -> array`` accumulators plus metadata (JSON-able values)."""

    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- structure -------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Decoder-layer indices present, sorted."""
        return sorted({k[0] for n in self.tensors if (k := parse_key(n))})

    def group(self, layer: int, kind: str) -> dict[str, np.ndarray]:
        """The accumulator group ``kind`` ('mlp' or 'attn') of one layer."""
        prefix = group_prefix(layer, kind)
        try:
            return {f: self.tensors[prefix + f] for f in GROUP_FIELDS}
        except KeyError as e:
            raise KeyError(f"stats have no {prefix}* tensors (layers present: {self.layers})") from e

    def router(self, layer: int) -> dict[str, np.ndarray] | None:
        """The router group of an MoE layer (``ROUTER_FIELDS``, and those of
        ``ROUTER_OFFLINE_FIELDS`` the file has), None for a dense layer."""
        prefix = group_prefix(layer, ROUTER_KIND)
        fields = [f for f in (*ROUTER_FIELDS, *ROUTER_OFFLINE_FIELDS) if f in ROUTER_FIELDS or prefix + f in self.tensors]
        return {f: self.tensors[prefix + f] for f in fields} if prefix + "count" in self.tensors else None

    def figures(self, layer: int, kind: str) -> ChannelFigures:
        return figures(self.group(layer, kind))

    def block_influence(self, layer: int) -> float:
        """ShortGPT's block influence: 1 - mean cosine(residual in, residual out)."""
        n = float(self.tensors[key(layer, BLOCK_KIND, "count")])
        cos = float(self.tensors[key(layer, BLOCK_KIND, "cos_sum")])
        return 1.0 - cos / n if n > 0 else float("nan")

    @property
    def tokens(self) -> int:
        return int(self.meta.get("tokens_prefill", 0)) + int(self.meta.get("tokens_decode", 0))

    # ---- serialisation ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.meta.items()}
        meta.setdefault("format", FORMAT_NAME)
        meta.setdefault("format_version", str(FORMAT_VERSION))
        return st_save(to_file_arrays(self.tensors), metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "<bytes>") -> Stats:
        try:
            tensors = st_load(data)
            meta_raw = read_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as e:
            raise StatsFormatError(f"{source}: not a safetensors stats file ({e})") from e
        stats = cls(tensors=from_file_arrays(tensors), meta={k: _decode(k, v) for k, v in meta_raw.items()})
        stats.validate(source=source)
        return stats

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a temporary file in the same directory, then rename."""
        return atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Stats:
        path = Path(path)
        if not path.is_file():
            raise StatsFormatError(f"{path}: no such stats file")
        if path.stat().st_size > MAX_STATS_BYTES:
            raise StatsFormatError(f"{path}: {path.stat().st_size:,} bytes, more than a stats file can be "
                                   f"({MAX_STATS_BYTES:,})")
        return cls.from_bytes(path.read_bytes(), source=str(path))

    # ---- validation ------------------------------------------------------------------------
    def validate(self, *, source: str = "<stats>") -> None:
        """Raise StatsFormatError naming the first problem found (StatsVersionError for a file of
        a newer format version, checked first: a newer version may lack what this one requires)."""
        version = self.meta.get("format_version")
        if self.meta.get("format") == FORMAT_NAME and version is not None:
            try:
                newer = not isinstance(version, bool) and int(version) > FORMAT_VERSION
            except (TypeError, ValueError):
                raise StatsFormatError(f"{source}: format_version must be an integer, got {version!r}") from None
            if newer:
                raise StatsVersionError(
                    f"{source}: format_version {version} is newer than this actprune understands "
                    f"({FORMAT_VERSION}); upgrade actprune"
                )
        missing = [k for k in REQUIRED_META if k not in self.meta]
        if missing:
            raise StatsFormatError(f"{source}: metadata lacks {missing}; is this an actprune stats file?")
        if self.meta["format"] != FORMAT_NAME:
            raise StatsFormatError(f"{source}: format is {self.meta['format']!r}, expected {FORMAT_NAME!r}")
        _validate_meta(self.meta, source)
        for name in self.tensors:
            if parse_key(name) is None:
                raise StatsFormatError(f"{source}: unexpected tensor {name!r}")
        if not self.layers:
            raise StatsFormatError(f"{source}: no layer tensors")
        if self.layers[-1] >= LIMITS.layers:
            raise StatsFormatError(f"{source}: layer index {self.layers[-1]} is beyond any model ({LIMITS.layers} layers)")
        for i in self.layers:
            for kind in CHANNEL_KINDS:
                if kind == "mlp" and _validate_router(self.tensors, i, source):
                    continue  # an MoE layer: its router instead of the MLP's channels
                _validate_group(self.tensors, group_prefix(i, kind), source)
            for f in BLOCK_FIELDS:
                t = self.tensors.get(key(i, BLOCK_KIND, f))
                if t is None or t.shape != () or t.dtype != np.float64:
                    raise StatsFormatError(f"{source}: {key(i, BLOCK_KIND, f)} must be a float64 scalar")
                if not np.isfinite(t) or (f == "count" and t < 0):
                    raise StatsFormatError(f"{source}: {key(i, BLOCK_KIND, f)} is {t}, must be finite (a count >= 0)")


def _validate_group(tensors: dict[str, np.ndarray], prefix: str, source: str) -> None:
    width = None
    for f in GROUP_FIELDS:
        t = tensors.get(prefix + f)
        if t is None:
            raise StatsFormatError(f"{source}: missing tensor {prefix}{f}")
        want = np.float32 if f == "max_abs" else np.float64
        if t.dtype != want:
            raise StatsFormatError(f"{source}: {prefix}{f} has dtype {t.dtype}, expected {np.dtype(want)}")
        if f == "count":
            if t.shape != ():
                raise StatsFormatError(f"{source}: {prefix}count must be a scalar, got shape {t.shape}")
            if not np.isfinite(t) or t < 0:
                raise StatsFormatError(f"{source}: {prefix}count is {t}, must be a finite count >= 0")
            continue
        if t.ndim != 1:
            raise StatsFormatError(f"{source}: {prefix}{f} must be 1-D, got shape {t.shape}")
        if width is None:
            width = t.shape[0]
        elif t.shape[0] != width:
            raise StatsFormatError(f"{source}: {prefix}{f} has {t.shape[0]} channels, others {width}")
        if np.isnan(t).any():
            raise StatsFormatError(f"{source}: {prefix}{f} holds NaN; the file is corrupt")
        if f == "near_zero" and not (np.isfinite(t).all() and (t >= 0).all()):
            raise StatsFormatError(f"{source}: {prefix}near_zero must hold finite counts >= 0")
    if width is not None and width > LIMITS.width:
        raise StatsFormatError(f"{source}: {prefix}* have {width} channels, beyond any model ({LIMITS.width})")


def _validate_router(tensors: dict[str, np.ndarray], layer: int, source: str) -> bool:
    """Check layer ``layer``'s router group; False when it has none (a dense layer)."""
    prefix, mlp = group_prefix(layer, ROUTER_KIND), group_prefix(layer, "mlp")
    if not any(n.startswith(prefix) for n in tensors):
        return False
    if any(n.startswith(mlp) for n in tensors):
        raise StatsFormatError(f"{source}: layer {layer} has both mlp and router tensors; a layer is dense or MoE")
    arrays = {}
    for f in (*ROUTER_FIELDS, *ROUTER_OFFLINE_FIELDS):
        t = tensors.get(prefix + f)
        if t is None and f in ROUTER_OFFLINE_FIELDS:  # optional: the offline recorder's only
            continue
        shape_ok = t is not None and (t.shape == () if f == "count" else t.ndim == 1)
        if not shape_ok or t.dtype != np.float64:
            what = "a float64 scalar" if f == "count" else "a 1-D float64 array (one value per expert)"
            raise StatsFormatError(f"{source}: {prefix}{f} must be {what}")
        if not (np.isfinite(t).all() and (t >= 0).all()):
            raise StatsFormatError(f"{source}: {prefix}{f} must hold finite values >= 0")
        arrays[f] = t
    widths = {a.shape[0] for f, a in arrays.items() if f != "count"}
    if len(widths) != 1 or not 0 < widths.pop() <= LIMITS.experts:
        raise StatsFormatError(f"{source}: {prefix}* must have one width in 1..{LIMITS.experts} experts")
    count, picks = float(arrays["count"]), arrays["topk_count"]
    # a token picks an expert at most once; a routing weight or probability is at most 1
    if (picks != np.round(picks)).any() or (picks > count).any() or (arrays["prob_sum"] > count * (1 + 1e-9)).any():
        raise StatsFormatError(f"{source}: {prefix}topk_count / prob_sum are not counts of {count:g} tokens")
    return True


def _validate_meta(meta: dict[str, Any], source: str) -> None:
    """The numbers of the metadata: token counts and sizes are integers, the threshold finite."""
    optional = [(k, 0) for k in ("tokens_cached", "tokens_unsampled") if meta.get(k) is not None]
    for name, lo in (("tokens_prefill", 0), ("tokens_decode", 0), ("tensor_parallel_size", 1), *optional):
        v = meta[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise StatsFormatError(f"{source}: metadata {name} must be an integer >= {lo}, got {str(v)[:40]!r}")
    v = meta["near_zero_threshold"]
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
        raise StatsFormatError(f"{source}: metadata near_zero_threshold must be a finite number >= 0, "
                               f"got {str(v)[:40]!r}")


def read_metadata(data: bytes) -> dict[str, str]:
    """The raw ``__metadata__`` strings of safetensors bytes (no validation)."""
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length beyond end of file")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


def to_file_arrays(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Memory layout -> file layout: drop ``mean``, per-channel arrays but ``sum`` to float32
    (a router's per-expert counts stay float64: float32 counts stop being exact at 2^24)."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".mean"):
            continue
        if v.ndim == 1 and v.dtype == np.float64 and not k.endswith(".sum") and f".{ROUTER_KIND}." not in k:
            v = v.astype(np.float32)
        # reshape: ascontiguousarray turns 0-d scalars (count, cos_sum) into shape (1,)
        out[k] = np.ascontiguousarray(v).reshape(np.shape(v))
    return out


def from_file_arrays(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """File layout -> memory layout: float64 per-channel arrays (max_abs float32), ``mean``
    derived as ``sum / count`` for every channel group."""
    out = {}
    for k, v in tensors.items():
        if v.ndim == 1 and v.dtype == np.float32 and not k.endswith(".max_abs"):
            v = v.astype(np.float64)
        out[k] = v
    for k in [k for k in out if k.endswith(".sum") and ".block." not in k]:
        prefix = k[: -len("sum")]
        count = out.get(prefix + "count")
        if prefix + "mean" not in out and count is not None and count.shape == ():
            out[prefix + "mean"] = out[k] / max(float(count), 1.0)
    return out


def _decode(k: str, v: str) -> Any:
    # A hex config hash of digits only ("1234...") or with an "e" would otherwise become a number.
    if k in _STRING_META:
        return v
    try:
        return json.loads(v)
    except (ValueError, RecursionError):  # not JSON, a 5000-digit number, deep nesting
        return v
