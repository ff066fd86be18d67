"""Tiny checkpoints and data files shared by the recovery tests (built once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from actprune.pruning.synthetic import build_checkpoint

SENTENCES = [
    "The old harbour town lies at the mouth of the river.",
    "Visitors walk along the stone walls, past the cathedral and the market square.",
    "Pruning removes neurons, attention heads or whole layers to make a model smaller.",
    "The museum opens at nine in the morning and closes at six in the evening.",
    "Rivers, mountains and forests cover most of the northern province.",
    "Please book a table for two at the restaurant near the bridge.",
]


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
