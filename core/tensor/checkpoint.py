"""Reading safetensors checkpoints tensor by tensor (single-file or sharded), with torch for
the dtypes numpy lacks (bfloat16).

:class:`ShardIndex` says which shard holds which tensor and reads one tensor, or its raw bytes,
without loading the rest. :class:`ColumnNorms` gives the planner's weight-aware strategies the
L2 norm of every input column of ``down_proj`` / ``o_proj``, reading each tensor once and
keeping the (small) norms for later plans of the same checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from actprune.core.archs import ArchSpec, spec_for_config
from actprune.core.config import CheckpointError, read_config
from safetensors import safe_open

__all__ = [
    "INDEX_NAME",
    "ST_DTYPES",
    "TORCH_INT",
    "ColumnNorms",
    "ShardIndex",
    "dtype_of",
    "read_column_norms",
]

INDEX_NAME = "model.safetensors.index.json"
NP_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}  # bit-exact stand-ins for any float
TORCH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_FROM_ST = {v: k for k, v in ST_DTYPES.items()}


def dtype_of(st_dtype: str, name: str = "") -> torch.dtype:
    """The torch dtype of a safetensors dtype string; CheckpointError for quantised formats."""
    if st_dtype not in _FROM_ST:
        raise CheckpointError(
            f"tensor {name} has dtype {st_dtype}: only float32/float16/bfloat16/float64 "
            "checkpoints are supported (dequantise a quantised checkpoint first)"
        )
    return _FROM_ST[st_dtype]


class ShardIndex:
    """Which shard holds which tensor, for a single-file or sharded safetensors checkpoint."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors or {INDEX_NAME}; need a safetensors checkpoint")
        self.weight_map: dict[str, str] = weight_map
        self.shards: list[str] = sorted(set(weight_map.values()))
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def names_in(self, shard: str) -> list[str]:
        return sorted(n for n, s in self.weight_map.items() if s == shard)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: the checkpoint has no tensor {name}")
        with safe_open(self.dir / self.weight_map[name], framework="pt") as f:
            return f.get_tensor(name)

    def header(self, name: str) -> dict[str, Any]:
        """The safetensors header entry of ``name``: dtype, shape, data_offsets."""
        return self._header(self.weight_map[name])[1][name]

    def parameters(self) -> int:
        """Elements of every stored tensor, from the headers (nothing loaded): a tied
        embedding, stored once, counts once."""
        return sum(math.prod(self.header(n)["shape"]) for n in self.weight_map)

    def nbytes(self, name: str) -> int:
        start, end = self.header(name)["data_offsets"]
        return end - start

    def _header(self, shard: str) -> tuple[int, dict[str, Any]]:
        if shard not in self._headers:
            with open(self.dir / shard, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                self._headers[shard] = (8 + n, json.loads(f.read(n)))
        return self._headers[shard]

    def read_raw(self, name: str, buf: np.ndarray, itemsize: int) -> np.ndarray:
        """The tensor's bytes read (one pread, no mmap page faults) into ``buf``, returned as an
        integer-typed view of its shape; ``buf`` is reused across tensors to spare allocation."""
        shard = self.weight_map[name]
        base, header = self._header(shard)
        start, end = header[name]["data_offsets"]
        view = buf[: end - start]
        with open(self.dir / shard, "rb", buffering=0) as f:
            if os.preadv(f.fileno(), [memoryview(view)], base + start) != end - start:
                raise CheckpointError(f"{shard}: truncated tensor {name}")
        return view.view(NP_INT[itemsize]).reshape(header[name]["shape"])


def read_column_norms(index: ShardIndex, name: str) -> np.ndarray:
    """L2 norm of every input column of the nn.Linear weight ``name``: (out, in) -> (in,).
    Reads that one tensor only. CheckpointError for a quantised dtype (FP8, int): its norms
    without the scales stored beside it would be silently wrong."""
    if name in index.weight_map:
        dtype_of(index.header(name)["dtype"], name)
    w = index.read(name).float()  # (out, in)
    return torch.linalg.vector_norm(w, dim=0).double().numpy()


class ColumnNorms:
    """``norms(layer, kind)``: column norms of layer ``layer``'s ``down_proj`` (kind "mlp") or
    ``o_proj`` (kind "attn") weight, (in,) float64, read once per (layer, kind) and kept."""

    def __init__(self, model_dir: str | Path, spec: ArchSpec) -> None:
        self.model_dir = Path(model_dir)
        self.spec = spec
        self._index: ShardIndex | None = None  # opened at the first read: plans without
        self._cache: dict[tuple[int, str], np.ndarray] = {}  # weight-aware scores never read

    @classmethod
    def of(cls, model_dir: str | Path) -> ColumnNorms:
        """The column norms of a checkpoint directory (its spec from its config.json)."""
        return cls(model_dir, spec_for_config(read_config(model_dir)))

    def __call__(self, layer: int, kind: str) -> np.ndarray:
        if (layer, kind) not in self._cache:
            suffix = self.spec.down_weight if kind == "mlp" else self.spec.o_weight
            if self._index is None:
                self._index = ShardIndex(self.model_dir)
            self._cache[(layer, kind)] = read_column_norms(self._index, self.spec.layer_name(layer, suffix))
        return self._cache[(layer, kind)]
