"""Limits of actprune's routes (issue 12, findings 5, 6, 8 and 10's /metrics), in-process over
the fake engine client (:mod:`fake_engine`): expensive work off the event loop and one plan at a
time; JSON-only POST bodies; bounded, finite, well-formed plan requests; weight reads that fail
as 4xx; the served checkpoint found with the server's --revision and --download-dir; actprune's
Prometheus series behind the key."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from actprune.core.config import read_config
from actprune.core.wire.stats import Stats
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.server.api import plan_route, routes, service
from actprune.server.api.body import MAX_BODY_BYTES
from fake_engine import FakeEngineClient, actprune_app, config_for
from fastapi import FastAPI
from prometheus_client import REGISTRY, generate_latest
from raw_samples import RawLayer, random_raw
from safetensors.torch import load_file, save_file

POSTS = ["/activations/reset", "/activations/pause", "/activations/resume", "/prune/plan"]
PLAN_BODY = {"strategy": "importance", "mlp_ratio": 0.25}
SHAPE_KEYS = ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_size")


@pytest.fixture(scope="module")
def raw() -> list[RawLayer]:
    return random_raw(np.random.default_rng(5), tokens=120)


def _app(raw: list[RawLayer], tmp_path: Path, *, keys: tuple[str, ...] = (), config: dict | None = None,
         **kw: Any) -> FastAPI:
    engine = FakeEngineClient(config or config_for(raw), **kw)
    engine.feed(raw)
    return actprune_app(engine, snapshot_dir=tmp_path / "snapshots", api_keys=keys)


def _run(app: FastAPI, go: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vllm") as c:
            return await go(c)

    return asyncio.run(main())


def call(app: FastAPI, method: str, path: str, **kw: Any) -> httpx.Response:
    return _run(app, lambda c: c.request(method, path, **kw))


def _detail(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and len(detail) < 600
    return detail


def _checkpoint(raw: list[RawLayer], path: Path) -> Path:
    return build_checkpoint(path, arch="qwen3", **{k: v for k, v in config_for(raw).items() if k in SHAPE_KEYS})


# ---- finding 5: work off the event loop, one plan at a time, norms read once -----------------------
def test_assembly_summary_serialisation_and_plan_run_off_the_event_loop(raw, tmp_path, monkeypatch):
    ran_on: dict[str, list[bool]] = {}

    def spy(name: str, fn: Callable) -> Callable:
        def wrapped(*a: Any, **kw: Any) -> Any:
            ran_on.setdefault(name, []).append(threading.current_thread() is threading.main_thread())
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(service, "assemble", spy("assemble", service.assemble))
    monkeypatch.setattr(routes, "summarize", spy("summarize", routes.summarize))
    monkeypatch.setattr(Stats, "to_bytes", spy("to_bytes", Stats.to_bytes))
    monkeypatch.setattr(plan_route, "make_plan", spy("make_plan", plan_route.make_plan))
    app = _app(raw, tmp_path)  # asyncio.run below runs the app's event loop on the main thread
    assert call(app, "GET", "/activations/stats").status_code == 200
    assert call(app, "GET", "/activations/stats", params={"format": "safetensors"}).status_code == 200
    assert call(app, "POST", "/prune/plan", json=PLAN_BODY).status_code == 200
    assert set(ran_on) == {"assemble", "summarize", "to_bytes", "make_plan"}
    assert not any(on_loop for calls in ran_on.values() for on_loop in calls), ran_on


def _blocking_planner(monkeypatch) -> tuple[threading.Event, threading.Event]:
    entered, release = threading.Event(), threading.Event()
    real = plan_route.make_plan

    def slow(*a: Any, **kw: Any) -> Any:
        entered.set()
        assert release.wait(30), "test never released the plan"
        return real(*a, **kw)

    monkeypatch.setattr(plan_route, "make_plan", slow)
    return entered, release


def test_second_concurrent_plan_gets_429_with_retry_after_then_plans_run_again(raw, tmp_path, monkeypatch):
    entered, release = _blocking_planner(monkeypatch)
    app = _app(raw, tmp_path)

    async def go(c: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        first = asyncio.create_task(c.post("/prune/plan", json=PLAN_BODY))
        assert await asyncio.to_thread(entered.wait, 30)
        busy = await c.post("/prune/plan", json=PLAN_BODY)
        status = await c.get("/activations/status")  # other routes are not held up meanwhile
        assert status.status_code == 200
        release.set()
        return await first, busy, await c.post("/prune/plan", json=PLAN_BODY)

    first, busy, after = _run(app, go)
    assert first.status_code == 200 and after.status_code == 200
    assert "another plan is being computed" in _detail(busy, 429)
    assert int(busy.headers["retry-after"]) >= 1


def test_a_cancelled_plan_request_keeps_the_lock_until_its_thread_is_done(raw, tmp_path, monkeypatch):
    entered, release = _blocking_planner(monkeypatch)
    app = _app(raw, tmp_path)
    svc = app.state.actprune

    async def go(c: httpx.AsyncClient) -> tuple[int, int]:
        first = asyncio.create_task(c.post("/prune/plan", json=PLAN_BODY))
        assert await asyncio.to_thread(entered.wait, 30)
        first.cancel()  # the client went away; its planner thread still runs
        busy = (await c.post("/prune/plan", json=PLAN_BODY)).status_code
        release.set()
        for _ in range(300):
            if not svc.plan_lock.locked():
                break
            await asyncio.sleep(0.01)
        return busy, (await c.post("/prune/plan", json=PLAN_BODY)).status_code

    assert _run(app, go) == (429, 200)


def test_plans_back_to_back_are_spaced_by_their_cost_not_refused(raw, tmp_path, monkeypatch):
    spans: list[tuple[float, float]] = []
    real = plan_route.make_plan

    def slow(*a: Any, **kw: Any) -> Any:  # a plan that costs 0.1 s
        began = time.monotonic()
        time.sleep(0.1)
        plan = real(*a, **kw)
        spans.append((began, time.monotonic()))
        return plan

    monkeypatch.setattr(plan_route, "make_plan", slow)
    app = _app(raw, tmp_path)
    assert [call(app, "POST", "/prune/plan", json=PLAN_BODY).status_code for _ in range(2)] == [200, 200]
    (_, first_end), (second_start, _) = spans
    assert second_start - first_end >= 0.9 * plan_route.PLAN_SPACING * 0.1


def test_weight_reads_do_not_count_in_the_spacing(raw, tmp_path, monkeypatch):
    ckpt = _checkpoint(raw, tmp_path / "ckpt")
    real = service.ColumnNorms.__call__

    def slow_first_read(self: Any, layer: int, kind: str) -> np.ndarray:
        if not self._cache:
            time.sleep(0.5)  # reading a large checkpoint, once per server
        return real(self, layer, kind)

    monkeypatch.setattr(service.ColumnNorms, "__call__", slow_first_read)
    app = _app(raw, tmp_path, config=read_config(ckpt), model_path=str(ckpt))
    assert call(app, "POST", "/prune/plan", json={"mlp_ratio": 0.25}).status_code == 200
    assert app.state.actprune.next_plan_at - time.monotonic() < plan_route.PLAN_SPACING * 0.5 / 2


def test_a_failed_plan_releases_the_lock(raw, tmp_path):
    app = _app(raw, tmp_path)
    r = call(app, "POST", "/prune/plan", json={"strategy": "nope", "mlp_ratio": 0.3})
    assert "unknown 'nope'" in _detail(r, 422)
    assert call(app, "POST", "/prune/plan", json=PLAN_BODY).status_code == 200


def test_weight_norms_are_read_once_per_server_across_plans(raw, tmp_path, monkeypatch):
    ckpt = _checkpoint(raw, tmp_path / "ckpt")
    reads: list[str] = []
    real = service.ColumnNorms.__call__

    def counted(self: Any, layer: int, kind: str) -> np.ndarray:
        if (layer, kind) not in self._cache:
            reads.append(f"{layer}.{kind}")
        return real(self, layer, kind)

    monkeypatch.setattr(service.ColumnNorms, "__call__", counted)
    app = _app(raw, tmp_path, config=read_config(ckpt), model_path=str(ckpt))
    for body in ({"mlp_ratio": 0.25}, {"mlp_ratio": 0.5, "head_ratio": 0.5}, {"strategy": "wanda_sp", "mlp_ratio": 0.3}):
        assert call(app, "POST", "/prune/plan", json=body).status_code == 200, body
    assert sorted(reads) == sorted(f"{i}.{k}" for i in range(len(raw)) for k in ("mlp", "attn"))


# ---- finding 6: POST bodies must be declared as JSON ----------------------------------------------
@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize("kw", [
    {},  # fetch(url, {method: "POST", mode: "no-cors"}): no body, no Content-Type
    {"content": b'{"mlp_ratio": 0.3}', "headers": {"Content-Type": "text/plain"}},
    {"data": {"mlp_ratio": "0.3"}},  # an HTML form
    {"files": {"f": ("a.json", b"{}")}},  # multipart/form-data
    {"content": b"{}", "headers": {"Content-Type": "application/jsonp"}},
], ids=["none", "text-plain", "form", "multipart", "jsonp"])
def test_post_routes_refuse_bodies_not_declared_as_json_with_415(raw, tmp_path, path, kw):
    app = _app(raw, tmp_path)
    engine = app.state.actprune.engine
    engine.calls.clear()
    assert "Content-Type must be application/json" in _detail(call(app, "POST", path, **kw), 415)
    assert engine.calls == []  # refused before reaching the engine


@pytest.mark.parametrize("path", POSTS)
def test_post_routes_take_json_with_a_charset_and_check_the_key_first(raw, tmp_path, path):
    app = _app(raw, tmp_path, keys=("k",))
    auth = {"Authorization": "Bearer k"}
    body = json.dumps(PLAN_BODY if path == "/prune/plan" else {}).encode()
    assert call(app, "POST", path, content=body, headers={"Content-Type": "text/plain"}).status_code == 401
    ok = call(app, "POST", path, content=body, headers={"Content-Type": "Application/JSON; charset=utf-8", **auth})
    assert ok.status_code == 200, ok.text
    call(app, "POST", "/activations/resume", json={}, headers=auth)


# ---- finding 8: bad plan bodies are 4xx naming the field ------------------------------------------
@pytest.mark.parametrize(("body", "named"), [
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b'{"weights": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001, "nested too deeply"),
    (b'{"mlp_ratio": 0.3, "weights": {"magnitude": 1e999}}', "weights.magnitude: Input should be a finite number"),
    (b'{"mlp_ratio": Infinity}', "mlp_ratio: Input should be a finite number"),
    (b'{"mlp_ratio": 0.3, "per_layer": true, "layer_sensitivity": [1.0, NaN, 2.0]}', "layer_sensitivity.1"),
    (b'{"param_ratio": -1e999}', "param_ratio"),
    (json.dumps({"mlp_ratio": 0.3, "per_layer": True, "layer_sensitivity": [1.0] * 4097}).encode(),
     "layer_sensitivity: List should have at most 4096 items"),
    (json.dumps({"mlp_ratio": 0.3, "x\ny" * 500: 1}).encode(), "Extra inputs are not permitted"),
    (b'{"mlp_ratio": 0.3, "strategy": "\xff"}', "body must be a JSON object"),
    (b'{"mlp_ratio": 1' + b"0" * 5000 + b"}", "body must be a JSON object"),
], ids=["deep-list", "deep-object", "inf-weight", "Infinity", "NaN-in-list", "minus-inf", "4097-layers",
        "odd-key", "not-utf8", "huge-int"])
def test_bad_plan_body_is_422_with_one_short_line(raw, tmp_path, body, named):
    app = _app(raw, tmp_path)
    r = call(app, "POST", "/prune/plan", content=body, headers={"Content-Type": "application/json"})
    assert named in _detail(r, 422)


def test_body_over_one_mebibyte_is_413_with_or_without_content_length(raw, tmp_path):
    app = _app(raw, tmp_path)
    big = b'{"mlp_ratio": 0.3, "strategy": "' + b"x" * MAX_BODY_BYTES + b'"}'
    headers = {"Content-Type": "application/json"}
    assert "larger than 1048576 bytes" in _detail(call(app, "POST", "/prune/plan", content=big, headers=headers), 413)

    async def chunks() -> AsyncIterator[bytes]:  # chunked transfer: no Content-Length to trust
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    _detail(call(app, "POST", "/prune/plan", content=chunks(), headers=headers), 413)
    padded = json.dumps(PLAN_BODY).encode().ljust(MAX_BODY_BYTES, b" ")  # at the cap: accepted
    assert call(app, "POST", "/prune/plan", content=padded, headers=headers).status_code == 200


CONTROLS = ["/activations/reset", "/activations/pause", "/activations/resume"]


@pytest.mark.parametrize("path", CONTROLS)
@pytest.mark.parametrize(("content", "status", "named"), [
    (b"{", 422, "body must be a JSON object"),
    (b"[]", 422, "body must be a JSON object"),
    (b'{"confirm": true}', 422, "takes no fields"),
    (b"[" * 200_000, 422, "nested too deeply"),
    (b"{" + b" " * (2 << 20) + b"}", 413, "larger than 1048576 bytes"),
], ids=["cut-short", "a-list", "a-field", "deep", "2-MiB"])
def test_control_routes_refuse_any_body_but_an_empty_one_before_acting(raw, tmp_path, path, content, status, named):
    app = _app(raw, tmp_path)
    engine = app.state.actprune.engine
    engine.calls.clear()
    r = call(app, "POST", path, content=content, headers={"Content-Type": "application/json"})
    assert named in _detail(r, status)
    assert engine.calls == []  # nothing reset, paused or resumed
    for ok in (b"", b"{}", b" { } "):
        r = call(app, "POST", path, content=ok, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, (ok, r.text)


@pytest.mark.parametrize(("query", "named"), [
    ("format=xml", "query parameter format: Input should be 'json' or 'safetensors' (got 'xml')"),
    ("k=5000", "query parameter k: Input should be less than or equal to 1000"),
    ("k=ten", "query parameter k: Input should be a valid integer"),
])
def test_bad_query_parameters_are_422_with_one_line_naming_the_parameter(raw, tmp_path, query, named):
    app = _app(raw, tmp_path)
    assert named in _detail(call(app, "GET", f"/activations/stats?{query}"), 422)


def _with_weights(ckpt: Path, convert: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    f = ckpt / "model.safetensors"
    save_file({k: convert(k, t).contiguous() for k, t in load_file(f).items()}, f)
    return ckpt


@pytest.mark.parametrize(("damage", "named"), [
    ("bin-only", "no model.safetensors"),
    ("garbage", "cannot read the weights"),
    ("fp8", "F8_E4M3"),
    ("truncated-index", "cannot read the weights"),
])
def test_unreadable_or_quantised_weights_make_weight_aware_plans_422(raw, tmp_path, damage, named):
    ckpt = _checkpoint(raw, tmp_path / "ckpt")
    st = ckpt / "model.safetensors"
    if damage == "bin-only":
        st.rename(ckpt / "pytorch_model.bin")
    elif damage == "garbage":
        st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header, not tensors")
    elif damage == "fp8":
        _with_weights(ckpt, lambda k, t: t.to(torch.float8_e4m3fn) if k.endswith(("down_proj.weight", "o_proj.weight")) else t)
    else:
        (ckpt / "model.safetensors.index.json").write_text('{"weight_map": ')
    app = _app(raw, tmp_path, config=read_config(ckpt), model_path=str(ckpt))
    detail = _detail(call(app, "POST", "/prune/plan", json={"mlp_ratio": 0.25}), 422)
    assert named in detail and "activations alone (importance" in detail
    assert call(app, "POST", "/prune/plan", json=PLAN_BODY).status_code == 200  # activation-only still plans


def test_quantised_checkpoint_is_refused_for_weight_aware_plans_before_any_read(raw, tmp_path, monkeypatch):
    ckpt = _checkpoint(raw, tmp_path / "ckpt")
    monkeypatch.setattr(service.ColumnNorms, "__call__", lambda *a: pytest.fail("read a quantised weight"))
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    app = _app(raw, tmp_path, config={**read_config(ckpt), "quantization_config": quant}, model_path=str(ckpt))
    for strategy in ("wifv", "wanda_sp"):
        detail = _detail(call(app, "POST", "/prune/plan", json={"strategy": strategy, "mlp_ratio": 0.25}), 422)
        assert "quantised (fp8)" in detail and "scales" in detail and "importance" in detail
    assert call(app, "POST", "/prune/plan", json=PLAN_BODY).status_code == 200


def _hub_cache(root: Path, repo: str, revisions: dict[str, Path]) -> None:
    """A Hugging Face cache holding ``repo`` at the given revisions (refs -> snapshot copies)."""
    base = root / f"models--{repo.replace('/', '--')}"
    for i, (rev, src) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / rev).write_text(commit)
        snap = base / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in src.iterdir():
            (snap / f.name).write_bytes(f.read_bytes())


def test_hub_weights_are_found_at_the_servers_revision_in_its_download_dir(raw, tmp_path, monkeypatch):
    repo = "org/tiny-qwen3"
    main, v2 = _checkpoint(raw, tmp_path / "main"), build_checkpoint(
        tmp_path / "v2", arch="qwen3", seed=1, **{k: v for k, v in config_for(raw).items() if k in SHAPE_KEYS})
    download_dir = tmp_path / "download-dir"
    _hub_cache(download_dir, repo, {"main": main, "v2": v2})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # the default cache holds nothing
    engine = FakeEngineClient(read_config(main), model_path=repo)
    engine.feed(raw)
    engine.model_config = SimpleNamespace(**vars(engine.model_config), revision="v2")
    engine.vllm_config = SimpleNamespace(parallel_config=engine.vllm_config.parallel_config,
                                         load_config=SimpleNamespace(download_dir=str(download_dir)))
    app = actprune_app(engine, snapshot_dir=tmp_path / "snapshots")
    assert call(app, "POST", "/prune/plan", json={"mlp_ratio": 0.25}).status_code == 200
    found = app.state.actprune.column_norms().model_dir
    assert found.parent.name == "snapshots" and (found / "model.safetensors").read_bytes() == \
        (v2 / "model.safetensors").read_bytes()
    assert service._weights_dir(repo) is None  # without --download-dir: not in the default cache


# ---- finding 10: actprune's Prometheus series behind the key ----------------------------------------
def test_actprune_series_need_the_key_and_stay_off_vllms_open_metrics(raw, tmp_path):
    from vllm.entrypoints.serve.instrumentator.metrics import attach_router as vllm_metrics

    app = _app(raw, tmp_path, keys=("k",))
    vllm_metrics(app)  # vLLM's /metrics, mounted as vLLM mounts it: no key asked
    assert call(app, "GET", "/activations/metrics").status_code == 401
    r = call(app, "GET", "/activations/metrics", headers={"Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'actprune_tokens_captured{phase="prefill"} 90.0' in r.text
    assert 'actprune_tokens_captured{phase="decode"} 30.0' in r.text
    assert "actprune_snapshots_written_total 0.0" in r.text and "actprune_snapshot_age_seconds -1.0" in r.text
    public = call(app, "GET", "/metrics")
    assert public.status_code == 200 and "actprune" not in public.text
    assert b"actprune" not in generate_latest(REGISTRY)
