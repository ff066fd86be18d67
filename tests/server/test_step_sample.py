"""Sampled capture (``step_sample`` < 1) on the real Capture and ops, without vLLM's engine.

A small model shaped like vLLM's dense Qwen3 layers (``o_proj`` and ``down_proj`` inputs, the
residual stream) runs steps of different lengths inside a forward context that says how many
tokens each step has, as vLLM's does. The statistics of a sampling capture must be *bit for
bit* those of an exact capture given only the steps the seeded draw picked (the same rows in
the same order, so the same folds), the tokens of the others counted apart; steps it skips,
and paused steps, must not reach the step buffers at all (that is what makes them cheap). The
real-server version (every statistic against float64 transformers) is in
``test_capture_fidelity.py``."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from actprune.core.archs import REGISTRY
from actprune.server.capture import Capture, CaptureOptions, Routing, ShardInfo
from actprune.server.snapshot import assemble
from torch import Tensor, nn
from vllm.forward_context import ForwardContext, override_forward_context

LAYOUT = REGISTRY["Qwen3ForCausalLM"].vllm
MOE_LAYOUT = REGISTRY["Qwen3MoeForCausalLM"].vllm
HIDDEN, ATTN, MLP, EXPERTS = 4, 8, 6, 5
ROUTING = Routing(num_experts=EXPERTS, top_k=2, renormalize=True)
META = {"model": "m", "architecture": "Qwen3ForCausalLM", "config_hash": "h"}


class _Row(nn.Linear):  # a RowParallelLinear of one rank, as capture reads it
    def __init__(self, total: int) -> None:
        super().__init__(total, HIDDEN, bias=False)
        self.input_size, self.input_size_per_partition, self.tp_rank = total, total, 0


class _Gate(nn.Module):  # vLLM's GateLinear as capture reads it: (T, E) logits and a bias
    output_size = EXPERTS

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return torch.tan(x * torch.arange(1.0, EXPERTS + 1)), None  # (T, E)


class _Layer(nn.Module):
    def __init__(self, k: int, routed: bool = False) -> None:
        super().__init__()
        self.k = k
        self.self_attn, self.mlp = nn.Module(), nn.Module()
        self.self_attn.o_proj = _Row(ATTN)
        if routed:  # an MoE layer: a router, no down_proj tap
            self.mlp.gate = _Gate()
        else:
            self.mlp.down_proj = _Row(MLP)

    def forward(self, positions: Tensor, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        x = hidden.sum(1, keepdim=True)  # (T, 1): every tap depends on the step's rows
        self.self_attn.o_proj(torch.sin(x * torch.arange(1.0, ATTN + 1) + self.k))
        if hasattr(self.mlp, "gate"):
            self.mlp.gate(x - self.k)
        else:
            self.mlp.down_proj(torch.cos(x * torch.arange(1.0, MLP + 1) - self.k))
        return hidden * 0.5 + self.k, hidden


class _Model(nn.Module):
    def __init__(self, moe: bool = False) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Layer(0), _Layer(1, routed=moe)])  # moe: layer 1 routes

    def forward(self, positions: Tensor, hidden: Tensor) -> None:
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual)


class _AttnMetadata:
    def __init__(self, queries: list[int]) -> None:
        self.query_start_loc_cpu = torch.tensor([0, *np.cumsum(queries)], dtype=torch.int32)


def _capture(moe: bool = False, **options) -> tuple[_Model, Capture]:
    model = _Model(moe)
    return model, Capture(model, MOE_LAYOUT if moe else LAYOUT, CaptureOptions(max_tokens=64, **options),
                          ShardInfo(), torch.device("cpu"), HIDDEN, ROUTING if moe else None)


def _step(model: _Model, queries: list[int], seed: int) -> None:
    """One forward step: requests of ``queries`` tokens (1: a decode), rows drawn from ``seed``."""
    t = sum(queries)
    hidden = torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(seed))
    ctx = ForwardContext(no_compile_layers={}, attn_metadata={"attn": _AttnMetadata(queries)}, slot_mapping={})
    with override_forward_context(ctx):
        model(torch.arange(t), hidden)


# prefills, decode batches and mixed steps; 20 steps, 3 to 9 rows (16 rows gather before a fold)
STEPS = [[5], [1, 1, 1], [1, 4], [1, 1], [7], [1, 1, 1, 1], [3], [1, 1, 2], [1], [6, 1],
         [1, 1, 1], [2, 2], [1, 1], [9], [1, 1, 1, 1, 1], [4], [1, 3], [1, 1], [5, 1], [1, 1, 1]]


def _split(queries: list[int]) -> tuple[int, int]:
    decode = sum(1 for q in queries if q == 1)
    return sum(queries) - decode, decode


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_sampled_stats_equal_an_exact_capture_of_the_drawn_steps_bit_for_bit(moe):
    p, seed = 0.4, 11
    draws = random.Random(seed)
    drawn = [draws.random() < p for _ in STEPS]
    assert 0 < sum(drawn) < len(STEPS)  # the draw keeps some steps and skips some

    model, sampled = _capture(moe, step_sample=p, sample_seed=seed)
    ref_model, exact = _capture(moe)
    for k, (queries, keep) in enumerate(zip(STEPS, drawn, strict=True)):
        _step(model, queries, seed=k)
        if keep:
            _step(ref_model, queries, seed=k)

    meta = {**META, "architecture": "Qwen3MoeForCausalLM"} if moe else META
    got, want = (assemble([c.snapshot()], meta) for c in (sampled, exact))
    assert set(got.tensors) == set(want.tensors)
    if moe:  # the router's statistics are there, and counted the drawn steps' tokens
        routed = want.router(1)
        assert float(routed["count"]) == sum(sum(q) for q, keep in zip(STEPS, drawn, strict=True) if keep)
        assert float(routed["topk_count"].sum()) == 2 * float(routed["count"])
    for name, v in want.tensors.items():
        np.testing.assert_array_equal(got.tensors[name], v, err_msg=name)
    covered = [_split(q) for q, keep in zip(STEPS, drawn, strict=True) if keep]
    skipped = sum(sum(q) for q, keep in zip(STEPS, drawn, strict=True) if not keep)
    st = sampled.status()
    assert (st["tokens_prefill"], st["tokens_decode"]) == tuple(map(sum, zip(*covered, strict=True)))
    assert st["tokens_unsampled"] == skipped and st["step_sample"] == p
    assert got.meta["tokens_unsampled"] == skipped and "tokens_unsampled" not in want.meta
    assert float(got.group(0, "mlp")["count"]) == st["tokens_prefill"] + st["tokens_decode"]

    # a restart folds the saved file back in, token counts included
    _, again = _capture(moe, step_sample=p, sample_seed=seed)
    again.load(got.to_bytes())
    assert again.status()["tokens_unsampled"] == skipped


def _buffers(cap: Capture) -> list[Tensor]:
    return [cap.bufs.chan.clone(), cap.bufs.stream.clone(), cap.bufs.routers.clone()]


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_skipped_and_paused_steps_never_reach_the_step_buffers(moe):
    model, cap = _capture(moe, step_sample=0.5, sample_seed=3)
    assert cap.bufs.routers.numel() > 0 if moe else cap.bufs.routers.numel() == 0
    draws = random.Random(3)
    rows = 0
    for k, queries in enumerate(STEPS[:6]):
        keep = draws.random() < 0.5
        buffers = _buffers(cap)
        _step(model, queries, seed=k)
        if not keep:  # nothing copied: the rows past the cursor are as they were
            assert _same(_buffers(cap), buffers)
        if keep:  # a CPU's rows wait in the buffers until fold_rows of them are there
            rows = 0 if rows + sum(queries) >= cap.bufs.fold_rows else rows + sum(queries)
        assert int(cap.bufs.cursor[0]) == rows, f"step {k} (drawn: {keep})"
    cursor, before = int(cap.bufs.cursor[0]), _buffers(cap)
    cap.pause()
    for k, queries in enumerate(STEPS[6:10]):
        _step(model, queries, seed=100 + k)
    assert int(cap.bufs.cursor[0]) == cursor and _same(_buffers(cap), before)
    st = cap.status()
    assert st["tokens_unsampled"] == sum(sum(q) for q in STEPS[:6]) - st["tokens_prefill"] - st["tokens_decode"]


def test_a_step_cut_short_takes_its_unsampled_tokens_back():
    model, cap = _capture(step_sample=0.5, sample_seed=0)
    draws = random.Random(0)
    k = next(k for k in range(50) if draws.random() >= 0.5)  # the first step the draw skips
    for j in range(k):
        _step(model, [1, 1], seed=j)
    before = cap.status()["tokens_unsampled"]
    cap._on_step(model, (), {})  # outside a forward context: a dummy run, nothing drawn
    assert cap.status()["tokens_unsampled"] == before
    ctx = ForwardContext(no_compile_layers={}, attn_metadata={"attn": _AttnMetadata([3])}, slot_mapping={})
    with override_forward_context(ctx):
        cap._on_step(model, (), {})  # the skipped step opens, then is cut short before its end
    assert cap.status()["tokens_unsampled"] == before + 3
    assert cap.settle_step()
    assert cap.status()["tokens_unsampled"] == before


@pytest.mark.parametrize("p", [0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_step_sample_outside_zero_one_is_refused(p):
    with pytest.raises(ValueError, match="step_sample"):
        CaptureOptions(step_sample=p)


def test_sampling_is_refused_where_cuda_graphs_replay_the_ops():
    with pytest.raises(ValueError, match="CPU servers"):
        Capture(_Model(), LAYOUT, CaptureOptions(step_sample=0.5), ShardInfo(), torch.device("meta"), HIDDEN)
