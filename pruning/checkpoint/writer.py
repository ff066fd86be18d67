"""Streaming safetensors writer: a file whose header is known before any tensor is read.

The slicer computes every output tensor's name, dtype and shape from the input headers and the
plan (:class:`Entry`), writes the header, then appends tensors one at a time as they are
produced. One writer thread writes tensor k while tensor k+1 is being produced into the other of
two reused output buffers, so peak memory is a few tensors whatever the model size.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from actprune.core.archs import Role
from actprune.core.tensor.checkpoint import ST_DTYPES
from tqdm.auto import tqdm

__all__ = ["Entry", "write_shard"]


@dataclass
class Entry:
    """One output tensor: where it comes from and what it will be."""

    name: str  # output name
    source: str | None  # input name (None: a tensor actprune computes, e.g. a compensation bias)
    layer: int | None  # source layer (None: a global tensor)
    role: Role
    dtype: torch.dtype
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()


def write_shard(path: Path, entries: list[Entry], produce: Callable[[Entry, int], np.ndarray], bar: tqdm) -> None:
    """Write ``entries`` to the safetensors file ``path``. ``produce(entry, slot)`` returns the
    tensor's raw bytes as an array, filling output buffer ``slot`` (0 or 1) if it needs one."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": ST_DTYPES[e.dtype], "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format wants the data 8-byte aligned
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as pool:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        pending = None
        for k, e in enumerate(entries):
            a = np.ascontiguousarray(produce(e, k % 2))
            if list(a.shape) != e.shape or a.nbytes != e.nbytes:
                raise RuntimeError(f"{e.name}: produced shape {list(a.shape)}, header says {e.shape}")
            if pending is not None:
                pending.result()
            pending = pool.submit(_write_array, f, a, bar)
        if pending is not None:
            pending.result()


def _write_array(f: BinaryIO, a: np.ndarray, bar: tqdm) -> None:
    f.write(a.data)  # the array's own bytes, no copy
    bar.update(a.nbytes)
