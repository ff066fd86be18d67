"""Client and AsyncClient against a real HTTP server on loopback.

The server is ``fake_vllm``: actprune's real routes over a fake engine that has served known
random samples, so what the client receives is compared with numpy on those samples. Answers
no real server gives (a corrupt file, a body that is not a plan) come from httpx.MockTransport.
"""

from __future__ import annotations

import asyncio

import httpx
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
from actprune.core.wire.stats import Stats, StatsFormatError
from fake_vllm import bound_socket, fake_vllm, serve
from raw_samples import assert_json_close, assert_stats_match, concat, stats_from_raw

NO_ENV = ClientSettings.from_env({})


def test_stats_status_and_summary_match_what_the_server_holds(server, raw_a):
    url, srv = server
    with Client(url, settings=NO_ENV) as c:
        stats = c.stats()
        status = c.status()
        summary = c.summary(k=3)
    want = srv.reference(raw_a)
    assert_stats_match(stats, want)
    assert status.tokens == 300 and status.num_layers == 3 and not status.paused
    assert status.config_hash == stats.meta["config_hash"] == want.meta["config_hash"]
    assert_json_close(summary.model_dump(mode="json")["layers"], summarize(want, k=3).model_dump(mode="json")["layers"])


def test_base_url_with_v1_suffix_reaches_the_same_routes(server):
    url, srv = server
    with Client(url + "/v1/", settings=NO_ENV) as c:
        assert c.status().model == srv.engine.served_model_name == "tiny/qwen3"


def test_connection_refused_is_retried_until_the_server_comes_up(raw_a):
    sock = bound_socket()  # bound, not listening: connections are refused until serve() starts
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with Client(url, settings=NO_ENV, retries=0) as c, pytest.raises(ActpruneConnectionError) as e:
        c.status()
    assert url in str(e.value) and "after 1 try" in str(e.value)
    with serve(fake_vllm(raw_a), sock=sock, delay=0.5):
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
    srv = fake_vllm(raw_a)
    srv.engine.fail = RuntimeError("engine core died")
    with serve(srv) as url, Client(url, settings=NO_ENV, retries=3, backoff=0.01) as c:
        with pytest.raises(ActpruneHTTPError) as e:
            c.status()
    assert e.value.status_code == 500 and srv.engine.methods == ["actprune_status"]
    assert "GET" in str(e.value) and "500 Internal Server Error" in str(e.value)


def test_missing_or_wrong_key_gives_401_with_the_server_detail(raw_a, monkeypatch):
    monkeypatch.delenv("ACTPRUNE_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    srv = fake_vllm(raw_a, api_key="s3cret")
    with serve(srv) as url:
        for key in (None, "wrong"):
            with Client(url, api_key=key) as c, pytest.raises(ActpruneHTTPError) as e:
                c.stats()
            assert e.value.status_code == 401
            assert "401 Unauthorized" in str(e.value) and "missing or wrong API key" in str(e.value)
        assert srv.engine.calls == []
        with Client(url, api_key="s3cret") as c:
            assert c.status().tokens == 300
        monkeypatch.setenv("VLLM_API_KEY", "s3cret")
        with Client(url) as c:
            assert c.reset().status.tokens == 0
    assert srv.engine.methods == ["actprune_status", "actprune_reset"]


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
    srv = fake_vllm(raw_a)
    with serve(srv) as url, Client(url, settings=NO_ENV) as c:
        assert c.pause().status.paused and all(r.capture.paused for r in srv.engine.ranks)
        assert not c.resume().status.paused and not any(r.capture.paused for r in srv.engine.ranks)
        plan = c.plan(mlp_ratio=0.5, strategy="importance")
        assert [w.intermediate_size for w in plan.widths] == [24, 24, 24] and plan.provenance.stats_tokens == 300
        with pytest.raises(ActpruneHTTPError, match="422 Unprocessable .*mlp_ratio"):
            c.plan(mlp_ratio=1.5)
        assert c.reset().status.tokens == 0
        with pytest.raises(ActpruneHTTPError, match="409 Conflict: no tokens captured yet"):
            c.plan(mlp_ratio=0.5, strategy="importance")
    assert srv.engine.methods == ["actprune_pause", "actprune_resume", "actprune_snapshot", "actprune_reset",
                                  "actprune_snapshot"]


def test_answers_the_client_cannot_read_are_errors_and_write_nothing(raw_a, tmp_path):
    srv = fake_vllm(raw_a)
    with serve(srv) as url, Client(url, settings=NO_ENV) as c:
        path = c.stats_file(tmp_path / "sub" / "s.safetensors")
        assert Stats.load(path).tokens == 300
    garbage = httpx.MockTransport(lambda request: httpx.Response(200, content=b"{not a stats file"))
    with Client(url, settings=NO_ENV, transport=garbage) as c:
        with pytest.raises(StatsFormatError, match="not a safetensors stats file"):
            c.stats_file(tmp_path / "bad.safetensors")
        with pytest.raises(ActpruneHTTPError, match="not a valid Plan"):
            c.plan(mlp_ratio=0.5)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["s.safetensors"]


def test_merge_of_two_servers_equals_stats_over_the_union_of_their_data(raw_a, raw_b):
    a, b = fake_vllm(raw_a), fake_vllm(raw_b)
    with serve(a) as url_a, serve(b) as url_b:
        merged = merge_from([url_a, url_b], settings=NO_ENV)
        merged_async = asyncio.run(amerge_from([url_a, url_b], settings=NO_ENV))
    for m in (merged, merged_async):
        assert_stats_match(m, stats_from_raw(concat(raw_a, raw_b)))
        assert m.tokens == 470 and m.meta["merged_from"] == 2
    # The naive variance sum_sq/n - mean^2 is useless on the offset channels; Chan's is not.
    m = merged.group(0, "mlp")
    want_var = np.concatenate([raw_a[0].mlp, raw_b[0].mlp]).var(axis=0)
    np.testing.assert_allclose(m["m2"] / m["count"], want_var, rtol=1e-6)


def test_merge_refuses_servers_of_different_models_and_names_them(raw_a, raw_b):
    a = fake_vllm(raw_a)
    b = fake_vllm(raw_b, model="other/model", config={"vocab_size": 1024})  # same widths, another model
    with serve(a) as url_a, serve(b) as url_b:
        with pytest.raises(StatsFormatError) as e:
            merge_from([url_a, url_b], settings=NO_ENV)
    assert url_a in str(e.value) and url_b in str(e.value) and "other/model" in str(e.value)
    with pytest.raises(ValueError, match="more than once"):
        merge_from([url_a, url_a + "/"], settings=NO_ENV)


def test_merge_finds_one_server_under_two_urls_by_its_identity_not_its_url(raw_a, raw_b):
    a, b = fake_vllm(raw_a), fake_vllm(raw_b)
    with serve(a) as url_a, serve(b) as url_b:
        aliases = [url_a + "/v1", url_a.replace("127.0.0.1", "localhost")]  # URL text differs
        for alias in aliases:
            for pull in (lambda urls: merge_from(urls, settings=NO_ENV),
                         lambda urls: asyncio.run(amerge_from(urls, settings=NO_ENV))):
                with pytest.raises(ValueError, match="same server") as e:
                    pull([url_a, url_b, alias])
                assert url_a in str(e.value) and alias in str(e.value)  # names both, says which
        merged = merge_from([url_a, url_b], settings=NO_ENV)
    assert merged.tokens == 470 and "instance_id" not in merged.meta
    assert len(set(merged.meta["instance_ids"])) == 2  # a merge lists the servers it holds


def test_async_client_speaks_the_same_routes(server):
    url, srv = server

    async def go():
        async with AsyncClient(url, settings=NO_ENV) as c:
            return await c.status(), await c.stats(), await c.summary()

    status, stats, summary = asyncio.run(go())
    assert status.config_hash == stats.meta["config_hash"] and status.paused is False
    assert stats.tokens == 300 and summary.k == 10 and summary.tokens == 300


def test_async_client_also_retries_connection_refused(raw_a):
    sock = bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def go():
        async with AsyncClient(url, settings=NO_ENV, retries=8, backoff=0.05) as c:
            return await c.pause()

    with serve(fake_vllm(raw_a), sock=sock, delay=0.3) as _:
        assert asyncio.run(go()).status.paused


def _drops_first(n: int, answer: httpx.Response) -> tuple[httpx.MockTransport, list[str]]:
    """A transport whose first ``n`` requests meet a connection the server closed without
    answering (what a keep-alive race looks like to httpx), then answers ``answer``."""
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if len(seen) <= n:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return answer

    return httpx.MockTransport(handle), seen


def test_a_dropped_connection_is_retried_for_every_request_but_reset(server):
    url, _ = server
    with Client(url, settings=NO_ENV) as real:
        status = real.status().model_dump(mode="json")
    transport, seen = _drops_first(2, httpx.Response(200, json=status))
    with Client(url, settings=NO_ENV, transport=transport, retries=3, backoff=0.01) as c:
        assert c.status().model == status["model"]
    assert seen == ["GET /activations/status"] * 3
    for call, tries in (("reset", 1), ("pause", 2), ("resume", 2)):  # reset may have run: never sent twice
        transport, seen = _drops_first(1, httpx.Response(200, json={"ok": True, "status": status}))
        with Client(url, settings=NO_ENV, transport=transport, retries=3, backoff=0.01) as c:
            if tries == 1:
                with pytest.raises(ActpruneConnectionError) as e:
                    getattr(c, call)()
                assert "no answer (connection dropped) after 1 try" in str(e.value)
            else:
                assert getattr(c, call)().status.model == status["model"]
        assert seen == [f"POST /activations/{call}"] * tries
