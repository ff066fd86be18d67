"""Merging stats files: several snapshots of one model (pods, windows) into one.

Separate from :mod:`.stats`, which defines the file (names, layout, validation): merging is an
operation on snapshots already loaded and checked, the client's (``actprune stats pull``) and
the tools'. Exact: counts and sums add, channel moments combine by Chan's update
(:func:`actprune.core.stats_math.merge_channel_arrays`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from actprune.core.stats_math import merge_channel_arrays

from .schema import (
    BLOCK_FIELDS,
    BLOCK_KIND,
    CHANNEL_KINDS,
    GROUP_FIELDS,
    ROUTER_KIND,
    ROUTER_OFFLINE_FIELDS,
    group_prefix,
    key,
    parse_key,
)
from .stats import Stats, StatsFormatError

__all__ = ["instance_ids", "merge"]


def merge(parts: Iterable[Stats]) -> Stats:
    """Exact merge of snapshots of the same model (several pods, several windows)."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge() needs at least one snapshot")
    first = parts[0]
    for p in parts[1:]:
        if p.meta["config_hash"] != first.meta["config_hash"]:
            raise StatsFormatError(
                f"cannot merge stats of different models: config_hash {first.meta['config_hash']} "
                f"({first.meta['model']}) vs {p.meta['config_hash']} ({p.meta['model']})"
            )
        if float(p.meta["near_zero_threshold"]) != float(first.meta["near_zero_threshold"]):
            raise StatsFormatError("cannot merge stats recorded with different near_zero_threshold")
        if p.layers != first.layers:
            raise StatsFormatError(f"cannot merge stats over different layers: {first.layers} vs {p.layers}")
        for i in first.layers:
            a, b = first.router(i), p.router(i)
            if (a is None) != (b is None) or (a is not None and a["topk_count"].shape != b["topk_count"].shape):
                raise StatsFormatError(f"cannot merge stats whose layer {i} routes to different experts")
    tensors = dict(first.tensors)
    for name in [n for n in tensors if (k := parse_key(n)) and k[1] == ROUTER_KIND and k[2] in ROUTER_OFFLINE_FIELDS]:
        if not all(name in p.tensors for p in parts):  # a sum over only some of the tokens: dropped
            del tensors[name]
    for p in parts[1:]:
        for i in first.layers:
            router = p.router(i)
            for f, v in (router or {}).items():  # counts and sums: they add
                name = key(i, ROUTER_KIND, f)
                if name in tensors:
                    tensors[name] = np.asarray(tensors[name] + v, dtype=np.float64)
            for kind in CHANNEL_KINDS:
                if kind == "mlp" and router is not None:
                    continue
                prefix = group_prefix(i, kind)
                a = {f: tensors[prefix + f] for f in GROUP_FIELDS}
                merged = merge_channel_arrays(a, p.group(i, kind))
                tensors.update({prefix + f: v for f, v in merged.items()})
            for f in BLOCK_FIELDS:
                name = key(i, BLOCK_KIND, f)
                tensors[name] = np.asarray(tensors[name] + p.tensors[name], dtype=np.float64)
    meta = dict(first.meta)
    meta["tokens_prefill"] = sum(int(p.meta["tokens_prefill"]) for p in parts)
    meta["tokens_decode"] = sum(int(p.meta["tokens_decode"]) for p in parts)
    # prompt tokens served from a prefix cache, not seen (server/api/prefix.py); unknown if any part's is
    cached = [p.meta.get("tokens_cached", 0) for p in parts]
    meta["tokens_cached"] = None if any(c is None for c in cached) else sum(int(c) for c in cached)
    meta["prefix_caching"] = any(p.meta.get("prefix_caching") is True for p in parts)
    # tokens of steps a sampling capture skipped (step_sample); absent = none skipped
    unsampled = sum(int(p.meta.get("tokens_unsampled") or 0) for p in parts)
    meta.pop("tokens_unsampled", None)
    if unsampled:
        meta["tokens_unsampled"] = unsampled
    meta["merged_from"] = len(parts) + sum(int(p.meta.get("merged_from", 1)) - 1 for p in parts)
    meta.pop("instance_id", None)  # a merge is no single server's: it lists them all
    ids = sorted({i for p in parts for i in instance_ids(p)})
    if ids:
        meta["instance_ids"] = ids
    return Stats(tensors=tensors, meta=meta)


def instance_ids(stats: Stats) -> list[str]:
    """The servers whose counts a snapshot holds: its ``instance_id``, or for a merge its
    ``instance_ids``; empty for files written before servers had identities."""
    if "instance_ids" in stats.meta:
        return [str(i) for i in stats.meta["instance_ids"]]
    return [str(stats.meta["instance_id"])] if "instance_id" in stats.meta else []
