"""The geometry of a checkpoint from its config dict: widths per layer, parameter counts.

:func:`model_shape` is the one reader of layer widths: the uniform widths of a stock config, or
``actprune_layer_widths`` (one ``{"intermediate_size", "num_attention_heads",
"num_key_value_heads"}`` per layer) of a checkpoint ``actprune prune`` wrote. A sparse layer of
a mixture-of-experts model has ``num_experts`` E (None on dense layers) and its
``intermediate_size`` is one expert's width (``moe_intermediate_size``): every expert is an MLP
of that width, plus one router row per expert. Every number is
checked against :data:`LIMITS` before anything is sized by it, so a typo or a hostile config
gets one line (:class:`~actprune.core.config.CheckpointError`), not a hang.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from actprune.core.config import CheckpointError

from .spec import MoeLayout

__all__ = ["LIMITS", "LayerShape", "Limits", "ModelShape", "bounded_int", "model_shape"]

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_WIDTH_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class Limits:
    """Upper bounds on a decoder-only model's geometry, far above any released model (Llama-3.1
    405B: 126 layers, hidden 16384, MLP 53248, 128 heads of 128), shared by the config reader,
    the plan and the stats file."""

    layers: int = 4096
    width: int = 1 << 20  # hidden_size, intermediate_size
    heads: int = 1 << 12
    head_dim: int = 1 << 12
    vocab: int = 1 << 24
    experts: int = 1 << 16  # routed experts per layer (Qwen3-235B-A22B: 128, DeepSeek-V3: 256)


LIMITS = Limits()


def bounded_int(value: Any, name: str, hi: int, lo: int = 1) -> int:
    """``value`` as an int in [lo, hi] (an integral float counts; a bool or a string does not);
    ValueError naming ``name`` otherwise."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:39] + "…"
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {shown}")
    return value


@dataclass(frozen=True)
class LayerShape:
    intermediate_size: int  # MLP neurons; on a sparse layer, neurons of each expert
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int | None = None  # routed experts of a sparse layer; None: a dense MLP


@dataclass(frozen=True)
class ModelShape:
    """Geometry of one checkpoint, enough to count parameters and check plans."""

    hidden_size: int
    vocab_size: int
    head_dim: int
    layers: tuple[LayerShape, ...]
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def mlp_widths(self) -> list[int]:
        return [s.intermediate_size for s in self.layers]

    def layer_params(self, s: LayerShape, *, down_bias: bool = False, o_bias: bool = False) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = s.num_attention_heads * d, s.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * d
        mlp = 3 * h * s.intermediate_size
        if s.num_experts is not None:  # E experts of (gate, up, down) plus the (E, hidden) router
            mlp = s.num_experts * (mlp + h)
        return attn + mlp + 2 * h + (h if down_bias else 0) + (h if o_bias else 0)

    def global_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def params(self, layers: tuple[LayerShape, ...] | None = None, **bias: bool) -> int:
        layers = self.layers if layers is None else layers
        return self.global_params() + sum(self.layer_params(s, **bias) for s in layers)


def model_shape(config: dict[str, Any]) -> ModelShape:
    """Geometry from a config dict; CheckpointError (a ValueError) naming the key when the config
    does not describe a supported decoder-only model within :data:`LIMITS`."""
    from . import spec_for_config  # the package imports this module

    spec = spec_for_config(config)
    try:
        shape = _shape(config, spec.qkv_bias, spec.qk_norm, spec.moe is not None)
        return shape if spec.moe is None else _with_experts(shape, config, spec.moe)
    except KeyError as e:
        raise CheckpointError(f"config.json has no {e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from None


def _shape(config: dict[str, Any], qkv_bias: bool, qk_norm: bool, moe: bool = False) -> ModelShape:
    n = bounded_int(config["num_hidden_layers"], "num_hidden_layers", LIMITS.layers)
    hidden = bounded_int(config["hidden_size"], "hidden_size", LIMITS.width)
    heads = bounded_int(config["num_attention_heads"], "num_attention_heads", LIMITS.heads)
    kv = bounded_int(config.get("num_key_value_heads") or heads, "num_key_value_heads", LIMITS.heads)
    head_dim = bounded_int(config.get("head_dim") or hidden // heads, "head_dim", LIMITS.head_dim)
    mlp = bounded_int(config["intermediate_size"], "intermediate_size", LIMITS.width)
    widths = config.get("actprune_layer_widths")
    layers = _layer_widths(widths, n, moe) if widths else (LayerShape(mlp, heads, kv),) * n
    for i, s in enumerate(layers):
        if s.num_attention_heads % s.num_key_value_heads:  # GQA: whole groups of query heads
            where = f"actprune_layer_widths[{i}]" if widths else "config"
            raise ValueError(f"{where}: num_key_value_heads {s.num_key_value_heads} does not divide "
                             f"num_attention_heads {s.num_attention_heads}")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return ModelShape(
        hidden_size=hidden,
        vocab_size=bounded_int(config["vocab_size"], "vocab_size", LIMITS.vocab),
        head_dim=head_dim,
        layers=layers,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        dtype_bytes=_DTYPE_BYTES.get(dtype.removeprefix("torch."), 2),
    )


def _with_experts(shape: ModelShape, config: dict[str, Any], moe: MoeLayout) -> ModelShape:
    """Sparse layers of an MoE config: E experts of ``moe_intermediate_size`` neurons; with
    ``actprune_layer_widths``, each sparse layer's entry gives its own ``num_experts`` (and a
    dense layer's its MLP width)."""
    experts = bounded_int(moe.routing(config)[0], "num_experts", LIMITS.experts)
    top_k = bounded_int(config[moe.top_k_key], moe.top_k_key, experts)  # a plan keeps at least top-k
    width = bounded_int(config[moe.expert_width_key], moe.expert_width_key, LIMITS.width)
    layers = []
    for i, (s, sparse) in enumerate(zip(shape.layers, moe.sparse_layers(config), strict=True)):
        where = f"actprune_layer_widths[{i}]"
        if not sparse:
            if s.num_experts is not None:
                raise ValueError(f"{where}: num_experts on a dense layer (mlp_only_layers / decoder_sparse_step)")
            layers.append(s)
            continue
        e = experts if s.num_experts is None else s.num_experts
        if not top_k <= e <= experts:
            raise ValueError(f"{where}.num_experts must be in {top_k}..{experts} (top-k..num_experts), got {e}")
        layers.append(LayerShape(width, s.num_attention_heads, s.num_key_value_heads, e))
    return replace(shape, layers=tuple(layers))


def _layer_widths(widths: Any, n: int, moe: bool) -> tuple[LayerShape, ...]:
    """The entries of ``actprune_layer_widths``; a mixture-of-experts model's sparse layers add
    ``num_experts`` (their ``intermediate_size`` is then the config's dense width, unused)."""
    if not isinstance(widths, list) or len(widths) != n:
        got = f"{len(widths)} entries" if isinstance(widths, list) else type(widths).__name__
        raise ValueError(f"actprune_layer_widths has {got} for {n} layers")
    out = []
    for i, w in enumerate(widths):
        keys = sorted(w) if isinstance(w, dict) else None
        if keys != sorted(_WIDTH_KEYS) and not (moe and keys == sorted((*_WIDTH_KEYS, "num_experts"))):
            extra = " (and num_experts on a sparse layer)" if moe else ""
            raise ValueError(f"actprune_layer_widths[{i}] must hold exactly {list(_WIDTH_KEYS)}{extra}")
        sizes = [bounded_int(w[k], f"actprune_layer_widths[{i}].{k}",
                             LIMITS.width if k == "intermediate_size" else LIMITS.heads) for k in _WIDTH_KEYS]
        e = w.get("num_experts")
        out.append(LayerShape(*sizes, None if e is None else
                              bounded_int(e, f"actprune_layer_widths[{i}].num_experts", LIMITS.experts)))
    return tuple(out)
