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

Refit (``mlp_refit`` / ``attn_refit``, from :func:`actprune.pruning.compensate.calibrate.layerwise_refit`):
per source layer, a new ``down_proj`` weight for the kept columns, (H, K), or ``o_proj`` weight
for the kept heads' channels, (H, h·D), and a bias (H,) replace the sliced weight and become its
bias (added to any bias it had); again the actprune architecture. Whenever the config declares
an output bias, every kept layer gets one, zeros where nothing is added: transformers would
otherwise report the missing ones as "newly initialized".

Mixture-of-experts (Qwen3-MoE): the tensors of removed experts (``mlp.experts.{e}.*``) are not
written, kept experts are renumbered 0..E'-1 in source order, and the router's (E, hidden)
weight keeps the rows of kept experts, (E', hidden). Every sparse layer keeping the same E' gives
the stock config with ``num_experts`` = E'; per-layer counts the actprune architecture
(:mod:`.moe_config`).
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from actprune.core.archs import (
    ACTPRUNE_ARCHITECTURE,
    ArchSpec,
    Role,
    TensorRef,
    spec_for_config,
)
from actprune.core.config import read_config
from actprune.core.errors import ActpruneError
from actprune.core.files import staged_directory
from actprune.core.tensor.checkpoint import INDEX_NAME, TORCH_INT, ShardIndex, dtype_of
from actprune.core.tensor.modeling import MODELING_FILES, modeling_dir
from actprune.core.wire.plan import LayerPlan, LayerWidths, Plan
from actprune.core.wire.schema import key
from actprune.core.wire.stats import Stats, config_hash
from actprune.pruning.compensate.maths import flap_bias
from safetensors import safe_open
from tqdm.auto import tqdm

from .moe_config import as_actprune, moe_output_config
from .trust import copy_side_file
from .writer import Entry, write_shard

__all__ = ["PLAN_RECORD", "SliceError", "output_config", "slice_array", "slice_checkpoint", "slice_tensor"]

PLAN_RECORD = "actprune_plan.json"
_NOT_COPIED = {"config.json", INDEX_NAME, PLAN_RECORD}
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".py")


class SliceError(ActpruneError):
    """A checkpoint, plan or output path the slicer cannot use."""


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
    if role is Role.EXPERT_ROWS:
        return 0, np.asarray(lp.experts_keep, dtype=np.int64)
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
    a = t.contiguous().view(TORCH_INT[t.element_size()]).numpy()
    return torch.from_numpy(slice_array(a, role, lp, head_dim).copy()).view(t.dtype)


# ---- output config ------------------------------------------------------------------------
def output_config(config: dict[str, Any], spec: ArchSpec, plan: Plan, bias: dict[str, bool]) -> dict[str, Any]:
    """config.json of the sliced model (stock family if possible, else the actprune one)."""
    out = {k: v for k, v in config.items() if not k.startswith("actprune_") and k != "auto_map"}
    if spec.moe is not None:
        return moe_output_config(out, spec, plan, bias, SliceError)
    kept = [lp.index for lp in plan.layers if not lp.drop]
    widths = [w.model_dump(exclude={"num_experts"}) for w in plan.widths]
    out["num_hidden_layers"] = len(kept)
    out["head_dim"] = plan.source.head_dim  # stock configs would re-derive it from the head count
    if isinstance(config.get("layer_types"), list):
        out["layer_types"] = [config["layer_types"][i] for i in kept]
    for field in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        out[field] = max(w[field] for w in widths)
    # transformers' LlamaConfig refuses a hidden_size that is not a multiple of the head count;
    # the actprune config sets head counts after validation, so such checkpoints still load.
    heads_divide = out["hidden_size"] % out["num_attention_heads"] == 0
    if plan.uniform and not any(bias.values()) and heads_divide:
        out["architectures"] = [spec.architecture]
        out["model_type"] = spec.model_type
        return out
    return as_actprune(out, spec, widths, bias)


# ---- slicing a checkpoint --------------------------------------------------------------
def slice_checkpoint(
    model_dir: str | Path, plan: Plan, out: str | Path, *, stats: Stats | None = None,
    overwrite: bool = False, progress: bool = True,
    mlp_refit: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    attn_refit: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    slice_record: dict[str, Any] | None = None,
    mlp_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Path:
    """Write the checkpoint ``plan`` describes to ``out``; returns ``out``. With ``stats``,
    fold the removed units' mean contribution into output biases (FLAP). With ``mlp_refit``
    (source layer -> (down_proj weight (H, K), bias (H,))) and ``attn_refit`` (source layer ->
    (o_proj weight (H, h·D), bias (H,))), write those instead (refit). When an output bias is
    written for some layers, every kept layer gets one (zeros where there is nothing to add),
    so that transformers finds every weight its model declares. ``mlp_rows`` (source layer ->
    (gate_proj weight (K, H), up_proj weight (K, H)), for layers of ``mlp_refit``: a local
    reconstruction, :mod:`actprune.pruning.compensate.reconstruct`) replaces the sliced rows.
    ``slice_record``: more keys for the ``slice`` record of ``actprune_plan.json`` (e.g. what made
    the refit, to resume by)."""
    model_dir, out = Path(model_dir).resolve(), Path(out).resolve()
    config = read_config(model_dir)
    _check_paths(model_dir, out, overwrite)
    try:
        spec = spec_for_config(config)
    except ValueError as e:
        raise SliceError(f"{model_dir}: {e}") from e
    plan.validate_for(config, config_hash(config))
    if spec.moe is not None and (stats is not None or mlp_refit):
        raise SliceError("bias compensation and refit are not supported for mixture-of-experts models yet")
    if stats is not None and stats.meta.get("config_hash") != plan.source.config_hash:
        raise SliceError("stats for bias compensation were recorded on a different model than the plan's")
    refit = _check_refit(plan, mlp_refit, stats)
    attn = _check_refit(plan, attn_refit, stats, attention=True)
    rows = _check_rows(plan, mlp_rows, refit)
    index = ShardIndex(model_dir)
    old_bias = config.get("actprune_bias") or {}
    bias = {k: bool(stats is not None or old_bias.get(k)) for k in ("down_proj", "o_proj")}
    bias["down_proj"] = bias["down_proj"] or bool(refit)
    bias["o_proj"] = bias["o_proj"] or bool(attn)
    shard_entries = _plan_entries(index, spec, plan, bias)
    with staged_directory(out) as tmp:
        _write_all(index, spec, plan, stats, shard_entries, tmp, progress, refit, attn, rows)
        new_config = output_config(config, spec, plan, bias)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        if new_config["architectures"] == [ACTPRUNE_ARCHITECTURE]:
            for f in MODELING_FILES:
                shutil.copy2(modeling_dir() / f, tmp / f)
        _copy_side_files(model_dir, tmp)
        record = json.loads(plan.to_json())
        record["slice"] = {
            "source": str(model_dir), "bias_compensation": stats is not None,
            "mlp_refit_layers": sorted(refit), "attn_refit_layers": sorted(attn),
            **({"mlp_reconstructed_layers": sorted(rows)} if rows else {}),
            "bias_stats_tokens": stats.tokens if stats is not None else None,
            "output_config_hash": config_hash(new_config),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(slice_record or {}),
        }
        (tmp / PLAN_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return out


def _check_paths(model_dir: Path, out: Path, overwrite: bool) -> None:
    if out == model_dir or out in model_dir.parents:
        raise SliceError(f"output {out} would overwrite the input checkpoint {model_dir}; choose another -o")
    if model_dir in out.parents:
        raise SliceError(f"output {out} is inside the input checkpoint {model_dir}; choose another -o")
    if out.exists() and not overwrite:
        raise SliceError(f"output {out} exists; remove it or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)


def _check_refit(plan: Plan, refit, stats, attention: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    refit = dict(refit or {})
    what = "attention" if attention else "MLP"
    if refit and stats is not None:
        raise SliceError(f"give bias-compensation stats or an {what} refit, not both (the refit fits the bias too)")
    for i, (w, b) in refit.items():
        lp = plan.layers[i] if 0 <= i < len(plan.layers) else None
        width = None if lp is None else (len(lp.heads_keep) * plan.source.head_dim if attention else len(lp.mlp_keep))
        if lp is None or lp.drop or w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            raise SliceError(f"{what} refit of layer {i} does not fit the plan (weight {tuple(w.shape)}, bias {tuple(b.shape)})")
    return refit


def _check_rows(plan: Plan, rows, refit: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    rows = dict(rows or {})
    for i, (gate, up) in rows.items():
        if i not in refit:
            raise SliceError(f"MLP rows of layer {i} come without its down_proj refit (a reconstruction trains both)")
        want = (len(plan.layers[i].mlp_keep), refit[i][0].shape[0])  # (K, H)
        if tuple(gate.shape) != want or tuple(up.shape) != want:
            raise SliceError(f"MLP rows of layer {i} do not fit the plan (gate {tuple(gate.shape)}, "
                             f"up {tuple(up.shape)}, want {want})")
    return rows


def _plan_entries(index: ShardIndex, spec: ArchSpec, plan: Plan, bias: dict[str, bool]):
    """Output entries per input shard, with shapes from headers alone (no tensor data read).
    Where ``bias[kind]`` is set, every kept layer's output bias of that kind is computed
    (source None, emitted after its weight): the old bias, if any, plus the compensation."""
    new_index = {lp.index: k for k, lp in enumerate(lp for lp in plan.layers if not lp.drop)}
    computed = {w: b for w, b, on in ((spec.down_weight, spec.down_bias, bias.get("down_proj")),
                                      (spec.o_weight, spec.o_bias, bias.get("o_proj"))) if on}
    shards: list[list[Entry]] = []
    experts_written: set[str] = set()  # output names of kept experts' tensors
    for shard in index.shards:
        entries = []
        with safe_open(index.dir / shard, framework="pt") as f:
            for name in index.names_in(shard):
                try:
                    ref = spec.classify(name)
                except ValueError as e:
                    raise SliceError(str(e)) from e
                if ref.layer is not None and plan.layers[ref.layer].drop:
                    continue
                sl = f.get_slice(name)
                dtype = dtype_of(sl.get_dtype(), name)
                shape = list(sl.get_shape())
                out_name = name if ref.layer is None else spec.layer_name(new_index[ref.layer], ref.suffix)
                if ref.expert is not None:
                    suffix = _expert_suffix(spec, ref, plan.layers[ref.layer], plan.source.widths[ref.layer], name)
                    if suffix is None:
                        continue  # a removed expert
                    out_name = spec.layer_name(new_index[ref.layer], suffix)
                    experts_written.add(out_name)
                if ref.layer is not None:
                    _check_source_shape(name, shape, ref.role, plan.source.widths[ref.layer], plan.source.head_dim)
                    shape = _sliced_shape(shape, ref.role, plan.layers[ref.layer], plan.source.head_dim)
                    if ref.suffix in computed.values():
                        continue  # re-emitted after its weight: old bias plus the compensation
                entries.append(Entry(out_name, name, ref.layer, ref.role, dtype, shape))
                if ref.layer is not None and ref.suffix in computed:
                    entries.append(Entry(spec.layer_name(new_index[ref.layer], computed[ref.suffix]), None,
                                         ref.layer, Role.COPY, dtype, [shape[0]]))
        if entries:
            shards.append(entries)
    _check_experts_complete(spec, plan, new_index, experts_written)
    return shards


def _check_experts_complete(spec: ArchSpec, plan: Plan, new_index: dict[int, int], written: set[str]) -> None:
    """Every kept expert must have all its projections in the checkpoint: a checkpoint missing
    one would otherwise give a model with fewer experts than its config says."""
    if spec.moe is None:
        return
    for lp in plan.layers:
        if lp.drop or lp.experts_keep is None:
            continue
        for e in range(len(lp.experts_keep)):
            for proj in spec.moe.expert_roles():
                name = spec.layer_name(new_index[lp.index], spec.moe.expert_suffix(e, proj))
                if name not in written:
                    source = spec.layer_name(lp.index, spec.moe.expert_suffix(lp.experts_keep[e], proj))
                    raise SliceError(f"{source} is not in the checkpoint; config.json does not describe these weights")


def _expert_suffix(spec: ArchSpec, ref: TensorRef, lp: LayerPlan, w: LayerWidths, name: str) -> str | None:
    """The renumbered suffix of a kept expert's tensor (kept experts become 0..E'-1 in source
    order), None for a removed expert."""
    if w.num_experts is None or ref.expert >= w.num_experts:
        raise SliceError(f"{name}: expert {ref.expert} of a layer the plan gives "
                         f"{w.num_experts or 'no'} experts; config.json does not describe these weights")
    if ref.expert not in lp.experts_keep:
        return None
    return spec.moe.expert_suffix(lp.experts_keep.index(ref.expert), spec.moe.split_expert(ref.suffix)[1])


def _check_source_shape(name: str, shape: list[int], role: Role, w: LayerWidths, d: int) -> None:
    """A sliced tensor must have the width the plan counts in: a config.json that misstates
    the weights would otherwise cut the wrong rows without a word."""
    full = {Role.NEURON_ROWS: w.intermediate_size, Role.NEURON_COLS: w.intermediate_size,
            Role.Q_ROWS: w.num_attention_heads * d, Role.Q_COLS: w.num_attention_heads * d,
            Role.KV_ROWS: w.num_key_value_heads * d, Role.EXPERT_ROWS: w.num_experts}.get(role)
    if role is Role.EXPERT_ROWS and full is None:
        raise SliceError(f"{name}: a router on a layer config.json describes as dense")
    dim = 1 if role in (Role.NEURON_COLS, Role.Q_COLS) else 0
    if full is not None and (len(shape) <= dim or shape[dim] != full):
        raise SliceError(f"{name} has shape {shape}, the plan expects {full} along dim {dim}; "
                         "config.json does not describe these weights")


def _sliced_shape(shape: list[int], role: Role, lp: LayerPlan, d: int) -> list[int]:
    n = {Role.NEURON_ROWS: len(lp.mlp_keep), Role.NEURON_COLS: len(lp.mlp_keep),
         Role.Q_ROWS: len(lp.heads_keep) * d, Role.Q_COLS: len(lp.heads_keep) * d,
         Role.KV_ROWS: len(lp.kv_heads_keep) * d,
         Role.EXPERT_ROWS: len(lp.experts_keep or [])}.get(role)
    if n is None:
        return shape
    dim = 1 if role in (Role.NEURON_COLS, Role.Q_COLS) else 0
    return [*shape[:dim], n, *shape[dim + 1:]]


def _write_all(index, spec, plan, stats, shard_entries, tmp: Path, progress: bool, refit=None, attn=None,
               rows=None) -> None:
    d = plan.source.head_dim
    n = len(shard_entries)
    files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    total = sum(e.nbytes for es in shard_entries for e in es)
    weight_map: dict[str, str] = {}

    # Reused buffers: one input, two outputs (see writer.write_shard). Peak ~3 of the largest tensor.
    largest_in = max(index.nbytes(e.source) for es in shard_entries for e in es if e.source)
    largest_out = max(e.nbytes for es in shard_entries for e in es)
    inbuf = np.empty(largest_in, dtype=np.uint8)
    refitted = {(spec.layer_name(i, spec.down_weight), i): w for i, (w, _) in (refit or {}).items()}
    refitted |= {(spec.layer_name(i, spec.o_weight), i): w for i, (w, _) in (attn or {}).items()}
    for i, (gate, up) in (rows or {}).items():
        refitted |= {(spec.layer_name(i, f"{spec.hf.gate_proj}.weight"), i): gate,
                     (spec.layer_name(i, f"{spec.hf.up_proj}.weight"), i): up}
    outbufs = [np.empty(largest_out, dtype=np.uint8) for _ in range(2)]

    def produce(e: Entry, slot: int) -> np.ndarray:
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        if e.source is not None and e.layer is not None and (e.source, e.layer) in refitted:
            t = refitted[(e.source, e.layer)].to(e.dtype).contiguous()
            return t.view(TORCH_INT[itemsize]).numpy()
        if e.source is None:
            t = _bias(index, spec, plan, stats, e, refit or {}, attn or {}).to(e.dtype).contiguous()
            return t.view(TORCH_INT[itemsize]).numpy()
        if e.layer is None or e.role is Role.COPY:
            return index.read_raw(e.source, outbufs[slot], itemsize)
        a = index.read_raw(e.source, inbuf, itemsize)
        return slice_array(a, e.role, plan.layers[e.layer], d, outbufs[slot])

    with tqdm(total=total, unit="B", unit_scale=True, desc="slicing", disable=not progress) as bar:
        for entries, fname in zip(shard_entries, files, strict=True):
            write_shard(tmp / fname, entries, produce, bar)
            weight_map.update({e.name: fname for e in entries})
    meta = {"total_size": total}
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2) + "\n")


def _bias(index: ShardIndex, spec: ArchSpec, plan: Plan, stats: Stats | None, e: Entry,
          refit: dict, attn: dict) -> torch.Tensor:
    """A computed output bias (H,): the refit's, FLAP's or zeros, plus the bias the layer had."""
    lp = plan.layers[e.layer]
    mlp = e.name.endswith(spec.down_bias)
    fitted = (refit if mlp else attn).get(e.layer)
    if fitted is not None:
        b = fitted[1].float()
    elif stats is not None:
        weight = spec.layer_name(e.layer, spec.down_weight if mlp else spec.o_weight)
        w = index.read(weight)  # (hidden, in) before slicing
        keep = lp.mlp_keep if mlp else _head_rows(lp.heads_keep, plan.source.head_dim).tolist()
        b = flap_bias(w, keep, stats.tensors[key(e.layer, "mlp" if mlp else "attn", "mean")])
    else:
        b = torch.zeros(e.shape[0])  # declared by the architecture, nothing to add
    old = spec.layer_name(e.layer, spec.down_bias if mlp else spec.o_bias)
    if old in index.weight_map:
        b = b + index.read(old).float()
    return b


def _copy_side_files(model_dir: Path, tmp: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file except weights
    (pickled formats are never copied), config, our own records and code: the checkpoint's
    ``*.py`` and ``auto_map`` are never carried (the actprune architecture's files come from
    the installed package, see :mod:`.trust`)."""
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and p.name not in _NOT_COPIED and not p.name.endswith(_NOT_COPIED_SUFFIXES) \
                and not (tmp / p.name).exists():
            copy_side_file(p, tmp / p.name)
