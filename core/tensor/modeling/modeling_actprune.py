"""The actprune architecture for transformers: a stock Llama-family model (Qwen3, Qwen2, Llama)
whose decoder layers each have their own MLP width and head counts, with optional output
biases on ``down_proj`` / ``o_proj`` (FLAP bias compensation).

Copied into sliced checkpoints next to ``configuration_actprune.py`` and loaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. Weight names are those of
the stock family, so the checkpoint reads like a stock one with narrower layers. Every layer
is the stock family's own decoder layer class built from a per-layer config, so the maths is
exactly the stock model's.
"""

from __future__ import annotations

from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .configuration_actprune import ActpruneConfig

__all__ = ["ActpruneForCausalLM", "ActprunePreTrainedModel"]


class ActprunePreTrainedModel(PreTrainedModel):
    config_class = ActpruneConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # _no_split_modules is set per instance: the stock family's own decoder-layer class
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True


class ActpruneForCausalLM(ActprunePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ActpruneConfig) -> None:
        super().__init__(config)
        base = config.base_config()
        impl = getattr(config, "_attn_implementation", None)
        if impl is not None:
            base._attn_implementation = impl
        self.model = MODEL_MAPPING[type(base)](base)
        layer_cls = type(self.model.layers[0])
        self._no_split_modules = [layer_cls.__name__]  # accelerate keeps each layer on one device
        for i in range(base.num_hidden_layers):
            cfg = config.layer_config(base, i)
            layer = layer_cls(cfg, i)
            hidden = cfg.hidden_size
            if config.actprune_bias.get("down_proj"):
                layer.mlp.down_proj = nn.Linear(cfg.intermediate_size, hidden, bias=True)
            if config.actprune_bias.get("o_proj"):
                q_width = layer.self_attn.o_proj.in_features
                layer.self_attn.o_proj = nn.Linear(q_width, hidden, bias=True)
            self.model.layers[i] = layer
        self.vocab_size = base.vocab_size
        self.lm_head = nn.Linear(base.hidden_size, base.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        h = out.last_hidden_state  # (B, T, hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])  # (B, T', vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )
