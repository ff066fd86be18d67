"""Fixtures for the client tests: random snapshots with their raw samples, and a fake server."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from actprune.client import cli
from fake_vllm import FakeState, RawLayer, random_raw, serve, stats_from_raw


@pytest.fixture(scope="module")
def raw_a() -> list[RawLayer]:
    return random_raw(np.random.default_rng(1), tokens=300)


@pytest.fixture(scope="module")
def raw_b() -> list[RawLayer]:
    return random_raw(np.random.default_rng(2), tokens=170)


@pytest.fixture(scope="module")
def server(raw_a: list[RawLayer]) -> Iterator[tuple[str, FakeState]]:
    """One fake server for read-only tests of a module (tests must not change its state)."""
    state = FakeState(stats=stats_from_raw(raw_a))
    with serve(state) as url:
        yield url, state


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch):
    """Run `actprune ARGS` in-process with only the client's commands registered (others'
    commands may be mid-work in this tree); returns the exit code."""
    monkeypatch.setattr(cli, "COMMANDS", {k: v for k, v in cli.COMMANDS.items() if k in ("collect", "stats")})
    for var in ("ACTPRUNE_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return cli.main
