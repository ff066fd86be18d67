"""vLLM's ``ActpruneForCausalLM``: a Qwen3 / Qwen2 / Llama decoder whose layers differ in width,
or a Qwen3-MoE whose sparse layers differ in expert count.

Serves the checkpoints ``actprune prune`` writes with the actprune architecture (config keys in
``docs/formats.md``): every decoder layer has its own MLP width, query-head and KV-head counts,
and optionally a ``down_proj`` / ``o_proj`` output bias (FLAP bias compensation); on a
mixture-of-experts base (:class:`ActpruneMoeModel`), each sparse layer its own ``num_experts``.

Each layer is the base family's own vLLM decoder layer, built from a per-layer copy of the
stock config (``ActpruneConfig.layer_config``), so the maths, kernels, tensor-parallel
sharding and module names (``model.layers.{i}.mlp.down_proj``, ``...self_attn.o_proj``, which
capture relies on) are exactly those of the stock model. vLLM 0.32 sizes the KV cache per
attention layer (``UniformTypeKVCacheSpecs``) and builds one attention-metadata group per
distinct (KV spec, query-head count), so per-layer head and KV-head counts need nothing here.

Which stock layer a family uses, and any attribute set on its per-layer config first, is data
in the architecture registry (``ArchSpec.vllm.decoder_layer`` / ``layer_config``): Qwen2, for
example, is built as vLLM Llama layers with q/k/v biases (see ``core/archs/qwen2.py``).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Iterable

import torch
from actprune.core.archs import REGISTRY, VllmLayout
from torch import nn
from transformers import PretrainedConfig
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.qwen3_moe import Qwen3MoeModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    extract_layer_index,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

__all__ = ["ActpruneForCausalLM", "ActpruneModel", "ActpruneMoeModel", "build_layer", "layer_configs"]

_LAYOUTS: dict[str, VllmLayout] = {spec.model_type: spec.vllm for spec in REGISTRY.values()}
_MOE = frozenset(spec.model_type for spec in REGISTRY.values() if spec.moe is not None)


def build_layer(layout: VllmLayout, cfg: PretrainedConfig, vllm_config: VllmConfig, prefix: str) -> nn.Module:
    """The family's stock vLLM decoder layer (``layout.decoder_layer``) for one layer's config.
    vLLM's layers take one of three constructor shapes: Llama's ``(vllm_config, prefix, config)``,
    Qwen3's ``(config, cache_config, quant_config, prefix)``, or Qwen3-MoE's ``(vllm_config,
    prefix)``, which reads the model config from ``vllm_config`` (given a per-layer copy here)."""
    module, name = layout.decoder_layer.split(":")
    cls = getattr(importlib.import_module(module), name)
    if layout.layer_config:
        cfg = copy.copy(cfg)
        for k, v in layout.layer_config.items():
            setattr(cfg, k, v)
    params = inspect.signature(cls.__init__).parameters
    if "vllm_config" in params and "config" not in params:  # reads vllm_config.model_config.hf_text_config
        return cls(vllm_config=_with_text_config(vllm_config, cfg), prefix=prefix)
    if "vllm_config" in params:
        return cls(vllm_config=vllm_config, prefix=prefix, config=cfg)
    return cls(config=cfg, cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
               prefix=prefix)


def _with_text_config(vllm_config: VllmConfig, cfg: PretrainedConfig) -> VllmConfig:
    """A shallow copy of ``vllm_config`` whose model config's ``hf_text_config`` is ``cfg``; every
    other part (cache, parallel, compilation config and its forward context) is the same object."""
    model_config = copy.copy(vllm_config.model_config)
    object.__setattr__(model_config, "hf_text_config", cfg)
    out = copy.copy(vllm_config)
    object.__setattr__(out, "model_config", model_config)
    return out


def layer_configs(hf_config: PretrainedConfig) -> list[PretrainedConfig]:
    """One stock-family config per decoder layer, with that layer's widths."""
    if not hasattr(hf_config, "actprune_layer_widths") or not hasattr(hf_config, "base_config"):
        raise ValueError(
            f"ActpruneForCausalLM needs an actprune config (model_type 'actprune'), got "
            f"{type(hf_config).__name__}; is the checkpoint's config.json from `actprune prune`?"
        )
    base_type = hf_config.actprune_base_model_type
    if base_type not in _LAYOUTS:
        raise ValueError(
            f"actprune_base_model_type {base_type!r} is not served by ActpruneForCausalLM; "
            f"supported: {sorted(_LAYOUTS)}"
        )
    base = hf_config.base_config()
    n = base.num_hidden_layers
    if len(hf_config.actprune_layer_widths) != n:
        raise ValueError(
            f"actprune_layer_widths has {len(hf_config.actprune_layer_widths)} entries for "
            f"num_hidden_layers {n}; the config.json is inconsistent"
        )
    return [hf_config.layer_config(base, i) for i in range(n)]


def _add_output_biases(layer: nn.Module, layout: VllmLayout, cfg: PretrainedConfig,
                       vllm_config: VllmConfig, prefix: str, bias: dict[str, bool]) -> None:
    """Compensation biases (``actprune_bias``): swap the layer's ``down_proj`` / ``o_proj``
    (the layout's ``mlp_in`` / ``attn_in``) for the same RowParallelLinear with a bias.
    RowParallelLinear adds its bias once (on rank 0, before the all-reduce), so tensor
    parallelism stays correct."""
    for key, path in (("down_proj", layout.mlp_in), ("o_proj", layout.attn_in)):
        if not bias.get(key):
            continue
        old = layer.get_submodule(path)  # input_size: the global width, whatever the TP rank
        parent, _, name = path.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, name, RowParallelLinear(
            old.input_size, cfg.hidden_size, bias=True, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.{path}",
        ))


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": -1,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class ActpruneModel(Qwen2Model):
    """Qwen2Model's embedding, layer loop, final norm and stacked-weight loading (the same
    for every registry family), with each layer built by :func:`build_layer`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        hf_config = vllm_config.model_config.hf_config
        configs = layer_configs(hf_config)
        layout = _LAYOUTS[hf_config.actprune_base_model_type]
        bias = dict(getattr(hf_config, "actprune_bias", None) or {})

        def make_layer(*, config, cache_config, quant_config, prefix: str) -> nn.Module:
            cfg = configs[extract_layer_index(prefix)]
            layer = build_layer(layout, cfg, vllm_config, prefix)
            _add_output_biases(layer, layout, cfg, vllm_config, prefix, bias)
            return layer

        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=make_layer)


@support_torch_compile
class ActpruneMoeModel(Qwen3MoeModel):
    """A mixture-of-experts family (Qwen3-MoE) whose sparse layers each route to their own
    number of experts (``num_experts`` in ``actprune_layer_widths``): Qwen3MoeModel's embedding,
    layer loop and weight loading (experts load through each layer's own FusedMoE, so E'_i
    needs nothing more), with each layer built by :func:`build_layer` from its config."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        hf_config = vllm_config.model_config.hf_config
        configs = layer_configs(hf_config)
        layout = _LAYOUTS[hf_config.actprune_base_model_type]
        if any((getattr(hf_config, "actprune_bias", None) or {}).values()):
            raise ValueError("actprune_bias: output biases are not supported on mixture-of-experts models")

        def make_layer(*, vllm_config: VllmConfig, prefix: str) -> nn.Module:
            return build_layer(layout, configs[extract_layer_index(prefix)], vllm_config, prefix)

        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=make_layer)


class ActpruneForCausalLM(nn.Module, SupportsPP):
    hf_to_vllm_mapper = Qwen2Model.hf_to_vllm_mapper
    # Every registry family stacks the same projections (VllmLayout.packed_modules); a family
    # that stacked others would need its own class.
    packed_modules_mapping = {k: list(v) for k, v in VllmLayout().packed_modules.items()}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        body = ActpruneMoeModel if config.actprune_base_model_type in _MOE else ActpruneModel
        self.model = body(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)
