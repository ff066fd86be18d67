"""The geometry of a checkpoint from its config dict: widths per layer, parameter counts.

:func:`model_shape` is the one reader of layer widths: the uniform widths of a stock config, or
``actprune_layer_widths`` (one ``{"intermediate_size", "num_attention_heads",
"num_key_value_heads"}`` per layer) of a checkpoint ``actprune prune`` wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LayerShape", "ModelShape", "model_shape"]

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class LayerShape:
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


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
        return attn + mlp + 2 * h + (h if down_bias else 0) + (h if o_bias else 0)

    def global_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def params(self, layers: tuple[LayerShape, ...] | None = None, **bias: bool) -> int:
        layers = self.layers if layers is None else layers
        return self.global_params() + sum(self.layer_params(s, **bias) for s in layers)


def model_shape(config: dict[str, Any]) -> ModelShape:
    """Geometry from a config dict; ValueError (or KeyError for a missing key) when the config
    does not describe a supported decoder-only model."""
    from . import spec_for_config  # the package imports this module

    spec = spec_for_config(config)
    n = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    default = LayerShape(int(config["intermediate_size"]), heads, int(config.get("num_key_value_heads") or heads))
    widths = config.get("actprune_layer_widths")
    layers = tuple(LayerShape(**w) for w in widths) if widths else (default,) * n
    if len(layers) != n:
        raise ValueError(f"actprune_layer_widths has {len(layers)} entries for {n} layers")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return ModelShape(
        hidden_size=int(config["hidden_size"]),
        vocab_size=int(config["vocab_size"]),
        head_dim=head_dim,
        layers=layers,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=spec.qkv_bias,
        qk_norm=spec.qk_norm,
        dtype_bytes=_DTYPE_BYTES.get(dtype.removeprefix("torch."), 2),
    )
