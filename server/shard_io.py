"""One rank's shard of a stats file, written and read back in a vLLM worker (torch side).

A worker's :class:`~actprune.server.capture.Capture` holds ``groups`` (stats-file group name ->
state dict of accumulator views) and ``partitions`` (channel group name -> (offset, local,
total): where this rank's columns sit in the group's global width; routers and blocks are
replicated, so absent). ``write_shard`` turns them into safetensors bytes, which the API
process assembles across ranks (:mod:`actprune.server.snapshot`). ``read_slices`` and
``merge_saved`` do the reverse for a restart: a saved, assembled file is checked whole, then
this rank's slice of each group is folded into its accumulators.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from actprune.core.tensor.accumulate import export_state, merge_channels
from actprune.core.wire.schema import SCALAR_FIELDS
from actprune.core.wire.stats import from_file_arrays, read_metadata, to_file_arrays
from safetensors.numpy import load as st_load_np
from safetensors.numpy import save as st_save

__all__ = ["merge_saved", "read_slices", "write_shard"]

Groups = dict[str, dict[str, torch.Tensor]]
Partitions = dict[str, tuple[int, int, int]]


def write_shard(groups: Groups, partitions: Partitions, meta: dict[str, str]) -> bytes:
    """This rank's accumulators as safetensors bytes in the stats file's layout and dtypes, with
    the partition of each group beside ``meta``."""
    tensors: dict[str, np.ndarray] = {}
    for name, st in groups.items():
        for f, a in export_state(st).items():
            tensors[f"{name}.{f}"] = a
    return st_save(to_file_arrays(tensors), metadata={"partitions": json.dumps(partitions), **meta})


def read_slices(data: bytes, groups: Groups, partitions: Partitions) -> tuple[Groups, dict[str, str]]:
    """This rank's slice of every group of a saved (assembled, global) file, each checked
    against the shape this rank needs, and the file's metadata. Raises ValueError on a bad
    file before anything is changed."""
    saved = {k: torch.from_numpy(v) for k, v in from_file_arrays(st_load_np(data)).items()}
    parts: Groups = {}
    for name, st in groups.items():
        offset, local, total = partitions.get(name, (0, 0, 0))
        parts[name] = {}
        for f in st:
            t = saved.get(f"{name}.{f}")
            if t is None:
                raise ValueError(f"saved stats lack {name}.{f}")
            # the file's shapes: scalars; a channel group's global width; a router's E
            want = () if f in SCALAR_FIELDS else (total,) if name in partitions else tuple(st[f].shape)
            if tuple(t.shape) != want or not t.is_floating_point():
                raise ValueError(f"saved {name}.{f} has shape {tuple(t.shape)} and dtype {t.dtype}, "
                                 f"this rank needs shape {want} (floating point)")
            if f == "count" and not (torch.isfinite(t).all() and (t >= 0).all()):
                raise ValueError(f"saved {name}.count is {t.tolist()}, not a count")
            parts[name][f] = t[offset:offset + local] if name in partitions and want else t
    return parts, read_metadata(data)


def merge_saved(groups: Groups, partitions: Partitions, parts: Groups) -> None:
    """Fold the slices ``read_slices`` returned into the accumulators: channel groups by Chan's
    pairwise merge, routers and blocks (sums and counts) by adding."""
    for name, st in groups.items():
        other = {f: t.to(st[f].device).reshape(st[f].shape) for f, t in parts[name].items()}
        if name in partitions:
            merge_channels(st, other)
        else:
            for f in st:
                st[f].add_(other[f])
