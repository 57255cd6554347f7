"""The settings oauth-login signs in with (popproxy.commands.oauth_login)."""

from __future__ import annotations

from pathlib import Path

import pytest

from popproxy.commands.oauth_login import LoginOptions, UsageError, login_settings
from popproxy.config import OAuth2Provider
from popproxy.secret import Secret


def test_the_preset_with_options_on_top(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("shh\n")
    settings = login_settings(
        LoginOptions(
            provider=OAuth2Provider.MICROSOFT,
            tenant="contoso.com",
            client_id="id",
            client_secret_file=secret,
            scope="custom",
        )
    )
    assert settings.token_url == "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"
    assert settings.scope == "custom"
    assert settings.client_secret == Secret(b"shh")


def test_a_config_upstream_with_options_on_top(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "listen: [{address: 127.0.0.1, port: 0, tls: none}]\n"
        "upstreams:\n  g:\n    host: pop.gmail.com\n    auth: xoauth2\n"
        "    oauth2: {provider: google, client_id: from-config}\n"
    )
    settings = login_settings(LoginOptions(config=config, upstream="g"))
    assert settings.client_id == "from-config"
    assert settings.provider is OAuth2Provider.GOOGLE
    assert settings.authorization_url == "https://accounts.google.com/o/oauth2/v2/auth"
    over = login_settings(LoginOptions(config=config, upstream="g", client_id="other"))
    assert over.client_id == "other"
    with pytest.raises(UsageError, match="no upstream 'x'"):
        login_settings(LoginOptions(config=config, upstream="x"))
    with pytest.raises(UsageError, match="needs --upstream"):
        login_settings(LoginOptions(config=config))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (LoginOptions(), "give --provider"),
        (LoginOptions(provider=OAuth2Provider.GOOGLE), "--client-id"),
        (LoginOptions(token_url="https://t/x", client_id="i"), "--client-id, and a token URL"),
        (
            LoginOptions(token_url="http://t.example/x", client_id="i", scope="s"),
            "expected an https URL",
        ),
    ],
)
def test_usage_errors(options: LoginOptions, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        login_settings(options)
