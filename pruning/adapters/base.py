"""The neutral description of a decoder-only checkpoint that scoring, planning and slicing use.

An :class:`Adapter` is data: which Hugging Face tensor names hold which *role* (rows that are MLP
neurons, columns that are attention channels, ...). Slicing code asks ``adapter.classify(name)``
and never spells a weight name itself. :class:`ModelShape` is the per-layer geometry read from a
config dict, including the per-layer widths of an already pruned (actprune) checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Adapter", "LayerShape", "ModelShape", "Role", "TensorRef"]


class Role(str, Enum):
    """How a tensor of a decoder layer is sliced (dim 0 = rows of an nn.Linear weight)."""

    NEURON_ROWS = "neuron_rows"  # gate/up: (I, hidden), keep rows of kept neurons
    NEURON_COLS = "neuron_cols"  # down: (hidden, I), keep columns
    Q_ROWS = "q_rows"  # q weight (H*D, hidden) or bias (H*D,): keep whole heads
    KV_ROWS = "kv_rows"  # k/v weight (K*D, hidden) or bias (K*D,): keep whole KV heads
    Q_COLS = "q_cols"  # o weight (hidden, H*D): keep the columns of kept heads
    COPY = "copy"  # layer norms, q_norm/k_norm (per head_dim, shared by all heads)


@dataclass(frozen=True)
class TensorRef:
    """A tensor classified by an adapter: ``layer`` is None for global tensors."""

    layer: int | None
    role: Role
    suffix: str  # the name inside the layer, e.g. 'mlp.down_proj.weight'


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


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Adapter:
    """Everything architecture-specific about one Hugging Face decoder-only family."""

    architecture: str  # the `architectures` entry of config.json
    model_type: str
    layer_roles: dict[str, Role]  # suffix inside `model.layers.{i}.` -> role
    global_names: frozenset[str]
    down_proj: str = "mlp.down_proj.weight"
    o_proj: str = "self_attn.o_proj.weight"
    down_bias: str = "mlp.down_proj.bias"
    o_bias: str = "self_attn.o_proj.bias"
    qkv_bias: bool = False
    qk_norm: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)

    def layer_name(self, layer: int, suffix: str) -> str:
        return f"model.layers.{layer}.{suffix}"

    def classify(self, name: str) -> TensorRef:
        """Role of a checkpoint tensor; ValueError for a name this adapter does not know
        (slicing an unknown tensor by guess could silently produce a broken checkpoint)."""
        if name in self.global_names:
            return TensorRef(None, Role.COPY, name)
        m = _LAYER_RE.match(name)
        if m and m.group(2) in self.layer_roles:
            return TensorRef(int(m.group(1)), self.layer_roles[m.group(2)], m.group(2))
        if m and m.group(2) in (self.down_bias, self.o_bias):
            role = Role.COPY  # compensation biases of an already pruned checkpoint: (hidden,)
            return TensorRef(int(m.group(1)), role, m.group(2))
        raise ValueError(f"{self.architecture} adapter does not know tensor {name!r}")

    def shape(self, config: dict[str, Any]) -> ModelShape:
        """Geometry from a config dict; honours `actprune_layer_widths` of pruned checkpoints."""
        n = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        default = LayerShape(
            int(config["intermediate_size"]), heads, int(config.get("num_key_value_heads") or heads)
        )
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
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            dtype_bytes=_DTYPE_BYTES.get(dtype.removeprefix("torch."), 2),
        )
