"""Slicer: apply a :class:`Plan` to a safetensors checkpoint, one tensor at a time.

Memory: every output shard's header is computed from the input headers and the plan before any
data is read, then tensors are read (``safe_open``, memory-mapped), sliced and appended one by
one. Peak memory is about one input tensor plus its slice, whatever the model size.

Output (written to a hidden temporary directory beside ``out``, renamed at the very end, so a
killed run never leaves a directory that looks complete)::

    config.json                      stock family when widths are uniform and no bias is added;
                                     else the actprune architecture (auto_map + the two files below)
    configuration_actprune.py        only for the actprune architecture
    modeling_actprune.py             ditto
    model-0000k-of-0000n.safetensors one output shard per input shard that still holds tensors
    model.safetensors.index.json
    actprune_plan.json               the plan plus slice provenance (source, bias compensation)
    tokenizer*, generation_config.json, ... copied unchanged

Bias compensation (FLAP): with stats, the mean contribution of removed MLP neurons / attention
channels, ``W[:, removed] @ mean[removed]``, becomes a ``down_proj`` / ``o_proj`` bias. Stock
families have no such biases, so compensated checkpoints always use the actprune architecture.

Refit (``mlp_refit``, from :func:`actprune.pruning.calibrate.layerwise_refit`): per source layer,
a new ``down_proj`` weight for the kept columns, (H, K), and a bias (H,) replace the sliced
weight and become its ``down_proj`` bias (added to any bias it had); again the actprune
architecture.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from actprune.client.wire.plan import LayerPlan, Plan
from actprune.client.wire.stats import Stats, config_hash
from safetensors import safe_open
from tqdm.auto import tqdm

from .adapters import ACTPRUNE_ARCHITECTURE, Adapter, Role, adapter_for
from .files import staged_directory

__all__ = [
    "INDEX_NAME",
    "PLAN_RECORD",
    "SliceError",
    "ShardIndex",
    "output_config",
    "read_column_norms",
    "slice_checkpoint",
    "slice_array",
    "slice_tensor",
]

INDEX_NAME = "model.safetensors.index.json"
PLAN_RECORD = "actprune_plan.json"
MODELING_DIR = Path(__file__).parent / "modeling"
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}  # bit-exact stand-ins for any float
_TORCH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_NOT_COPIED = {"config.json", INDEX_NAME, PLAN_RECORD}
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")


class SliceError(ValueError):
    """A checkpoint, plan or output path the slicer cannot use."""


# ---- reading checkpoints ------------------------------------------------------------------
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
            raise SliceError(f"{self.dir}: no model.safetensors or {INDEX_NAME}; need a safetensors checkpoint")
        self.weight_map: dict[str, str] = weight_map
        self.shards: list[str] = sorted(set(weight_map.values()))
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def names_in(self, shard: str) -> list[str]:
        return sorted(n for n, s in self.weight_map.items() if s == shard)

    def read(self, name: str) -> torch.Tensor:
        with safe_open(self.dir / self.weight_map[name], framework="pt") as f:
            return f.get_tensor(name)

    def read_raw(self, name: str, buf: np.ndarray, itemsize: int) -> np.ndarray:
        """The tensor's bytes read (one pread, no mmap page faults) into ``buf``, returned as an
        integer-typed view of its shape; ``buf`` is reused across tensors to spare allocation."""
        shard = self.weight_map[name]
        if shard not in self._headers:
            with open(self.dir / shard, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                self._headers[shard] = (8 + n, json.loads(f.read(n)))
        base, header = self._headers[shard]
        start, end = header[name]["data_offsets"]
        view = buf[: end - start]
        with open(self.dir / shard, "rb", buffering=0) as f:
            if os.preadv(f.fileno(), [memoryview(view)], base + start) != end - start:
                raise SliceError(f"{shard}: truncated tensor {name}")
        return view.view(_INT[itemsize]).reshape(header[name]["shape"])


def read_column_norms(model_dir: str | Path, name: str) -> np.ndarray:
    """L2 norm of every input column of the nn.Linear weight ``name``: (out, in) -> (in,).
    Reads that one tensor only."""
    w = ShardIndex(model_dir).read(name).float()  # (out, in)
    return torch.linalg.vector_norm(w, dim=0).double().numpy()


# ---- pure slicing -------------------------------------------------------------------------
def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    idx = torch.tensor(heads, dtype=torch.long)  # (n,)
    return (idx[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)  # (n, D) -> (n*D,)


def _index(role: Role, lp: LayerPlan, head_dim: int) -> tuple[int, np.ndarray] | None:
    """(dim, kept indices along it) for a role; None for tensors copied whole."""
    if role in (Role.NEURON_ROWS, Role.NEURON_COLS):
        return (0 if role is Role.NEURON_ROWS else 1), np.asarray(lp.mlp_keep, dtype=np.int64)
    if role in (Role.Q_ROWS, Role.Q_COLS):
        return (0 if role is Role.Q_ROWS else 1), _head_rows(lp.heads_keep, head_dim).numpy()
    if role is Role.KV_ROWS:
        return 0, _head_rows(lp.kv_heads_keep, head_dim).numpy()
    return None


def slice_array(a: np.ndarray, role: Role, lp: LayerPlan, head_dim: int, out: np.ndarray | None = None) -> np.ndarray:
    """The part of ``a`` that ``lp`` keeps; ``out`` (flat, large enough) receives it if given.
    Works on integer views of the raw bytes, so it is bit-exact for every float dtype, and
    numpy's gather along columns is ~4x faster than torch's for bf16 on CPU."""
    spec = _index(role, lp, head_dim)
    if spec is None:
        return a
    dim, idx = spec
    shape = list(a.shape)
    shape[dim] = len(idx)
    target = None if out is None else out.view(a.dtype)[: int(np.prod(shape))].reshape(shape)
    return np.take(a, idx, axis=dim, out=target)


def slice_tensor(t: torch.Tensor, role: Role, lp: LayerPlan, head_dim: int) -> torch.Tensor:
    """The part of ``t`` that layer plan ``lp`` keeps (weights (out, in), biases (out,))."""
    a = t.contiguous().view(_TORCH_INT[t.element_size()]).numpy()
    return torch.from_numpy(slice_array(a, role, lp, head_dim).copy()).view(t.dtype)


def _removed(kept: list[int], n: int) -> list[int]:
    keep = set(kept)
    return [j for j in range(n) if j not in keep]


def compensation_bias(w: torch.Tensor, removed: list[int], mean: np.ndarray) -> torch.Tensor:
    """FLAP: the expected output of removed input channels. w: (out, in), mean: (in,) -> (out,)."""
    if not removed:
        return torch.zeros(w.shape[0], dtype=torch.float32)
    idx = torch.tensor(removed, dtype=torch.long)
    m = torch.from_numpy(np.asarray(mean, dtype=np.float64)[removed]).double()  # (R,)
    return (w.index_select(1, idx).double() @ m).float()  # (out, R) @ (R,) -> (out,)


# ---- output config ------------------------------------------------------------------------
def output_config(config: dict[str, Any], adapter: Adapter, plan: Plan, bias: dict[str, bool]) -> dict[str, Any]:
    """config.json of the sliced model (stock family if possible, else the actprune one)."""
    out = {k: v for k, v in config.items() if not k.startswith("actprune_") and k != "auto_map"}
    kept = [lp.index for lp in plan.layers if not lp.drop]
    widths = [w.model_dump() for w in plan.widths]
    out["num_hidden_layers"] = len(kept)
    out["head_dim"] = plan.source.head_dim  # stock configs would re-derive it from the head count
    if isinstance(config.get("layer_types"), list):
        out["layer_types"] = [config["layer_types"][i] for i in kept]
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        out[key] = max(w[key] for w in widths)
    # transformers' LlamaConfig refuses a hidden_size that is not a multiple of the head count;
    # the actprune config sets head counts after validation, so such checkpoints still load.
    heads_divide = out["hidden_size"] % out["num_attention_heads"] == 0
    if plan.uniform and not any(bias.values()) and heads_divide:
        out["architectures"] = [adapter.architecture]
        out["model_type"] = adapter.model_type
        return out
    out.update(
        architectures=[ACTPRUNE_ARCHITECTURE],
        model_type="actprune",
        actprune_base_model_type=adapter.model_type,
        actprune_base_architecture=adapter.architecture,
        actprune_layer_widths=widths,
        actprune_bias=bias,
        auto_map={
            "AutoConfig": "configuration_actprune.ActpruneConfig",
            "AutoModelForCausalLM": "modeling_actprune.ActpruneForCausalLM",
        },
    )
    return out


# ---- writing ------------------------------------------------------------------------------
@dataclass
class _Entry:
    name: str  # output name
    source: str | None  # input name (None: a new compensation bias)
    layer: int | None  # source layer
    role: Role
    dtype: torch.dtype
    shape: list[int]


def _nbytes(e: _Entry) -> int:
    return int(np.prod(e.shape, dtype=np.int64)) * torch.empty((), dtype=e.dtype).element_size()


def _write_shard(path: Path, entries: list[_Entry], produce, bar: tqdm) -> None:
    """Write a safetensors file whose header is known up front; tensors arrive one at a time as
    arrays of raw bytes. ``produce(entry, slot)`` fills output buffer ``slot`` (0 or 1): one writer
    thread writes tensor k from one slot while tensor k+1 is sliced into the other."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _ST_DTYPES[e.dtype], "shape": e.shape, "data_offsets": [offset, offset + _nbytes(e)]}
        offset += _nbytes(e)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format wants the data 8-byte aligned
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1) as pool:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        pending = None
        for k, e in enumerate(entries):
            a = np.ascontiguousarray(produce(e, k % 2))
            if list(a.shape) != e.shape or a.nbytes != _nbytes(e):
                raise RuntimeError(f"{e.name}: produced shape {list(a.shape)}, header says {e.shape}")
            if pending is not None:
                pending.result()
            pending = pool.submit(_write_array, f, a, bar)
        if pending is not None:
            pending.result()


def _write_array(f, a: np.ndarray, bar: tqdm) -> None:
    f.write(a.data)  # the array's own bytes, no copy
    bar.update(a.nbytes)


def slice_checkpoint(
    model_dir: str | Path, plan: Plan, out: str | Path, *, stats: Stats | None = None,
    overwrite: bool = False, progress: bool = True,
    mlp_refit: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Path:
    """Write the checkpoint ``plan`` describes to ``out``; returns ``out``. With ``stats``,
    fold the removed units' mean contribution into output biases (FLAP). With ``mlp_refit``
    (source layer -> (down_proj weight (H, K), bias (H,))), write those instead (refit)."""
    model_dir, out = Path(model_dir).resolve(), Path(out).resolve()
    config = _read_config(model_dir)
    _check_paths(model_dir, out, overwrite)
    try:
        adapter = adapter_for(config)
    except ValueError as e:
        raise SliceError(f"{model_dir}: {e}") from e
    plan.validate_for(config, config_hash(config))
    if stats is not None and stats.meta.get("config_hash") != plan.source.config_hash:
        raise SliceError("stats for bias compensation were recorded on a different model than the plan's")
    refit = _check_refit(plan, mlp_refit, stats)
    index = ShardIndex(model_dir)
    shard_entries = _plan_entries(index, adapter, plan, config, compensate=stats is not None, refit=refit)
    old_bias = config.get("actprune_bias") or {}
    bias = {k: bool(stats is not None or old_bias.get(k)) for k in ("down_proj", "o_proj")}
    bias["down_proj"] = bias["down_proj"] or bool(refit)
    with staged_directory(out) as tmp:
        _write_all(index, adapter, plan, stats, shard_entries, tmp, progress, refit)
        new_config = output_config(config, adapter, plan, bias)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        if new_config["architectures"] == [ACTPRUNE_ARCHITECTURE]:
            for f in ("configuration_actprune.py", "modeling_actprune.py"):
                shutil.copy2(MODELING_DIR / f, tmp / f)
        _copy_side_files(model_dir, tmp)
        record = json.loads(plan.to_json())
        record["slice"] = {
            "source": str(model_dir), "bias_compensation": stats is not None,
            "mlp_refit_layers": sorted(refit),
            "bias_stats_tokens": stats.tokens if stats is not None else None,
            "output_config_hash": config_hash(new_config),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / PLAN_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return out


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise SliceError(f"{model_dir}: no config.json; pass a Hugging Face checkpoint directory")
    return json.loads(path.read_text())


def _check_paths(model_dir: Path, out: Path, overwrite: bool) -> None:
    if out == model_dir or out in model_dir.parents:
        raise SliceError(f"output {out} would overwrite the input checkpoint {model_dir}; choose another -o")
    if model_dir in out.parents:
        raise SliceError(f"output {out} is inside the input checkpoint {model_dir}; choose another -o")
    if out.exists() and not overwrite:
        raise SliceError(f"output {out} exists; remove it or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)


def _check_refit(plan: Plan, refit, stats) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    refit = dict(refit or {})
    if refit and stats is not None:
        raise SliceError("give bias-compensation stats or an MLP refit, not both (the refit fits the bias too)")
    for i, (w, b) in refit.items():
        lp = plan.layers[i] if 0 <= i < len(plan.layers) else None
        if lp is None or lp.drop or w.ndim != 2 or w.shape[1] != len(lp.mlp_keep) or b.shape != (w.shape[0],):
            raise SliceError(f"MLP refit of layer {i} does not fit the plan (weight {tuple(w.shape)}, bias {tuple(b.shape)})")
    return refit


def _plan_entries(index: ShardIndex, adapter: Adapter, plan: Plan, config: dict, compensate: bool,
                  refit: dict | None = None):
    """Output entries per input shard, with shapes from headers alone (no tensor data read)."""
    new_index = {lp.index: k for k, lp in enumerate(lp for lp in plan.layers if not lp.drop)}
    shards: list[list[_Entry]] = []
    for shard in index.shards:
        entries = []
        with safe_open(index.dir / shard, framework="pt") as f:
            for name in index.names_in(shard):
                try:
                    ref = adapter.classify(name)
                except ValueError as e:
                    raise SliceError(str(e)) from e
                if ref.layer is not None and plan.layers[ref.layer].drop:
                    continue
                sl = f.get_slice(name)
                dtype = getattr(torch, _torch_dtype_name(sl.get_dtype()))
                shape = list(sl.get_shape())
                out_name = name if ref.layer is None else adapter.layer_name(new_index[ref.layer], ref.suffix)
                if ref.layer is not None:
                    shape = _sliced_shape(shape, ref.role, plan.layers[ref.layer], plan.source.head_dim)
                    if compensate and ref.suffix in (adapter.down_bias, adapter.o_bias):
                        continue  # re-emitted below, old bias plus new compensation
                    if ref.layer in (refit or {}) and ref.suffix == adapter.down_bias:
                        continue  # re-emitted below, old bias plus the refit's
                entries.append(_Entry(out_name, name, ref.layer, ref.role, dtype, shape))
                if ref.layer in (refit or {}) and ref.suffix == adapter.down_proj:
                    entries.append(_Entry(adapter.layer_name(new_index[ref.layer], adapter.down_bias), None,
                                          ref.layer, Role.COPY, dtype, [shape[0]]))
                if compensate and ref.layer is not None and ref.suffix in (adapter.down_proj, adapter.o_proj):
                    bias_suffix = adapter.down_bias if ref.suffix == adapter.down_proj else adapter.o_bias
                    entries.append(_Entry(adapter.layer_name(new_index[ref.layer], bias_suffix), None,
                                          ref.layer, Role.COPY, dtype, [shape[0]]))
        if entries:
            shards.append(entries)
    return shards


def _sliced_shape(shape: list[int], role: Role, lp: LayerPlan, d: int) -> list[int]:
    n = {Role.NEURON_ROWS: len(lp.mlp_keep), Role.NEURON_COLS: len(lp.mlp_keep),
         Role.Q_ROWS: len(lp.heads_keep) * d, Role.Q_COLS: len(lp.heads_keep) * d,
         Role.KV_ROWS: len(lp.kv_heads_keep) * d}.get(role)
    if n is None:
        return shape
    dim = 1 if role in (Role.NEURON_COLS, Role.Q_COLS) else 0
    return [*shape[:dim], n, *shape[dim + 1:]]


def _torch_dtype_name(st: str) -> str:
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    if st not in names:
        raise SliceError(f"unsupported tensor dtype {st} (quantised checkpoints cannot be sliced)")
    return names[st]


def _write_all(index, adapter, plan, stats, shard_entries, tmp: Path, progress: bool, refit=None) -> None:
    d = plan.source.head_dim
    n = len(shard_entries)
    files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    total = sum(_nbytes(e) for es in shard_entries for e in es)
    weight_map: dict[str, str] = {}

    # Reused buffers: one input, two outputs (see _write_shard). Peak ~3 of the largest tensor.
    largest_in = max(_input_nbytes(index, e.source) for es in shard_entries for e in es if e.source)
    largest_out = max(_nbytes(e) for es in shard_entries for e in es)
    inbuf = np.empty(largest_in, dtype=np.uint8)
    outbufs = [np.empty(largest_out, dtype=np.uint8) for _ in range(2)]

    def produce(e: _Entry, slot: int) -> np.ndarray:
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        if refit and e.layer in refit and (e.source is None or e.source.endswith(adapter.down_proj)):
            t = _refit_tensor(index, adapter, refit[e.layer], e).to(e.dtype).contiguous()
            return t.view(_TORCH_INT[itemsize]).numpy()
        if e.source is None:
            t = _bias(index, adapter, plan, stats, e).to(e.dtype)
            return t.view(_TORCH_INT[itemsize]).numpy()
        if e.layer is None or e.role is Role.COPY:
            return index.read_raw(e.source, outbufs[slot], itemsize)
        a = index.read_raw(e.source, inbuf, itemsize)
        return slice_array(a, e.role, plan.layers[e.layer], d, outbufs[slot])

    with tqdm(total=total, unit="B", unit_scale=True, desc="slicing", disable=not progress) as bar:
        for entries, fname in zip(shard_entries, files, strict=True):
            _write_shard(tmp / fname, entries, produce, bar)
            weight_map.update({e.name: fname for e in entries})
    meta = {"total_size": total}
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n")


def _input_nbytes(index: ShardIndex, name: str) -> int:
    with safe_open(index.dir / index.weight_map[name], framework="pt") as f:
        sl = f.get_slice(name)
        size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}[sl.get_dtype()]
        return int(np.prod(sl.get_shape(), dtype=np.int64)) * size


def _refit_tensor(index: ShardIndex, adapter: Adapter, refit: tuple[torch.Tensor, torch.Tensor], e: _Entry) -> torch.Tensor:
    """The refitted down_proj weight, or its bias plus the bias the layer had."""
    w, b = refit
    if e.source is not None:
        return w.float()
    old = adapter.layer_name(e.layer, adapter.down_bias)
    return b.float() + (index.read(old).float() if old in index.weight_map else 0.0)


def _bias(index: ShardIndex, adapter: Adapter, plan: Plan, stats: Stats, e: _Entry) -> torch.Tensor:
    lp = plan.layers[e.layer]
    mlp = e.name.endswith(adapter.down_bias)
    weight = adapter.layer_name(e.layer, adapter.down_proj if mlp else adapter.o_proj)
    w = index.read(weight)  # (hidden, in) before slicing
    if mlp:
        removed = _removed(lp.mlp_keep, w.shape[1])
    else:
        removed = _head_rows(_removed(lp.heads_keep, w.shape[1] // plan.source.head_dim), plan.source.head_dim).tolist()
    mean = stats.tensors[f"layers.{e.layer}.{'mlp' if mlp else 'attn'}.mean"]
    b = compensation_bias(w, removed, mean)
    old = adapter.layer_name(e.layer, adapter.down_bias if mlp else adapter.o_bias)
    if old in index.weight_map:
        b = b + index.read(old).float()
    return b


def _copy_side_files(model_dir: Path, tmp: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file except weights
    (pickled formats are never copied), config and our own records."""
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and p.name not in _NOT_COPIED and not p.name.endswith(_NOT_COPIED_SUFFIXES) \
                and not (tmp / p.name).exists():
            shutil.copy2(p, tmp / p.name)
