"""bench/decode_throughput.py: the MoE ideal (parameters a decode step reads, from routing
frequencies), and the decode rate of a stream."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import decode_throughput  # noqa: E402
from actprune.core.archs import model_shape  # noqa: E402
from actprune.core.wire.schema import group_prefix  # noqa: E402
from actprune.core.wire.stats import Stats  # noqa: E402
from actprune.pruning.fixtures.synthetic import tiny_config  # noqa: E402

E, K, H, W = 8, 2, 64, 32


def _config(experts: int = E) -> dict:
    return tiny_config("qwen3_moe", hidden_size=H, num_experts=experts, num_experts_per_tok=K,
                       moe_intermediate_size=W, num_hidden_layers=2)


def _stats(freqs: list[np.ndarray], tokens: float = 1000.0) -> Stats:
    """Router groups only: what moe_read_per_step reads."""
    tensors = {}
    for i, f in enumerate(freqs):
        p = group_prefix(i, "router")
        tensors[p + "count"] = np.float64(tokens)
        tensors[p + "topk_count"] = np.asarray(f, dtype=np.float64) * tokens
        tensors[p + "weight_sum"] = tensors[p + "prob_sum"] = tensors[p + "topk_count"] / K
    return Stats(tensors)


def test_batch_one_reads_the_active_experts_and_a_large_batch_reads_them_all():
    cfg = _config()
    shape = model_shape(cfg)
    expert = 3 * H * W
    dense_part = shape.params() - 2 * E * expert  # two sparse layers of E experts
    uniform = [np.full(E, K / E)] * 2
    assert decode_throughput.moe_read_per_step(cfg, _stats(uniform), 1) == pytest.approx(dense_part + 2 * K * expert)
    assert decode_throughput.moe_read_per_step(cfg, _stats(uniform), 10_000) == pytest.approx(shape.params())
    # an expert nobody picks is never read; one every token picks always is
    skewed = [np.array([1.0, 1.0, 0, 0, 0, 0, 0, 0])] * 2
    assert decode_throughput.moe_read_per_step(cfg, _stats(skewed), 64) == pytest.approx(dense_part + 2 * 2 * expert)


def test_expert_pruning_is_worth_about_nothing_at_batch_one_and_its_bytes_at_large_batch():
    base, half = _config(E), _config(E // 2)
    read = decode_throughput.moe_read_per_step
    b1 = read(base, _stats([np.full(E, K / E)] * 2), 1) / read(half, _stats([np.full(E // 2, K / (E // 2))] * 2), 1)
    big = read(base, _stats([np.full(E, K / E)] * 2), 4096) / read(half, _stats([np.full(E // 2, K / (E // 2))] * 2), 4096)
    assert b1 == pytest.approx(1.0, rel=0.01)  # only the removed router rows are saved
    assert b1 > 1.0
    assert big == pytest.approx(model_shape(base).params() / model_shape(half).params())


def test_a_stream_rate_counts_tokens_after_the_first_and_refuses_chunks_read_in_one_go():
    assert decode_throughput.stream_rate([1.0, 1.1, 1.2, 1.5]) == pytest.approx(6.0)  # 3 tokens in 0.5 s
    with pytest.raises(RuntimeError, match="read in one go"):
        decode_throughput.stream_rate([1.0, 1.0 + 1e-6, 1.0 + 2e-6, 1.0 + 3e-6])
    with pytest.raises(RuntimeError, match="got 1 streamed chunks"):
        decode_throughput.stream_rate([1.0])


def test_a_stream_read_in_one_go_is_measured_again_and_the_last_refusal_is_raised(capsys):
    calls = []

    def flaky(fail: int):
        def fn():
            calls.append(1)
            if len(calls) <= fail:
                decode_throughput.stream_rate([1.0, 1.0 + 1e-6, 1.0 + 2e-6], "m")  # refused
            return 7.0
        return fn

    assert decode_throughput.retried(flaky(2)) == 7.0 and len(calls) == 3
    assert "measuring that stream again" in capsys.readouterr().out
    calls.clear()
    with pytest.raises(decode_throughput.ReadInOneGo):
        decode_throughput.retried(flaky(3))
    assert len(calls) == 3
    calls.clear()

    def broken():  # any other failure is not retried
        calls.append(1)
        raise RuntimeError("server gone")

    with pytest.raises(RuntimeError, match="server gone"):
        decode_throughput.retried(broken)
    assert len(calls) == 1
