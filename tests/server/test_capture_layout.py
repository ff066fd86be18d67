"""Capture layout: which decoder layers a rank owns, and where their channels sit."""

from __future__ import annotations

import pytest
from actprune.core.archs import REGISTRY, spec_for_architecture
from actprune.server.layout import decoder_layers, partition
from torch import nn
from vllm.model_executor.models.utils import PPMissingLayer


def _layer() -> nn.Module:
    layer = nn.Module()
    layer.mlp, layer.self_attn = nn.Module(), nn.Module()
    layer.mlp.down_proj = nn.Linear(8, 4)
    layer.self_attn.o_proj = nn.Linear(4, 4)
    return layer


def test_pipeline_stage_reports_only_its_own_layers_with_global_indices():
    # vLLM fills the layers another pipeline stage owns with PPMissingLayer placeholders.
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([PPMissingLayer(), PPMissingLayer(), _layer(), _layer()])
    owned = decoder_layers(model, REGISTRY["Qwen3ForCausalLM"].vllm)
    assert [i for i, _ in owned] == [2, 3]


def test_tensor_parallel_partition_comes_from_layer_attributes_not_weight_shape():
    class Row(nn.Module):  # RowParallelLinear's attributes; the CPU backend may repack weights
        input_size, input_size_per_partition, tp_rank = 384, 192, 1

    assert partition(Row()) == (192, 192, 384)
    assert partition(nn.Linear(16, 3)) == (0, 16, 16)


def test_unknown_architecture_is_refused_with_the_supported_list():
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        spec_for_architecture("GPT2LMHeadModel")
