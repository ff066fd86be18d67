"""Known activations, the statistics they must give (computed directly with numpy), and the
comparisons tests make against them.

Tests feed raw samples to a server (through :mod:`fake_engine`, which runs actprune's real
capture over them) and compare what the server answers against :func:`stats_from_raw`: whole
arrays reduced in float64, no streaming, no Chan merge, nothing from actprune's accumulators,
so a bug in the streaming maths cannot hide in both sides of a comparison.

Values are float32 numbers (what a bf16/fp32 model hands the capture hooks), held in float64
here; the reference is exact on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from actprune.core.wire.stats import Stats

__all__ = [
    "raw_a",
    "raw_b",
    "DECODE_SHARE",
    "THRESHOLD",
    "RawLayer",
    "accumulate",
    "assert_json_close",
    "assert_stats_match",
    "concat",
    "random_raw",
    "split_tokens",
    "stats_from_raw",
]

THRESHOLD = 1e-3  # the capture's default near-zero threshold
DECODE_SHARE = 0.25  # share of the tokens of a raw sample that are generated (decode)


@dataclass
class RawLayer:
    mlp: np.ndarray  # (T, I) inputs of down_proj
    attn: np.ndarray  # (T, H*D) inputs of o_proj
    cos: np.ndarray  # (T,) cosine of residual in/out

    @property
    def tokens(self) -> int:
        return len(self.cos)


def split_tokens(tokens: int, decode_share: float = DECODE_SHARE) -> tuple[int, int]:
    """(prefill, decode) token counts of a sample of ``tokens`` tokens."""
    decode = int(tokens * decode_share)
    return tokens - decode, decode


def accumulate(x: np.ndarray, threshold: float = THRESHOLD) -> dict[str, np.ndarray]:
    """The accumulator group of raw samples x: (T, C), computed directly with numpy."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    return {
        "count": np.asarray(float(len(x))),
        "mean": mean,
        "m2": ((x - mean) ** 2).sum(axis=0),
        "sum": x.sum(axis=0),
        "sum_sq": (x * x).sum(axis=0),
        "sum_abs": np.abs(x).sum(axis=0),
        "max_abs": np.abs(x).max(axis=0).astype(np.float32) if len(x) else np.zeros(x.shape[1], np.float32),
        "near_zero": (np.abs(x) <= threshold).sum(axis=0).astype(np.float64),
    }


def random_raw(
    rng: np.random.Generator, tokens: int, layers: int = 3, mlp: int = 48, heads: int = 4, head_dim: int = 8
) -> list[RawLayer]:
    """Activations with the features that matter: dead neurons (exact zeros), a large offset on
    some channels (where naive variance would cancel), heavy tails."""
    out = []
    for _ in range(layers):
        m = rng.standard_t(df=3, size=(tokens, mlp))
        m[:, :5] *= rng.random((tokens, 5)) < 0.05  # mostly-dead neurons
        m[:, 5:8] += 1e4
        a = rng.standard_normal((tokens, heads * head_dim)) * rng.uniform(0.1, 2.0, heads * head_dim)
        cos = rng.uniform(0.5, 1.0, tokens)
        out.append(RawLayer(mlp=_f32(m), attn=_f32(a), cos=_f32(cos)))
    return out


@pytest.fixture(scope="module")
def raw_a() -> list[RawLayer]:
    """300 tokens of random samples (a conftest imports this fixture to offer it)."""
    return random_raw(np.random.default_rng(1), tokens=300)


@pytest.fixture(scope="module")
def raw_b() -> list[RawLayer]:
    """170 other tokens, for merges and resets."""
    return random_raw(np.random.default_rng(2), tokens=170)


def concat(*raws: list[RawLayer]) -> list[RawLayer]:
    """The union of samples, layer by layer."""
    return [RawLayer(mlp=np.concatenate([r[i].mlp for r in raws]), attn=np.concatenate([r[i].attn for r in raws]),
                     cos=np.concatenate([r[i].cos for r in raws])) for i in range(len(raws[0]))]


def stats_from_raw(raw: list[RawLayer], *, model: str = "tiny/qwen3", config_hash: str = "abc123",
                   head_dim: int | None = 8, decode_share: float = DECODE_SHARE) -> Stats:
    """The stats file a server that saw ``raw`` must hold."""
    tensors: dict[str, np.ndarray] = {}
    for i, layer in enumerate(raw):
        for kind, x in (("mlp", layer.mlp), ("attn", layer.attn)):
            tensors.update({f"layers.{i}.{kind}.{f}": v for f, v in accumulate(x).items()})
        tensors[f"layers.{i}.block.cos_sum"] = np.asarray(np.asarray(layer.cos, np.float64).sum())
        tensors[f"layers.{i}.block.count"] = np.asarray(float(len(layer.cos)))
    prefill, decode = split_tokens(len(raw[0].cos), decode_share)
    meta: dict[str, Any] = {
        "format": "actprune.stats", "format_version": 1, "model": model, "architecture": "Qwen3ForCausalLM",
        "config_hash": config_hash, "tensor_parallel_size": 1, "near_zero_threshold": THRESHOLD,
        "tokens_prefill": prefill, "tokens_decode": decode,
    }
    if head_dim is not None:
        meta["head_dim"] = head_dim
    return Stats(tensors=tensors, meta=meta)


def _f32(x: np.ndarray) -> np.ndarray:
    """Round to float32 numbers, kept as float64 (the reference computes on these exactly)."""
    return x.astype(np.float32).astype(np.float64)


def assert_stats_match(got: Stats, want: Stats, *, rtol: float = 1e-6) -> None:
    """Every accumulator of ``want`` is in ``got``: counts, maxima and near-zero counts exactly,
    the rest within ``rtol`` (a stats file holds them as float32, and the capture sums in float32
    products). ``got`` holds no tensor that ``want`` lacks."""
    assert sorted(got.tensors) == sorted(want.tensors)
    for name, w in want.tensors.items():
        if name.endswith((".count", ".max_abs", ".near_zero")):
            np.testing.assert_array_equal(got.tensors[name], w, err_msg=name)
        else:
            np.testing.assert_allclose(got.tensors[name], w, rtol=rtol, atol=1e-9, err_msg=name)


def assert_json_close(got: Any, want: Any, where: str = "") -> None:
    """JSON values equal: strings, ints, None and structure exactly, floats to 1e-6 (summaries
    of a stats file and of the numpy reference differ by float32 rounding)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for k in want:
            assert_json_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_json_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float) and abs(got - want) <= 1e-6 * abs(want) + 1e-12, (where, got, want)
    else:
        assert got == want and type(got) is type(want), (where, got, want)
