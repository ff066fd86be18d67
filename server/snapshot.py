"""Assemble the per-rank shards returned by ``collective_rpc("actprune_snapshot")`` into one
stats file (numpy only; runs in the API process).

Tensor parallelism splits ``down_proj`` / ``o_proj`` inputs into contiguous slices: rank r of
t holds MLP neurons ``[r*I/t, (r+1)*I/t)`` and query heads ``[r*H/t, (r+1)*H/t)``. Each shard
records ``(offset, local, total)`` per group, so placing slices is a copy, and TP=2 gives the
same file as TP=1. Pipeline parallelism gives each stage its own layers; the union is taken.
The residual stream is replicated across TP ranks, so block figures come from the lowest rank;
so is an MoE layer's router (every rank computes the same logits for the same tokens).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from actprune.core.wire.schema import REPLICATED_KINDS, parse_key
from actprune.core.wire.stats import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUP_FIELDS,
    Stats,
    from_file_arrays,
    read_metadata,
)
from safetensors.numpy import load as st_load

__all__ = ["Shard", "assemble"]


class Shard:
    def __init__(self, data: bytes) -> None:
        self.tensors: dict[str, np.ndarray] = from_file_arrays(st_load(data))
        self.meta = read_metadata(data)  # raw strings, with what the writer added
        self.info: dict[str, int] = json.loads(self.meta["shard"])
        self.partitions: dict[str, list[int]] = json.loads(self.meta["partitions"])
        self.status: dict[str, Any] = json.loads(self.meta["status"])
        self.taken_at = float(self.meta.get("taken_at", 0.0))


def assemble(shards: list[bytes], meta: dict[str, Any]) -> Stats:
    """One stats file from every rank's shard; ``meta`` supplies the model-level metadata."""
    parsed = sorted((Shard(s) for s in shards), key=lambda s: (s.info["pp_rank"], s.info["tp_rank"]))
    if not parsed:
        raise ValueError("no shards to assemble")
    tensors: dict[str, np.ndarray] = {}
    for group in sorted({g for s in parsed for g in s.partitions}, key=_group_key):
        owners = [s for s in parsed if group in s.partitions]
        total = owners[0].partitions[group][2]
        counts = {float(s.tensors[f"{group}.count"]) for s in owners}
        if len(counts) != 1:
            # Ranks of one TP group run the same steps; different counts mean a torn snapshot.
            raise RuntimeError(f"actprune: ranks disagree on token count for {group}: {sorted(counts)}")
        for f in GROUP_FIELDS:
            name = f"{group}.{f}"
            if f == "count":
                tensors[name] = owners[0].tensors[name]
                continue
            out = np.zeros(total, dtype=owners[0].tensors[name].dtype)
            covered = 0
            for s in owners:
                offset, local, _ = s.partitions[group]
                out[offset : offset + local] = s.tensors[name]
                covered += local
            if covered != total:
                raise RuntimeError(f"actprune: shards cover {covered} of {total} channels of {group}")
            tensors[name] = out
    for s in parsed:
        for name, t in s.tensors.items():
            parsed_key = parse_key(name)
            if parsed_key is not None and parsed_key[1] in REPLICATED_KINDS and name not in tensors:
                tensors[name] = t
    lead = parsed[0].status
    full_meta = dict(meta)
    full_meta.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        near_zero_threshold=float(lead["near_zero_threshold"]),
        tokens_prefill=int(lead["tokens_prefill"]),
        tokens_decode=int(lead["tokens_decode"]),
        window_start=float(lead["window_start"]),
        paused=bool(lead["paused"]),
        # tokens of the steps a sampling capture skipped: only where some were (absent = 0)
        **({"tokens_unsampled": int(lead["tokens_unsampled"])} if lead.get("tokens_unsampled") else {}),
        taken_at=min(s.taken_at for s in parsed),
        tensor_parallel_size=max(s.info["tp_size"] for s in parsed),
        pipeline_parallel_size=max(s.info["pp_size"] for s in parsed),
    )
    stats = Stats(tensors=tensors, meta=full_meta)
    stats.validate(source="server snapshot")
    return stats


def _group_key(group: str) -> tuple[int, str]:
    _, i, kind = group.split(".")
    return int(i), kind
