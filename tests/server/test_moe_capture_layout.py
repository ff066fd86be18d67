"""Capture on an MoE model's vLLM layout, without vLLM's engine: the real Capture, custom ops,
shard assembly and resume, over a fake two-rank model shaped like vLLM's Qwen3-MoE (layer 0
sparse: a router ``mlp.gate`` returning ``(logits, None)`` as GateLinear does; layer 1 dense:
``mlp.down_proj``). One step of three real tokens and one padding row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from actprune.core.archs import REGISTRY
from actprune.server.capture import Capture, CaptureOptions, Routing, ShardInfo
from actprune.server.snapshot import assemble
from torch import Tensor, nn
from vllm.forward_context import ForwardContext, override_forward_context

LAYOUT = REGISTRY["Qwen3MoeForCausalLM"].vllm
ROUTING = Routing(num_experts=3, top_k=2, renormalize=True)
HIDDEN, ATTN, MLP, TP = 4, 8, 6, 2
# softmax rows [1, 2, 5]/8, [4, 3, 1]/8, [2, 5, 1]/8: top-2 {2, 1}, {0, 1}, {1, 0}; row 3 pads
LOGITS = torch.log(torch.tensor([[1.0, 2, 5], [4, 3, 1], [2, 5, 1], [1, 1, 1]], dtype=torch.float64))


class _Row(nn.Linear):  # rank r's slice of a RowParallelLinear, as capture reads it
    def __init__(self, total: int, rank: int) -> None:
        super().__init__(total // TP, HIDDEN, bias=False)
        self.input_size, self.input_size_per_partition, self.tp_rank = total, total // TP, rank


class _Gate(nn.Module):
    def forward(self, logits: Tensor) -> tuple[Tensor, None]:  # vLLM's GateLinear: (logits, bias)
        return logits, None


class _Layer(nn.Module):
    def __init__(self, sparse: bool, rank: int) -> None:
        super().__init__()
        self.self_attn, self.mlp = nn.Module(), nn.Module()
        self.self_attn.o_proj = _Row(ATTN, rank)
        if sparse:
            self.mlp.gate = _Gate()
        else:
            self.mlp.down_proj = _Row(MLP, rank)

    def forward(self, positions: Tensor, hidden: Tensor, residual: Tensor | None, logits: Tensor) -> tuple:
        rows = hidden.shape[0]
        self.self_attn.o_proj(torch.ones(rows, ATTN // TP))
        if hasattr(self.mlp, "gate"):
            self.mlp.gate(logits)
        else:
            self.mlp.down_proj(torch.ones(rows, MLP // TP))
        return hidden, hidden


class _Model(nn.Module):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Layer(True, rank), _Layer(False, rank)])

    def forward(self, positions: Tensor, logits: Tensor) -> None:
        hidden, residual = torch.ones(positions.shape[0], HIDDEN), None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual, logits)


class _AttnMetadata:
    query_start_loc_cpu = torch.tensor([0, 3], dtype=torch.int32)  # one 3-token prefill


def _rank(rank: int) -> tuple[_Model, Capture]:
    model = _Model(rank)
    capture = Capture(model, LAYOUT, CaptureOptions(max_tokens=8), ShardInfo(tp_rank=rank, tp_size=TP),
                      torch.device("cpu"), HIDDEN, routing=ROUTING)
    return model, capture


def _step(model: _Model, logits: Tensor) -> None:
    ctx = ForwardContext(no_compile_layers={}, attn_metadata={"attn": _AttnMetadata()}, slot_mapping={},
                         is_padding=torch.tensor([False, False, False, True]))
    with override_forward_context(ctx):
        model(torch.arange(4), logits)


def test_router_of_rank_zero_is_the_file_s_and_resume_restores_it_exactly():
    ranks = [_rank(r) for r in range(TP)]
    for r, (model, _) in enumerate(ranks):
        # the router is replicated: ranks see the same logits; rank 1's are garbage here, to show
        # that the snapshot takes rank 0's, as it does the residual-stream figures
        _step(model, LOGITS if r == 0 else -LOGITS)
    stats = assemble([c.snapshot() for _, c in ranks], {"model": "m", "architecture": "a", "config_hash": "h"})
    router = stats.router(0)
    assert stats.router(1) is None and stats.group(1, "mlp")["sum"].shape == (MLP,)
    assert float(router["count"]) == 3 and float(stats.group(0, "attn")["count"]) == 3
    np.testing.assert_array_equal(router["topk_count"], [2, 3, 1])
    # the step buffer keeps logits in float32 (a model's own are float32 or bfloat16: exact
    # there); these float64 logs round to float32's 1e-7
    np.testing.assert_allclose(router["weight_sum"], [6 / 7, 10 / 7, 5 / 7], rtol=1e-6)
    np.testing.assert_allclose(router["prob_sum"], [7 / 8, 10 / 8, 7 / 8], rtol=1e-6)

    fresh = [_rank(r)[1] for r in range(TP)]
    for c in fresh:
        c.load(stats.to_bytes())
    again = assemble([c.snapshot() for c in fresh], {"model": "m", "architecture": "a", "config_hash": "h"})
    for f, v in router.items():
        np.testing.assert_array_equal(again.router(0)[f], v)


def test_a_router_without_the_model_s_routing_or_sequence_parallel_is_refused():
    with pytest.raises(RuntimeError, match="no routing"):
        Capture(_Model(0), LAYOUT, CaptureOptions(max_tokens=8), ShardInfo(), torch.device("cpu"), HIDDEN)
    model = _Model(0)
    model.model.layers[0].mlp.is_sequence_parallel = True
    with pytest.raises(RuntimeError, match="sequence-parallel MoE"):
        Capture(model, LAYOUT, CaptureOptions(max_tokens=8), ShardInfo(), torch.device("cpu"), HIDDEN,
                routing=ROUTING)

