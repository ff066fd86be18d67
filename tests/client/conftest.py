"""Fixtures for the client tests: random raw samples, and a fake vLLM server that has served
them (the real actprune routes over a fake engine: ``fake_vllm``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from actprune.client import cli
from fake_vllm import FakeVllm, fake_vllm, serve
from raw_samples import RawLayer, raw_a, raw_b  # noqa: F401  (fixtures offered to the tests here)


@pytest.fixture(scope="module")
def server(raw_a: list[RawLayer]) -> Iterator[tuple[str, FakeVllm]]:  # noqa: F811  (the fixture)
    """One fake server that has served ``raw_a``, for read-only tests of a module (tests must
    not change its state)."""
    srv = fake_vllm(raw_a)
    with serve(srv) as url:
        yield url, srv


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch):
    """Run `actprune ARGS` in-process with only the client's commands registered (others'
    commands may be mid-work in this tree); returns the exit code."""
    monkeypatch.setattr(cli, "COMMANDS", {k: v for k, v in cli.COMMANDS.items() if k in ("collect", "stats")})
    for var in ("ACTPRUNE_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return cli.main
