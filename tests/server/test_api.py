"""actprune's HTTP routes on a real server started with an API key: security, OpenAPI,
/metrics, the plan route, and a property-based run over every route (no 5xx)."""

from __future__ import annotations

import time

import httpx
import pytest
from actprune.core.wire.plan import Plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import Stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import API_KEY as KEY
from .conftest import start_server
from .test_capture_fidelity import PROMPTS

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}"}


def _send(base: str, prompts=PROMPTS) -> None:
    for prompt, n in prompts:
        r = httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=120, json={
            "model": str(_model(base)), "prompt": prompt, "max_tokens": n, "ignore_eos": True})
        r.raise_for_status()


def _model(base: str) -> str:
    return httpx.get(f"{base}/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]


def _actprune_operations(base: str) -> list[tuple[str, str]]:
    spec = httpx.get(f"{base}/openapi.json", timeout=30).json()
    return [(m.upper(), p) for p, ops in spec["paths"].items()
            if p.startswith(("/activations", "/prune")) for m in ops]


def test_openapi_describes_every_actprune_route(keyed):
    ops = set(_actprune_operations(keyed.base_url))
    assert ops == {("GET", "/activations/stats"), ("GET", "/activations/status"), ("GET", "/activations/metrics"),
                   ("POST", "/activations/reset"), ("POST", "/activations/pause"),
                   ("POST", "/activations/resume"), ("POST", "/prune/plan")}
    spec = httpx.get(f"{keyed.base_url}/openapi.json", timeout=30).json()
    assert "StatusResponse" in spec["components"]["schemas"]
    assert "PlanRequest" in str(spec["paths"]["/prune/plan"]["post"]["requestBody"])


def test_every_actprune_route_refuses_missing_or_wrong_key(keyed):
    ops = _actprune_operations(keyed.base_url)
    assert len(ops) == 7
    for method, path in ops:
        url = keyed.base_url + path
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            r = httpx.request(method, url, headers=headers, timeout=30, json={})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert "API key" in r.json()["detail"]
        r = httpx.request(method, url, headers=AUTH, timeout=60, json={"mlp_ratio": 0.25})
        assert r.status_code != 401, (method, path)
    # vLLM's own middleware still guards the OpenAI routes
    assert httpx.get(f"{keyed.base_url}/v1/models", timeout=30).status_code == 401


def test_metrics_expose_captured_tokens_and_snapshot_counters_behind_the_key(keyed):
    base = keyed.base_url
    httpx.post(f"{base}/activations/reset", json={}, headers=AUTH, timeout=30).raise_for_status()
    _send(base, PROMPTS[:1])
    status = httpx.get(f"{base}/activations/status", headers=AUTH, timeout=30).json()
    public = httpx.get(f"{base}/metrics", timeout=30)  # vLLM's, open to scrapers without a key
    assert public.status_code == 200 and "vllm:" in public.text and "actprune" not in public.text
    assert httpx.get(f"{base}/activations/metrics", timeout=30).status_code == 401
    text = httpx.get(f"{base}/activations/metrics", headers=AUTH, timeout=30).text
    assert f'actprune_tokens_captured{{phase="prefill"}} {float(status["tokens_prefill"])}' in text
    assert f'actprune_tokens_captured{{phase="decode"}} {float(status["tokens_decode"])}' in text
    assert "actprune_snapshots_written_total 0.0" in text
    assert "actprune_snapshot_age_seconds -1.0" in text


def test_plan_route_returns_the_plan_the_offline_planner_makes(keyed, tiny_qwen3):
    from actprune.core.planning.planner import make_plan
    from actprune.core.tensor.checkpoint import ColumnNorms

    base = keyed.base_url
    _send(base)
    httpx.post(f"{base}/activations/pause", json={}, headers=AUTH, timeout=30).raise_for_status()
    try:
        raw = httpx.get(f"{base}/activations/stats", params={"format": "safetensors"},
                        headers=AUTH, timeout=60)
        stats = Stats.from_bytes(raw.content)
        body = {"strategy": "wanda_sp", "mlp_ratio": 0.25, "width_multiple": 8}
        r = httpx.post(f"{base}/prune/plan", json=body, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        served = Plan.model_validate(r.json())
        import json as _json

        config = _json.loads((tiny_qwen3 / "config.json").read_text())
        offline = make_plan(stats, config, PlanRequest.model_validate(body), ColumnNorms.of(tiny_qwen3))
        assert served.model_dump(exclude={"provenance"}) == offline.model_dump(exclude={"provenance"})
        assert all(len(layer.mlp_keep) == 288 for layer in served.layers)
    finally:
        httpx.post(f"{base}/activations/resume", json={}, headers=AUTH, timeout=30).raise_for_status()


def test_plan_route_names_the_bad_field(keyed):
    r = httpx.post(f"{keyed.base_url}/prune/plan", json={"mlp_ratio": 1.5}, headers=AUTH, timeout=30)
    assert r.status_code == 422 and "mlp_ratio" in r.json()["detail"]
    r = httpx.post(f"{keyed.base_url}/prune/plan", json={"mlp_ration": 0.3}, headers=AUTH, timeout=30)
    assert r.status_code == 422 and "mlp_ration" in r.json()["detail"]
    json_type = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(f"{keyed.base_url}/prune/plan", content=b"not json", headers=json_type, timeout=30)
    assert r.status_code == 422
    r = httpx.post(f"{keyed.base_url}/prune/plan", content=b"not json", headers=AUTH, timeout=30)
    assert r.status_code == 415  # no JSON content type: refused before the body is read


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_plan_fields = sorted(PlanRequest.model_fields)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    fields=st.dictionaries(st.sampled_from(_plan_fields) | st.text(max_size=6), _json_values, max_size=4),
    fmt=st.text(max_size=12) | st.sampled_from(["json", "safetensors"]),
    k=st.text(max_size=6) | st.integers(-5, 5000).map(str),
)
def test_no_generated_input_gets_a_5xx(keyed, fields, fmt, k):
    base = keyed.base_url
    answers = [
        httpx.post(f"{base}/prune/plan", json=fields, headers=AUTH, timeout=60),
        httpx.get(f"{base}/activations/stats", params={"format": fmt, "k": k}, headers=AUTH, timeout=60),
        httpx.get(f"{base}/activations/status", params={"x": fmt}, headers=AUTH, timeout=60),
    ]
    for r in answers:
        assert r.status_code < 500, (r.request.url, fields, r.text)


def test_stats_json_summary_lists_least_important_units(keyed):
    base = keyed.base_url
    _send(base, PROMPTS[:2])
    time.sleep(0.1)
    s = httpx.get(f"{base}/activations/stats", params={"k": 3}, headers=AUTH, timeout=60).json()
    assert len(s["layers"]) == 2
    layer = s["layers"][0]
    assert layer["tokens"] > 0 and len(layer["mlp"]["least_important"]) == 3


def _greedy(base: str, headers: dict[str, str]) -> list[tuple[list[int], list[float]]]:
    out = []
    model = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    for prompt, n in PROMPTS:
        r = httpx.post(f"{base}/v1/completions", headers=headers, timeout=120, json={
            "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 1, "return_token_ids": True})
        r.raise_for_status()
        c = r.json()["choices"][0]
        out.append((c["token_ids"], c["logprobs"]["token_logprobs"]))
    return out


def test_capture_off_serves_as_plain_vllm_with_identical_outputs(keyed, tiny_qwen3, tmp_path):
    plain = start_server(tiny_qwen3, "eager", tmp_path, extra=["--no-capture"])
    try:
        r = httpx.get(f"{plain.base_url}/activations/status", timeout=30)
        assert r.status_code == 404  # no actprune routes: vLLM as it is
        log = (tmp_path / "server-eager.log").read_text(errors="replace")
        assert "load_format': 'actprune'" not in log and "CaptureWorkerExtension" not in log
        without = _greedy(plain.base_url, {})
    finally:
        plain.stop()
    with_capture = _greedy(keyed.base_url, AUTH)
    for (ids_a, lp_a), (ids_b, lp_b) in zip(with_capture, without, strict=True):
        assert ids_a == ids_b
        assert max(abs(a - b) for a, b in zip(lp_a, lp_b, strict=True)) <= 1e-5


def test_prefix_caching_is_off_under_capture_so_repeated_prompts_count_fully(keyed):
    base = keyed.base_url
    long_prompt = " ".join(p for p, _ in PROMPTS) * 4  # several KV-cache blocks long
    httpx.post(f"{base}/activations/reset", json={}, headers=AUTH, timeout=30).raise_for_status()
    usage = []
    for _ in range(2):
        r = httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=120, json={
            "model": _model(base), "prompt": long_prompt, "max_tokens": 1})
        usage.append(r.json()["usage"]["prompt_tokens"])
    st = httpx.get(f"{base}/activations/status", headers=AUTH, timeout=30).json()
    assert usage[0] > 256 and st["tokens_prefill"] == sum(usage)
