"""Pruned checkpoints for the integration tests. Stats come from the offline recorder on the
source model (transformers); plans and slices are the real planner and slicer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from actprune.core.planning.planner import make_plan
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.wire.plan import Plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import Stats
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.pruning.record import record
from serving import SOURCE_SHAPE, TEXTS, VARIANTS, load_hf, tokenize


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Stats]]:
    """arch -> an fp32 tiny checkpoint and stats recorded on it (transformers, offline recorder)."""
    out = {}
    root = tmp_path_factory.mktemp("src")
    for arch in sorted({a for a, _, _ in VARIANTS.values()}):
        src = build_checkpoint(root / arch, arch=arch, **SOURCE_SHAPE)
        cfg = json.loads((src / "config.json").read_text())
        out[arch] = src, record(load_hf(src), tokenize(src, TEXTS), model_name=str(src), config=cfg,
                                batch_size=1, progress=False)
    return out


@pytest.fixture(scope="session")
def pruned(sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Plan]]:
    """variant name -> (sliced checkpoint, plan)."""
    out = {}
    root = tmp_path_factory.mktemp("pruned")
    for name, (arch, fields, compensate) in VARIANTS.items():
        src, stats = sources[arch]
        cfg = json.loads((src / "config.json").read_text())
        plan = make_plan(stats, cfg, PlanRequest(**fields), ColumnNorms.of(src))
        ckpt = slice_checkpoint(src, plan, root / name, stats=stats if compensate else None,
                                progress=False)
        out[name] = (ckpt, plan)
    return out
