"""Fixtures for the pruning tests: tiny checkpoints of each architecture, stats recorded on them,
and data files (all built once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from actprune.core.wire.stats import Stats
from actprune.pruning.fixtures.synthetic import build_checkpoint
from pruning_helpers import SENTENCES, SHAPE, record_stats


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


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3", arch="qwen3")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", seed=3)


@pytest.fixture(scope="session")
def pr_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """{"prompt", "response"} records; responses repeat so a few steps can fit them."""
    path = tmp_path_factory.mktemp("data") / "pr.jsonl"
    with path.open("w") as f:
        for i in range(24):
            s = SENTENCES[i % len(SENTENCES)]
            f.write(json.dumps({"prompt": f"Say sentence {i}.", "response": s}) + "\n")
    return path


@pytest.fixture(scope="session")
def tour_jsonl() -> Path:
    """60 short {"prompt", "response"} records of a tour guide: the size of a new user's file."""
    return Path(__file__).parent / "data" / "tour_guide.jsonl"
