"""Adapters: names to roles, config to shape, and clear errors for what we cannot prune."""

from __future__ import annotations

import pytest
from actprune.pruning.adapters import ADAPTERS, Role, adapter_for
from actprune.pruning.synthetic import tiny_config


def test_registry_is_keyed_by_config_architectures():
    for arch, name in (("qwen3", "Qwen3ForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("llama", "LlamaForCausalLM")):
        assert adapter_for(tiny_config(arch)) is ADAPTERS[name]
    pruned = {"architectures": ["ActpruneForCausalLM"], "actprune_base_architecture": "Qwen2ForCausalLM"}
    assert adapter_for(pruned) is ADAPTERS["Qwen2ForCausalLM"]
    with pytest.raises(ValueError, match="can prune"):
        adapter_for({"architectures": ["GPT2LMHeadModel"]})


def test_roles_of_family_specific_tensors():
    q3, q2 = ADAPTERS["Qwen3ForCausalLM"], ADAPTERS["Qwen2ForCausalLM"]
    assert q3.classify("model.layers.7.self_attn.q_norm.weight").role is Role.COPY
    assert q2.classify("model.layers.0.self_attn.k_proj.bias").role is Role.KV_ROWS
    assert q2.classify("model.layers.0.mlp.down_proj.weight").role is Role.NEURON_COLS
    ref = q3.classify("model.layers.7.self_attn.o_proj.weight")
    assert (ref.layer, ref.role, ref.suffix) == (7, Role.Q_COLS, "self_attn.o_proj.weight")
    assert q3.classify("lm_head.weight").layer is None
    with pytest.raises(ValueError, match="does not know tensor"):
        ADAPTERS["LlamaForCausalLM"].classify("model.layers.0.self_attn.q_norm.weight")


def test_shape_reads_per_layer_widths_and_counts_parameters():
    cfg = tiny_config("qwen3", num_hidden_layers=2)
    shape = adapter_for(cfg).shape(cfg)
    h, i, d = 128, 384, 32
    per_layer = h * 4 * d * 2 + 2 * h * 2 * d + 3 * h * i + 2 * d + 2 * h
    assert shape.params() == 2 * 512 * h + h + 2 * per_layer
    narrow = dict(cfg, actprune_layer_widths=[
        {"intermediate_size": 10, "num_attention_heads": 2, "num_key_value_heads": 1}] * 2)
    assert adapter_for(narrow).shape(narrow).layers[1].intermediate_size == 10
