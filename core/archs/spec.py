"""What the registry says about one architecture family: names and layout, as data.

An :class:`ArchSpec` is read by every part of actprune that touches a model: the vLLM capture
(:class:`VllmLayout`), the offline recorder, calibration and sensitivity passes (module paths of
a transformers model, :class:`HfLayout`), the slicer (tensor names and their slicing
:class:`Role`), the actprune architecture (which stock decoder layer to build per layer), and
the tiny test models. Code elsewhere asks the spec and never spells a name itself.

Module paths are dotted paths inside a transformers (or vLLM) model; a tensor's name is its
module path plus ``.weight`` / ``.bias``. Paths inside a decoder layer are relative to
``model.layers.{i}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["ArchSpec", "HfLayout", "MoeLayout", "Role", "TensorRef", "VllmLayout"]


class Role(str, Enum):
    """How a tensor of a decoder layer is sliced (dim 0 = rows of an nn.Linear weight)."""

    NEURON_ROWS = "neuron_rows"  # gate/up: (I, hidden), keep rows of kept neurons
    NEURON_COLS = "neuron_cols"  # down: (hidden, I), keep columns
    Q_ROWS = "q_rows"  # q weight (H*D, hidden) or bias (H*D,): keep whole heads
    KV_ROWS = "kv_rows"  # k/v weight (K*D, hidden) or bias (K*D,): keep whole KV heads
    Q_COLS = "q_cols"  # o weight (hidden, H*D): keep the columns of kept heads
    EXPERT_ROWS = "expert_rows"  # MoE router (E, hidden): keep the rows of kept experts
    COPY = "copy"  # layer norms, q_norm/k_norm (per head_dim, shared by all heads), biases of outputs


@dataclass(frozen=True)
class TensorRef:
    """A checkpoint tensor classified by a spec: ``layer`` is None for global tensors."""

    layer: int | None
    role: Role
    suffix: str  # the name inside the layer, e.g. 'mlp.down_proj.weight'
    expert: int | None = None  # the routed expert a tensor belongs to ('mlp.experts.{e}.…')


@dataclass(frozen=True)
class HfLayout:
    """Module paths of a transformers decoder-only model (the Llama layout by default)."""

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    lm_head: str = "lm_head"
    # inside a decoder layer
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    q_norm: str | None = None  # per-head RMSNorm over head_dim (Qwen3)
    k_norm: str | None = None
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"


@dataclass(frozen=True)
class VllmLayout:
    """Where capture hooks go in vLLM's implementation of the family, and how the actprune
    architecture builds one of its decoder layers with per-layer widths."""

    layers: str = "model.layers"
    mlp_in: str = "mlp.down_proj"  # RowParallelLinear: its input is the MLP neurons (TP-sharded)
    attn_in: str = "self_attn.o_proj"  # RowParallelLinear: its input is the attention heads
    # MoE families: the router (vLLM's GateLinear, replicated on every rank) of a sparse layer,
    # whose output is the (T, E) router logits the fused experts route with
    router_out: str | None = None
    # positional index of (hidden_states, residual) in ``layer(positions, hidden, residual)``
    hidden_arg: int = 1
    residual_arg: int = 2
    # vLLM's fused projections: name -> the Hugging Face projections stacked into it
    packed_modules: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")})
    # "module:Class" of the stock decoder layer ActpruneForCausalLM builds per layer, and config
    # attributes set on its per-layer config first
    decoder_layer: str = "vllm.model_executor.models.llama:LlamaDecoderLayer"
    layer_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MoeLayout:
    """Routed experts of a mixture-of-experts MLP (Qwen3-MoE): the router's (E, hidden) weight
    at ``router``, expert ``e``'s projections at ``{experts}.{e}.{gate_proj|up_proj|down_proj}``;
    the config keys that hold the expert count, top-k and whether top-k weights are renormalised."""

    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    num_experts_key: str = "num_experts"
    # transformers 5 writes the expert count under this name (its attribute_map); released
    # checkpoints and vLLM use ``num_experts``
    num_experts_alias: str = "num_local_experts"
    top_k_key: str = "num_experts_per_tok"
    norm_topk_key: str = "norm_topk_prob"
    expert_width_key: str = "moe_intermediate_size"
    # which layers are sparse: every ``sparse_step``-th one, except those listed as dense
    sparse_step_key: str = "decoder_sparse_step"
    dense_layers_key: str = "mlp_only_layers"
    # inside ``{experts}.{e}``: projections whose rows are the expert's neurons, and whose columns
    expert_neuron_rows: tuple[str, ...] = ("gate_proj", "up_proj")
    expert_neuron_cols: tuple[str, ...] = ("down_proj",)
    # transformers' runtime experts module at ``{experts}`` (transformers 5 fuses the checkpoint's
    # per-expert tensors on load): (E, 2I, H) gate rows then up rows, (E, H, I), the activation
    hf_gate_up: str = "gate_up_proj"
    hf_down: str = "down_proj"
    hf_act: str = "act_fn"

    def expert_roles(self) -> dict[str, Role]:
        """Name inside ``{experts}.{e}.`` -> role (neuron rows / columns of that expert)."""
        return {**{f"{p}.weight": Role.NEURON_ROWS for p in self.expert_neuron_rows},
                **{f"{p}.weight": Role.NEURON_COLS for p in self.expert_neuron_cols}}

    def expert_suffix(self, expert: int, name: str) -> str:
        """``mlp.experts.{expert}.{name}``: a tensor of one expert, inside its decoder layer."""
        return f"{self.experts}.{expert}.{name}"

    def split_expert(self, suffix: str) -> tuple[int, str] | None:
        """(expert, name inside it) of a suffix ``mlp.experts.{e}.{name}``; None otherwise."""
        head, _, rest = suffix.partition(f"{self.experts}.")
        e, _, name = rest.partition(".")
        return (int(e), name) if not head and e.isdigit() and name else None

    def routing(self, config: dict[str, Any]) -> tuple[int, int, bool]:
        """(experts, top-k, renormalise top-k weights) of a config dict; KeyError naming a
        missing key (``norm_topk_prob`` defaults to False, as in transformers)."""
        experts = config.get(self.num_experts_key) or config.get(self.num_experts_alias)
        if experts is None:
            raise KeyError(self.num_experts_key)
        return int(experts), int(config[self.top_k_key]), bool(config.get(self.norm_topk_key, False))

    def sparse_layers(self, config: dict[str, Any]) -> list[bool]:
        """Per decoder layer: True where the MLP is routed experts, False for a dense MLP (the
        rule of transformers' and vLLM's ``Qwen3MoeDecoderLayer``)."""
        dense = set(config.get(self.dense_layers_key) or [])
        step = int(config.get(self.sparse_step_key) or 1)
        experts = self.routing(config)[0]
        return [i not in dense and experts > 0 and (i + 1) % step == 0
                for i in range(int(config["num_hidden_layers"]))]

    def hashed(self, config: dict[str, Any]) -> dict[str, Any]:
        """The shape-deciding MoE figures of a config, whatever the keys' spelling (what
        ``config_hash`` adds for an MoE model): expert count, top-k, expert width, sparse layers."""
        experts, top_k, _ = self.routing(config)
        sparse = [i for i, s in enumerate(self.sparse_layers(config)) if s]
        return {"num_experts": experts, "num_experts_per_tok": top_k,
                "moe_intermediate_size": config.get(self.expert_width_key), "moe_sparse_layers": sparse}


_LAYER_RE = re.compile(r"^(.+?)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ArchSpec:
    """Everything architecture-specific about one decoder-only family."""

    architecture: str  # the `architectures` entry of config.json (transformers and vLLM)
    model_type: str  # config.json's `model_type`
    hf: HfLayout = field(default_factory=HfLayout)
    vllm: VllmLayout = field(default_factory=VllmLayout)
    qkv_bias: bool = False  # biases on q/k/v, sliced with their heads (Qwen2)
    moe: MoeLayout | None = None
    # config keys of a tiny test model beyond the shared shape (pruning.fixtures.synthetic)
    tiny_config: dict[str, Any] = field(default_factory=dict)

    @property
    def qk_norm(self) -> bool:
        return self.hf.q_norm is not None

    # ---- tensor names ------------------------------------------------------------------------
    def layer_name(self, layer: int, suffix: str) -> str:
        """``model.layers.{layer}.{suffix}``: a tensor or module of decoder layer ``layer``."""
        return f"{self.hf.layers}.{layer}.{suffix}"

    @property
    def global_names(self) -> frozenset[str]:
        h = self.hf
        return frozenset({f"{h.embed}.weight", f"{h.final_norm}.weight", f"{h.lm_head}.weight"})

    @property
    def down_weight(self) -> str:
        return f"{self.hf.down_proj}.weight"

    @property
    def o_weight(self) -> str:
        return f"{self.hf.o_proj}.weight"

    @property
    def down_bias(self) -> str:
        """The output bias actprune adds for compensation (stock families have none)."""
        return f"{self.hf.down_proj}.bias"

    @property
    def o_bias(self) -> str:
        return f"{self.hf.o_proj}.bias"

    def layer_roles(self) -> dict[str, Role]:
        """Suffix inside ``model.layers.{i}.`` -> how the slicer treats that tensor."""
        h = self.hf
        roles = {
            f"{h.input_norm}.weight": Role.COPY,
            f"{h.post_attention_norm}.weight": Role.COPY,
            f"{h.q_proj}.weight": Role.Q_ROWS,
            f"{h.k_proj}.weight": Role.KV_ROWS,
            f"{h.v_proj}.weight": Role.KV_ROWS,
            f"{h.o_proj}.weight": Role.Q_COLS,
            f"{h.gate_proj}.weight": Role.NEURON_ROWS,
            f"{h.up_proj}.weight": Role.NEURON_ROWS,
            f"{h.down_proj}.weight": Role.NEURON_COLS,
        }
        if self.qkv_bias:
            roles.update({f"{h.q_proj}.bias": Role.Q_ROWS, f"{h.k_proj}.bias": Role.KV_ROWS,
                          f"{h.v_proj}.bias": Role.KV_ROWS})
        for norm in (h.q_norm, h.k_norm):
            if norm is not None:
                roles[f"{norm}.weight"] = Role.COPY
        return roles

    def classify(self, name: str) -> TensorRef:
        """Role of a checkpoint tensor; ValueError for a name this family does not have
        (slicing an unknown tensor by guess could silently produce a broken checkpoint)."""
        if name in self.global_names:
            return TensorRef(None, Role.COPY, name)
        m = _LAYER_RE.match(name)
        if m and m.group(1) == self.hf.layers:
            layer, suffix = int(m.group(2)), m.group(3)
            roles = self.layer_roles()
            if suffix in roles:
                return TensorRef(layer, roles[suffix], suffix)
            if suffix in (self.down_bias, self.o_bias):  # compensation biases of a pruned checkpoint
                return TensorRef(layer, Role.COPY, suffix)
            if self.moe is not None:
                if suffix == f"{self.moe.router}.weight":
                    return TensorRef(layer, Role.EXPERT_ROWS, suffix)
                split = self.moe.split_expert(suffix)
                if split is not None and split[1] in self.moe.expert_roles():
                    return TensorRef(layer, self.moe.expert_roles()[split[1]], suffix, expert=split[0])
        raise ValueError(f"{self.architecture}: actprune does not know tensor {name!r}")
