"""Fixtures shared by the compensation tests."""

from __future__ import annotations

import json

import pytest
from actprune.core.planning.planner import make_plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.pruning.fixtures.synthetic import build_checkpoint
from pruning_helpers import SHAPE, record_stats


@pytest.fixture(scope="session")
def llama_quarter(tmp_path_factory):
    """(a tiny Llama checkpoint, a plan taking a quarter of its MLP neurons by magnitude)."""
    d = build_checkpoint(tmp_path_factory.mktemp("quarter") / "llama", arch="llama", **SHAPE)
    plan = make_plan(record_stats(d), json.loads((d / "config.json").read_text()),
                     PlanRequest(strategy="magnitude", mlp_ratio=0.25), d)
    return d, plan
