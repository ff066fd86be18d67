"""The client and CLI against a real `actprune serve` (not the fake in tests/client):
collect -> status -> stats -> plan -> pull/show, with the server's API key."""

from __future__ import annotations

import json

import pytest
from actprune.client.cli import main as cli
from actprune.client.collect import EXAMPLE_PROMPTS
from actprune.client.http import ActpruneHTTPError, Client, ClientSettings
from actprune.core.wire.stats import Stats

from .conftest import API_KEY

pytestmark = pytest.mark.slow


def test_collect_then_client_and_cli_read_what_the_server_counted(keyed, tmp_path, capsys):
    base = keyed.base_url
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(EXAMPLE_PROMPTS.read_text().splitlines(keepends=True)[:12]))
    with Client(base, settings=ClientSettings(api_key=API_KEY)) as c:
        c.reset()
        code = cli(["collect", "--base-url", base, "--prompts", str(prompts), "--concurrency", "4",
                    "--max-tokens", "6", "--api-key", API_KEY])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "12 ok / 12 sent" in out
        status = c.status()
        assert status.capturing and status.tokens > 0
        stats = c.stats()
        assert stats.tokens == status.tokens
        assert float(stats.group(0, "mlp")["count"]) == status.tokens
        plan = c.plan(mlp_ratio=0.5, strategy="magnitude")
        assert [len(lp.mlp_keep) for lp in plan.layers] == [192, 192]
        with pytest.raises(ActpruneHTTPError, match="mlp_ratio"):
            c.plan(mlp_ratio=2)

    with pytest.raises(ActpruneHTTPError, match="401"):
        Client(base, settings=ClientSettings(api_key="wrong")).status()

    out_file = tmp_path / "pulled.safetensors"
    assert cli(["stats", "pull", "--base-url", base, "-o", str(out_file), "--api-key", API_KEY]) == 0
    pulled = Stats.load(out_file)
    assert pulled.tokens == stats.tokens and pulled.meta["config_hash"] == stats.meta["config_hash"]
    capsys.readouterr()
    assert cli(["stats", "show", str(out_file)]) == 0
    shown = capsys.readouterr().out
    assert str(stats.tokens) in shown
    json.dumps(pulled.meta)  # metadata stays JSON-able
