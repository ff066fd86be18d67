"""actprune's real HTTP routes, in-process (httpx.ASGITransport), over a fake engine client.

The routes, service, shard assembly, worker RPC methods and capture are the real ones; the
engine is :class:`fake_engine.FakeEngineClient`, which runs the capture over known raw samples.
Every figure is compared against numpy on those samples (:mod:`raw_samples`) or against the
planner called directly. The same routes on a real vLLM server: ``test_api.py`` (slow).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from actprune.core.config import read_config
from actprune.core.planning.planner import make_plan
from actprune.core.summary import summarize
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.wire.api import SAFETENSORS_MEDIA_TYPE
from actprune.core.wire.plan import Plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import Stats, config_hash
from actprune.pruning.fixtures.synthetic import build_checkpoint
from fake_engine import FakeEngineClient, actprune_app, config_for
from fastapi import FastAPI
from raw_samples import (
    RawLayer,
    assert_json_close,
    assert_stats_match,
    concat,
    stats_from_raw,
)

OPERATIONS = [("GET", "/activations/stats"), ("GET", "/activations/status"), ("GET", "/activations/metrics"),
              ("POST", "/activations/reset"), ("POST", "/activations/pause"), ("POST", "/activations/resume"),
              ("POST", "/prune/plan")]
PLAN_BODY = {"strategy": "importance", "mlp_ratio": 0.25}


def _engine(raw: list[RawLayer], *, feed: bool = True, **kw: Any) -> FakeEngineClient:
    """An engine for a model shaped like ``raw`` that has served it (``feed``) or nothing yet."""
    engine = FakeEngineClient(config_for(raw), **kw)
    if feed:
        engine.feed(raw)
    return engine


def _app(engine: FakeEngineClient, tmp_path: Path, keys: tuple[str, ...] = ()) -> FastAPI:
    return actprune_app(engine, snapshot_dir=tmp_path / "snapshots", api_keys=keys)


def call(app: FastAPI, method: str, path: str, **kw: Any) -> httpx.Response:
    """One request to the app in-process (no socket), as vLLM's serving tests drive theirs."""

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vllm") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def _stats(app: FastAPI) -> Stats:
    r = call(app, "GET", "/activations/stats", params={"format": "safetensors"})
    assert r.status_code == 200 and r.headers["content-type"] == SAFETENSORS_MEDIA_TYPE
    return Stats.from_bytes(r.content)


def _reference(engine: FakeEngineClient, raw: list[RawLayer]) -> Stats:
    return stats_from_raw(raw, model=engine.served_model_name, config_hash=config_hash(engine.config))


def test_openapi_describes_every_actprune_route_with_its_models(raw_a, tmp_path):
    spec = _app(_engine(raw_a, feed=False), tmp_path).openapi()
    assert {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops} == set(OPERATIONS)
    schemas = spec["components"]["schemas"]
    assert {"StatsSummary", "StatusResponse", "ResetResponse", "PauseResponse", "Plan", "ErrorBody"} <= set(schemas)
    ok = spec["paths"]["/activations/status"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"]["$ref"].endswith("/StatusResponse")
    assert "PlanRequest" in str(spec["paths"]["/prune/plan"]["post"]["requestBody"])


@pytest.mark.parametrize("tp", [1, 2])
def test_stats_summary_and_file_equal_numpy_on_the_raw_samples(raw_a, tmp_path, tp):
    engine = _engine(raw_a, tp_size=tp)
    app, want = _app(engine, tmp_path), _reference(engine, raw_a)
    r = call(app, "GET", "/activations/stats", params={"k": 3})
    assert r.status_code == 200
    assert_json_close(r.json()["layers"], summarize(want, k=3).model_dump(mode="json")["layers"])
    got = _stats(app)
    assert_stats_match(got, want)
    assert (got.tokens, got.meta["tokens_decode"]) == (300, 75)
    assert got.meta["config_hash"] == want.meta["config_hash"] and got.meta["tensor_parallel_size"] == tp
    assert engine.calls == [("actprune_snapshot", ())] * 2


@pytest.mark.parametrize("stash_mib", [256, 0], ids=["stashed", "tap-by-tap"])
def test_decode_steps_replayed_as_full_cuda_graphs_are_counted(raw_a, tmp_path, stash_mib):
    # vLLM on a GPU replays decode-only batches as full CUDA graphs: no hook around the model
    # runs, so its pre-hook cannot count their tokens; the ops recorded in the graph count them
    engine = _engine(raw_a, feed=False, full_graph_decodes=True, stash_mib=stash_mib)
    engine.feed(raw_a, decode=150)  # prefill chunks carry 48 decodes; 102 in decode-only steps
    app, want = _app(engine, tmp_path), _reference(engine, raw_a)
    assert engine.ranks[0].capture.hookless_tokens() == 102
    got = _stats(app)
    assert_stats_match(got, want)
    assert (got.tokens, got.meta["tokens_prefill"], got.meta["tokens_decode"]) == (300, 150, 150)
    st = call(app, "POST", "/activations/reset", json={}).json()["status"]
    assert st["tokens_prefill"] == st["tokens_decode"] == 0  # the replays' count starts again too


def test_steps_run_while_a_cuda_graph_is_captured_neither_arm_nor_count(raw_a, tmp_path, monkeypatch):
    # vLLM captures its full decode graphs on dummy batches with attention metadata, before any
    # request: no GPU here, so the capture check is made to answer "capturing" for one feed
    engine = _engine(raw_a, feed=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    engine.feed(raw_a)
    cap = engine.ranks[0].capture
    assert not cap.started and cap.tokens_prefill == cap.tokens_decode == 0
    monkeypatch.undo()
    engine.feed(raw_a)  # the first real traffic: armed from here
    got = _stats(_app(engine, tmp_path))
    assert_stats_match(got, _reference(engine, raw_a))
    assert (got.tokens, got.meta["tokens_decode"]) == (300, 75)


def test_tp2_shards_assemble_to_the_same_file_as_tp1(raw_a, tmp_path):
    one, two = (_stats(_app(_engine(raw_a, tp_size=tp), tmp_path)) for tp in (1, 2))
    assert sorted(one.tensors) == sorted(two.tensors)
    for name, t in one.tensors.items():
        np.testing.assert_array_equal(two.tensors[name], t, err_msg=name)
    varying = {"created", "taken_at", "window_start", "tensor_parallel_size", "instance_id"}
    assert {k: v for k, v in one.meta.items() if k not in varying} == \
           {k: v for k, v in two.meta.items() if k not in varying}


def test_pause_resume_and_reset_reach_every_rank_and_change_what_stats_show(raw_a, raw_b, tmp_path):
    engine = _engine(raw_a, tp_size=2)
    app = _app(engine, tmp_path)
    st = call(app, "POST", "/activations/pause", json={}).json()["status"]
    assert st["paused"] and not st["capturing"] and st["tokens_prefill"] + st["tokens_decode"] == 300
    assert all(r.capture.paused for r in engine.ranks)
    engine.feed(raw_b)  # served while paused: not counted
    assert_stats_match(_stats(app), _reference(engine, raw_a))
    st = call(app, "POST", "/activations/resume", json={}).json()["status"]
    assert not st["paused"] and st["capturing"]
    engine.feed(raw_b)
    both = _stats(app)
    assert_stats_match(both, _reference(engine, concat(raw_a, raw_b)))
    assert both.tokens == 470
    st = call(app, "POST", "/activations/reset", json={}).json()["status"]
    assert st["tokens_prefill"] == st["tokens_decode"] == 0 and st["window_start"] >= both.meta["window_start"]
    zero = _stats(app)
    assert zero.tokens == 0 and all(float(zero.tensors[n]) == 0 for n in zero.tensors if n.endswith(".count"))
    engine.feed(raw_b)
    assert_stats_match(_stats(app), _reference(engine, raw_b))
    assert engine.methods == ["actprune_pause", "actprune_snapshot", "actprune_resume", "actprune_snapshot",
                              "actprune_reset", "actprune_snapshot", "actprune_snapshot"]


def test_every_route_refuses_a_missing_wrong_or_non_bearer_key(raw_a, tmp_path):
    engine = _engine(raw_a)
    app = _app(engine, tmp_path, keys=("k1", "k2"))
    refused = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"},
               {"Authorization": "Bearer"}, {"Authorization": "Bearer k1k2"}]
    for method, path in OPERATIONS:
        for headers in refused:
            r = call(app, method, path, headers=headers, json=PLAN_BODY)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "missing or wrong API key" in r.json()["detail"]
    assert engine.calls == []  # refused before reaching the engine
    for method, path in reversed(OPERATIONS):  # the plan before the reset that empties the stats
        for key in ("Bearer k1", "bearer k2"):
            body = PLAN_BODY if path == "/prune/plan" else {}
            r = call(app, method, path, headers={"Authorization": key}, json=body)
            assert r.status_code == 200, (method, path, key, r.text)


@pytest.mark.parametrize("mode", ["not_loaded", "no_extension"])
def test_server_without_capture_answers_409_on_every_route(raw_a, tmp_path, mode):
    engine = _engine(raw_a, capture=mode)
    app = _app(engine, tmp_path)
    for method, path in OPERATIONS:
        r = call(app, method, path, json=PLAN_BODY if path == "/prune/plan" else {})
        assert r.status_code == 409, (method, path, r.text)
        assert "actprune serve" in r.json()["detail"]
    assert len(engine.calls) == len(OPERATIONS)


def test_plan_is_409_until_tokens_are_captured(raw_a, tmp_path):
    engine = _engine(raw_a, feed=False)
    app = _app(engine, tmp_path)

    def plan() -> httpx.Response:
        return call(app, "POST", "/prune/plan", json=PLAN_BODY)

    r = plan()
    assert r.status_code == 409 and "no tokens captured yet" in r.json()["detail"]
    engine.feed(raw_a)
    assert plan().status_code == 200
    call(app, "POST", "/activations/reset", json={})
    assert plan().status_code == 409


def _served_plan_equals_offline(raw_a, tmp_path, body: dict) -> tuple[FastAPI, Plan]:
    """POST ``body`` to /prune/plan of a server that has served ``raw_a``; the answer must be the
    planner's own plan for the same stats and request. Returns (app, served plan)."""
    engine = _engine(raw_a)
    app = _app(engine, tmp_path)
    r = call(app, "POST", "/prune/plan", json=body)
    assert r.status_code == 200, r.text
    served = Plan.model_validate(r.json())
    offline = make_plan(_stats(app), engine.config, PlanRequest.model_validate(body))
    assert served.model_dump(exclude={"provenance": {"created"}}) == \
           offline.model_dump(exclude={"provenance": {"created"}})
    return app, served


@pytest.mark.parametrize("body", [
    {"strategy": "importance", "param_ratio": 0.2},
    {"strategy": "importance", "param_ratio": 0.2, "layer_sensitivity": [1.0, 2.0, 3.0],
     "head_sensitivity": [5.0, 1e-4, 5.0], "sensitivity_at": {"mlp": 0.2, "attn": 0.5}},
])
def test_plan_route_spends_a_parameter_budget_like_the_planner(raw_a, tmp_path, body):
    app, served = _served_plan_equals_offline(raw_a, tmp_path, body)
    assert served.provenance.request["param_ratio"] == 0.2
    assert 1 - served.params_after / served.params_before == pytest.approx(0.2, abs=0.02)
    if "head_sensitivity" in body:  # the MLP of the least sensitive layer gives most
        mlp = [w.intermediate_size for w in served.widths]
        assert mlp[0] < mlp[1] <= mlp[2], mlp  # (steps are discrete: equal widths can tie)
    r = call(app, "POST", "/prune/plan", json={**body, "mlp_ratio": 0.1})
    assert r.status_code == 422 and "param_ratio" in r.text
    for nothing in ({}, {"strategy": "importance", "mlp_ratio": 0}):  # a forgotten field: not the model itself
        r = call(app, "POST", "/prune/plan", json=nothing)
        assert r.status_code == 422 and "nothing to remove" in r.json()["detail"], r.text


@pytest.mark.parametrize("body", [
    {"strategy": "importance", "mlp_ratio": 0.25},
    {"strategy": "importance", "mlp_ratio": 0.5, "head_ratio": 0.5, "drop_layers": 1, "per_layer": True},
    {"strategy": "variance", "mlp_ratio": 0.5, "width_multiple": 8, "head_mode": "query_heads", "head_ratio": 0.5},
])
def test_plan_route_returns_the_planner_plan_for_the_served_stats(raw_a, tmp_path, body):
    app, served = _served_plan_equals_offline(raw_a, tmp_path, body)
    kept = [lp for lp in served.layers if not lp.drop]
    assert len(kept) == 3 - body.get("drop_layers", 0)
    assert sum(len(lp.mlp_keep) for lp in kept) == round(48 * (1 - body["mlp_ratio"])) * len(kept)
    assert sum(len(lp.heads_keep) for lp in kept) == (2 if "head_ratio" in body else 4) * len(kept)


def test_a_dense_plan_from_the_route_is_the_version_1_document_and_expert_fields_are_checked(raw_a, tmp_path):
    app = _app(_engine(raw_a), tmp_path)
    r = call(app, "POST", "/prune/plan", json=PLAN_BODY)
    assert r.json()["format_version"] == 1 and "experts_keep" not in r.json()["layers"][0]
    # the expert fields of the body: refused on a dense model, bounded like every ratio
    r = call(app, "POST", "/prune/plan", json={**PLAN_BODY, "expert_ratio": 0.25})
    assert r.status_code in (400, 422) and "expert_ratio" in r.json()["detail"], r.text
    r = call(app, "POST", "/prune/plan", json={**PLAN_BODY, "expert_ratio": 1.0})
    assert r.status_code == 422 and "expert_ratio" in r.json()["detail"], r.text


def test_weight_aware_plan_reads_the_served_checkpoint(raw_a, tmp_path):
    shape = ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "hidden_size")
    ckpt = build_checkpoint(tmp_path / "ckpt", arch="qwen3", **{k: config_for(raw_a)[k] for k in shape})
    config = read_config(ckpt)
    engine = FakeEngineClient(config, model_path=str(ckpt))
    engine.feed(raw_a)
    app = _app(engine, tmp_path)
    body = {"mlp_ratio": 0.25, "head_ratio": 0.5}  # the default strategy, wifv, weighs by column norms
    r = call(app, "POST", "/prune/plan", json=body)
    assert r.status_code == 200, r.text
    served = Plan.model_validate(r.json())
    offline = make_plan(_stats(app), config, PlanRequest.model_validate(body), ColumnNorms.of(ckpt))
    assert served.provenance.strategy == "wifv"
    assert served.model_dump(exclude={"provenance": {"created"}}) == \
           offline.model_dump(exclude={"provenance": {"created"}})


@pytest.mark.parametrize(("body", "named"), [
    ({"mlp_ratio": 1.5}, "mlp_ratio"),
    ({"mlp_ration": 0.3}, "mlp_ration"),
    ({"weights": {"magnitude": -1}}, "weights.magnitude"),
    ({"drop_layers": 1, "drop_layer_ratio": 0.3}, "drop_layers or drop_layer_ratio"),
    ({"strategy": "nope", "mlp_ratio": 0.3}, "strategy: unknown 'nope'"),
    ({"mlp_ratio": 0.3}, "strategy 'wifv' reads weight norms"),  # no weights on this server
    (b"not json", "body must be a JSON object"),
    ([0.3], "body must be a JSON object"),
])
def test_bad_plan_body_is_422_with_one_line_naming_the_field(raw_a, tmp_path, body, named):
    app = _app(_engine(raw_a), tmp_path)
    as_json = {"Content-Type": "application/json"}
    kw = {"content": body, "headers": as_json} if isinstance(body, bytes) else {"json": body}
    r = call(app, "POST", "/prune/plan", **kw)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and named in detail and "\n" not in detail


def test_resume_from_disk_folds_the_saved_snapshot_into_every_rank(raw_a, raw_b, tmp_path):
    engine = _engine(raw_a, feed=False, tp_size=2)
    app = _app(engine, tmp_path)
    svc = app.state.actprune
    _reference(engine, raw_a).save(svc.snapshot_path)
    assert asyncio.run(svc.resume_from_disk())
    assert engine.methods == ["actprune_status", "actprune_load"]  # capture on? then fold it in
    assert_stats_match(_stats(app), _reference(engine, raw_a))
    engine.feed(raw_b)
    assert_stats_match(_stats(app), _reference(engine, concat(raw_a, raw_b)))
