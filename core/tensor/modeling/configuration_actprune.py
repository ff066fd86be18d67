"""Config of the actprune architecture: a Llama-family model whose layers differ in width.

This file is copied into every checkpoint that needs it (``auto_map`` in config.json), so it
imports nothing from actprune. Keys (documented in actprune's ``docs/formats.md``):

- ``actprune_base_model_type``: the stock family, ``"qwen3"``, ``"qwen2"`` or ``"llama"``;
  every other key of config.json is that family's config.
- ``actprune_base_architecture``: its class name, e.g. ``"Qwen3ForCausalLM"``.
- ``actprune_layer_widths``: one ``{"intermediate_size", "num_attention_heads",
  "num_key_value_heads"}`` per decoder layer.
- ``actprune_bias``: ``{"down_proj": bool, "o_proj": bool}``, output biases holding the mean
  contribution of pruned units (FLAP bias compensation).
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PretrainedConfig

__all__ = ["ActpruneConfig"]

_OWN_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")
_HEAD_KEYS = ("num_attention_heads", "num_key_value_heads")


class ActpruneConfig(PretrainedConfig):
    model_type = "actprune"

    def __init__(
        self,
        actprune_base_model_type: str = "qwen3",
        actprune_base_architecture: str = "Qwen3ForCausalLM",
        actprune_layer_widths: list[dict[str, int]] | None = None,
        actprune_bias: dict[str, bool] | None = None,
        **kwargs: Any,
    ) -> None:
        self.actprune_base_model_type = actprune_base_model_type
        self.actprune_base_architecture = actprune_base_architecture
        self.actprune_layer_widths = list(actprune_layer_widths or [])
        self.actprune_bias = dict(actprune_bias or {"down_proj": False, "o_proj": False})
        super().__init__(**kwargs)

    def base_config(self) -> PretrainedConfig:
        """The stock family's config (widths of the widest layer)."""
        fields = {
            k: v for k, v in self.to_dict().items()
            if k not in _OWN_KEYS and not k.startswith("actprune_")
        }
        # LlamaConfig refuses a hidden_size that is not a multiple of the head count, which
        # pruned head counts need not be (head_dim is explicit): set the counts after init.
        heads = {k: fields.pop(k) for k in _HEAD_KEYS if k in fields}
        cfg = AutoConfig.for_model(self.actprune_base_model_type, **{k: 1 for k in heads}, **fields)
        for key, value in heads.items():
            setattr(cfg, key, value)
        return cfg

    def layer_config(self, base: PretrainedConfig, layer: int) -> PretrainedConfig:
        """``base`` with the widths of decoder layer ``layer``."""
        cfg = copy.deepcopy(base)
        for key, value in self.actprune_layer_widths[layer].items():
            setattr(cfg, key, value)
        return cfg
