"""The architecture registry: config -> spec, names -> roles, config -> shape, and clear errors
for what actprune cannot handle."""

from __future__ import annotations

import pytest
from actprune.core.archs import (
    ACTPRUNE_ARCHITECTURE,
    REGISTRY,
    Role,
    UnsupportedArchitecture,
    model_shape,
    spec_for_architecture,
    spec_for_config,
)
from actprune.core.errors import ActpruneError
from actprune.pruning.fixtures.synthetic import ARCHS, tiny_config


def test_every_family_is_found_by_its_config_and_a_pruned_checkpoint_by_its_base():
    for arch in ARCHS:
        cfg = tiny_config(arch)
        assert spec_for_config(cfg) is REGISTRY[cfg["architectures"][0]]
        assert spec_for_config(cfg).model_type == cfg["model_type"]
    pruned = {"architectures": [ACTPRUNE_ARCHITECTURE], "actprune_base_architecture": "Qwen2ForCausalLM"}
    assert spec_for_config(pruned) is REGISTRY["Qwen2ForCausalLM"]
    assert spec_for_architecture(ACTPRUNE_ARCHITECTURE, "MistralForCausalLM") is REGISTRY["MistralForCausalLM"]


def test_unknown_architecture_is_a_user_error_naming_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match="Qwen3ForCausalLM") as e:
        spec_for_config({"architectures": ["GPT2LMHeadModel"]})
    assert isinstance(e.value, ActpruneError)
    with pytest.raises(UnsupportedArchitecture, match="no `architectures`"):
        spec_for_config({})
    with pytest.raises(UnsupportedArchitecture):  # a pruned checkpoint of an unknown base
        spec_for_architecture(ACTPRUNE_ARCHITECTURE, "GPT2LMHeadModel")


def test_roles_of_family_specific_tensors():
    q3, q2, llama = REGISTRY["Qwen3ForCausalLM"], REGISTRY["Qwen2ForCausalLM"], REGISTRY["LlamaForCausalLM"]
    assert q3.classify("model.layers.7.self_attn.q_norm.weight").role is Role.COPY
    assert q2.classify("model.layers.0.self_attn.k_proj.bias").role is Role.KV_ROWS
    assert q2.classify("model.layers.0.mlp.down_proj.weight").role is Role.NEURON_COLS
    assert q2.classify("model.layers.3.mlp.gate_proj.weight").role is Role.NEURON_ROWS
    ref = q3.classify("model.layers.7.self_attn.o_proj.weight")
    assert (ref.layer, ref.role, ref.suffix) == (7, Role.Q_COLS, "self_attn.o_proj.weight")
    assert q3.classify("lm_head.weight").layer is None
    # compensation biases of an already pruned checkpoint are copied
    assert llama.classify("model.layers.1.mlp.down_proj.bias").role is Role.COPY
    with pytest.raises(ValueError, match="does not know tensor"):
        llama.classify("model.layers.0.self_attn.q_norm.weight")  # Llama has no q_norm
    with pytest.raises(ValueError, match="does not know tensor"):
        llama.classify("model.layers.0.self_attn.k_proj.bias")  # nor q/k/v biases


def test_shape_reads_per_layer_widths_and_counts_parameters():
    cfg = tiny_config("qwen3", num_hidden_layers=2)
    shape = model_shape(cfg)
    h, i, d = 128, 384, 32
    per_layer = h * 4 * d * 2 + 2 * h * 2 * d + 3 * h * i + 2 * d + 2 * h  # q,o + k,v + MLP + q/k norms + norms
    assert shape.params() == 2 * 512 * h + h + 2 * per_layer
    narrow = dict(cfg, actprune_layer_widths=[
        {"intermediate_size": 10, "num_attention_heads": 2, "num_key_value_heads": 1}] * 2)
    assert model_shape(narrow).layers[1].intermediate_size == 10
    assert model_shape(narrow).mlp_widths == [10, 10]
    with pytest.raises(ValueError, match="2 entries for 3 layers"):
        model_shape(dict(narrow, num_hidden_layers=3, actprune_layer_widths=narrow["actprune_layer_widths"][:1] * 2))
