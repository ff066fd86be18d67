"""The client's settings never print the API key (issue 12, finding 6)."""

from __future__ import annotations

from actprune.client.http import Client, ClientSettings


def test_client_settings_repr_never_shows_the_key():
    settings = ClientSettings.from_env({"ACTPRUNE_API_KEY": "s3cret-key"})
    assert settings.api_key == "s3cret-key"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    with Client("http://127.0.0.1:9", api_key="s3cret-key") as c:
        assert "s3cret" not in repr(c.settings)
