"""Client and AsyncClient against a real HTTP server on loopback.

The server is ``fake_vllm``: a stand-in for the vLLM server with the actprune routes (built on
the shared response models) over stats computed from known random samples.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from actprune.client.http import (
    ActpruneConnectionError,
    ActpruneHTTPError,
    AsyncClient,
    Client,
    ClientSettings,
    amerge_from,
    merge_from,
)
from actprune.core.summary import summarize
from actprune.core.wire.stats import GROUP_FIELDS, Stats, StatsFormatError
from fake_vllm import (
    FakeState,
    RawLayer,
    accumulate,
    bound_socket,
    build_app,
    serve,
    stats_from_raw,
)

NO_ENV = ClientSettings.from_env({})


def test_stats_status_and_summary_match_what_the_server_holds(server):
    url, state = server
    with Client(url, settings=NO_ENV) as c:
        stats = c.stats()
        status = c.status()
        summary = c.summary(k=3)
    assert stats.layers == state.stats.layers
    held = Stats.from_bytes(state.stats.to_bytes())  # per-channel arrays travel as float32
    for name, t in held.tensors.items():
        np.testing.assert_array_equal(stats.tensors[name], t)
    assert status.tokens == state.stats.tokens and status.num_layers == 3 and not status.paused
    assert summary == summarize(state.stats, k=3)


def test_base_url_with_v1_suffix_reaches_the_same_routes(server):
    url, state = server
    with Client(url + "/v1/", settings=NO_ENV) as c:
        assert c.status().model == state.stats.meta["model"]


def test_connection_refused_is_retried_until_the_server_comes_up(raw_a):
    sock = bound_socket()  # bound, not listening: connections are refused until serve() starts
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with Client(url, settings=NO_ENV, retries=0) as c, pytest.raises(ActpruneConnectionError) as e:
        c.status()
    assert url in str(e.value) and "after 1 try" in str(e.value)
    with serve(FakeState(stats=stats_from_raw(raw_a)), sock=sock, delay=0.5):
        with Client(url, settings=NO_ENV, retries=8, backoff=0.05) as c:
            assert c.status().num_layers == 3


def test_connection_errors_give_up_after_the_configured_retries():
    sock = bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with Client(url, settings=NO_ENV, retries=2, backoff=0.01) as c, pytest.raises(ActpruneConnectionError) as e:
        c.stats()
    assert "after 3 tries" in str(e.value) and "is the server up" in str(e.value)
    sock.close()


def test_server_errors_are_reported_and_not_retried(raw_a):
    state = FakeState(stats=stats_from_raw(raw_a), status_500=True)
    with serve(state) as url, Client(url, settings=NO_ENV, retries=3, backoff=0.01) as c:
        with pytest.raises(ActpruneHTTPError) as e:
            c.status()
    assert e.value.status_code == 500 and state.hits["/activations/status"] == 1
    assert "GET" in str(e.value) and "500" in str(e.value) and "snapshot lock timed out" in str(e.value)


def test_missing_or_wrong_key_gives_401_with_the_server_detail(raw_a, monkeypatch):
    monkeypatch.delenv("ACTPRUNE_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    state = FakeState(stats=stats_from_raw(raw_a), api_key="s3cret")
    with serve(state) as url:
        for key in (None, "wrong"):
            with Client(url, api_key=key) as c, pytest.raises(ActpruneHTTPError) as e:
                c.stats()
            assert e.value.status_code == 401
            assert "401 Unauthorized" in str(e.value) and "missing or wrong API key" in str(e.value)
        with Client(url, api_key="s3cret") as c:
            assert c.status().tokens == state.stats.tokens
        monkeypatch.setenv("VLLM_API_KEY", "s3cret")
        with Client(url) as c:
            assert c.reset().ok and state.resets == 1


def test_api_key_settings_prefer_argument_then_actprune_then_vllm_variable():
    env = {"ACTPRUNE_API_KEY": "a", "VLLM_API_KEY": "v"}
    assert ClientSettings.from_env(env).api_key == "a"
    assert ClientSettings.from_env({"VLLM_API_KEY": "v"}).api_key == "v"
    assert ClientSettings.from_env(env, api_key="arg").api_key == "arg"
    assert ClientSettings.from_env({}).api_key is None
    assert Client("http://x", settings=ClientSettings.from_env(env))._headers() == {"Authorization": "Bearer a"}
    with pytest.raises(ValueError, match="retries"):
        ClientSettings(retries=-1)


def test_pause_resume_reset_and_plan_round_trip(raw_a):
    state = FakeState(stats=stats_from_raw(raw_a))
    with serve(state) as url, Client(url, settings=NO_ENV) as c:
        assert c.pause().status.paused and state.paused
        assert not c.resume().status.paused and not state.paused
        assert c.reset().status.tokens == state.stats.tokens and state.resets == 1
        # the fake server echoes the body instead of a plan: the client must say so plainly
        with pytest.raises(ActpruneHTTPError, match="not a valid Plan"):
            c.plan(mlp_ratio=0.5, strategy="wanda_sp")
        assert state.last_plan_body == {"mlp_ratio": 0.5, "strategy": "wanda_sp"}


def test_stats_file_writes_a_valid_file_and_nothing_on_a_corrupt_answer(raw_a, tmp_path):
    state = FakeState(stats=stats_from_raw(raw_a))
    with serve(state) as url, Client(url, settings=NO_ENV) as c:
        path = c.stats_file(tmp_path / "sub" / "s.safetensors")
        assert Stats.load(path).tokens == state.stats.tokens
        state.corrupt_stats = True
        with pytest.raises(StatsFormatError, match="not a safetensors stats file"):
            c.stats_file(tmp_path / "bad.safetensors")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["s.safetensors"]


def _assert_equals_union(merged: Stats, raws: list[list[RawLayer]]) -> None:
    """Every accumulator equals numpy's figure over the concatenated raw samples."""
    for i in range(len(raws[0])):
        for kind in ("mlp", "attn"):
            want = accumulate(np.concatenate([getattr(r[i], kind) for r in raws]))
            got = merged.group(i, kind)
            for f in GROUP_FIELDS:
                # the servers' files hold float32 per-channel arrays: one rounding each
                np.testing.assert_allclose(got[f], want[f], rtol=1e-6, atol=1e-9, err_msg=f"layer {i} {kind} {f}")
            np.testing.assert_array_equal(got["max_abs"], want["max_abs"])
            np.testing.assert_array_equal(got["near_zero"], want["near_zero"])
        cos = np.concatenate([r[i].cos for r in raws])
        assert float(merged.tensors[f"layers.{i}.block.count"]) == len(cos)
        assert merged.block_influence(i) == pytest.approx(1 - cos.mean(), rel=1e-12)


def test_merge_of_two_servers_equals_stats_over_the_union_of_their_data(raw_a, raw_b):
    a, b = FakeState(stats=stats_from_raw(raw_a)), FakeState(stats=stats_from_raw(raw_b))
    with serve(a) as url_a, serve(b) as url_b:
        merged = merge_from([url_a, url_b], settings=NO_ENV)
        merged_async = asyncio.run(amerge_from([url_a, url_b], settings=NO_ENV))
    _assert_equals_union(merged, [raw_a, raw_b])
    _assert_equals_union(merged_async, [raw_a, raw_b])
    assert merged.tokens == a.stats.tokens + b.stats.tokens and merged.meta["merged_from"] == 2
    # The naive variance sum_sq/n - mean^2 is useless on the offset channels; Chan's is not.
    m = merged.group(0, "mlp")
    want_var = np.concatenate([raw_a[0].mlp, raw_b[0].mlp]).var(axis=0)
    np.testing.assert_allclose(m["m2"] / m["count"], want_var, rtol=1e-6)


def test_merge_refuses_servers_of_different_models_and_names_them(raw_a, raw_b):
    a = FakeState(stats=stats_from_raw(raw_a))
    b = FakeState(stats=stats_from_raw(raw_b, model="other/model", config_hash="fff000"))
    with serve(a) as url_a, serve(b) as url_b:
        with pytest.raises(StatsFormatError) as e:
            merge_from([url_a, url_b], settings=NO_ENV)
    assert url_a in str(e.value) and url_b in str(e.value) and "other/model" in str(e.value)
    with pytest.raises(ValueError, match="more than once"):
        merge_from([url_a, url_a + "/"], settings=NO_ENV)


def test_async_client_speaks_the_same_routes(server):
    url, state = server

    async def go():
        async with AsyncClient(url, settings=NO_ENV) as c:
            return await c.status(), await c.stats(), await c.summary()

    status, stats, summary = asyncio.run(go())
    assert status.config_hash == state.stats.meta["config_hash"]
    assert stats.tokens == state.stats.tokens and summary.k == 10


def test_response_models_give_fastapi_an_openapi_description(raw_a):
    spec = build_app(FakeState(stats=stats_from_raw(raw_a))).openapi()
    schemas = spec["components"]["schemas"]
    assert {"StatsSummary", "StatusResponse", "ResetResponse", "PauseResponse", "LayerSummary"} <= set(schemas)
    ok = spec["paths"]["/activations/status"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"]["$ref"].endswith("/StatusResponse")


def test_async_client_also_retries_connection_refused(raw_a):
    sock = bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def go():
        async with AsyncClient(url, settings=NO_ENV, retries=8, backoff=0.05) as c:
            return await c.pause()

    with serve(FakeState(stats=stats_from_raw(raw_a)), sock=sock, delay=0.3) as _:
        assert asyncio.run(go()).status.paused
