"""Fixtures for pruning tests: tiny checkpoints of each architecture and stats recorded on them."""

from __future__ import annotations

from pathlib import Path

import pytest
from actprune.client.wire.stats import Stats
from actprune.pruning.synthetic import build_checkpoint
from pruning_helpers import SHAPE, record_stats


@pytest.fixture(scope="session", params=["qwen3", "qwen2", "llama"])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """arch -> tiny fp32 checkpoint directory (built once per session)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {a: build_checkpoint(root / a, arch=a, **SHAPE) for a in ("qwen3", "qwen2", "llama")}


@pytest.fixture(scope="session")
def stats_for(checkpoints) -> dict[str, Stats]:
    return {a: record_stats(d) for a, d in checkpoints.items()}
