"""Config of token logins: an upstream's auth and oauth2 keys, a user's refresh-token file."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from popproxy import cli
from popproxy.auth.passwords import hash_password
from popproxy.config import (
    ConfigError,
    OAuth2Provider,
    UpstreamAuth,
    load_config,
)
from popproxy.config.oauth2 import endpoint_problem, preset
from popproxy.secret import Secret

HASH = hash_password(Secret.from_str("pw"), ln=4)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    token = tmp_path / "alice.token"
    token.write_text("1//refresh-token\n")
    token.chmod(0o600)


def config_with(upstream: str, user: str = "upstream_refresh_token_file: alice.token") -> Path:
    text = (
        "listen:\n  - {address: 127.0.0.1, port: 0, tls: none}\n"
        "upstreams:\n  gmail:\n"
        + textwrap.indent(textwrap.dedent(upstream), "    ")
        + f'users:\n  alice:\n    password_hash: "{HASH}"\n    upstream: gmail\n'
        "    upstream_user: alice@gmail.com\n" + textwrap.indent(textwrap.dedent(user), "    ")
    )
    path = Path("popproxy.yaml")
    path.write_text(text)
    return path


def issues(upstream: str, user: str = "upstream_refresh_token_file: alice.token") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(config_with(upstream, user))
    return [f"{i.key_path}: {i.message}" for i in info.value.issues]


GMAIL = """\
host: pop.gmail.com
auth: xoauth2
oauth2: {provider: google, client_id: "123.apps.googleusercontent.com"}
"""


def test_google_preset_fills_in_the_endpoints_and_scope(tmp_path: Path) -> None:
    config = load_config(config_with(GMAIL))
    upstream = config.upstreams["gmail"]
    assert upstream.auth is UpstreamAuth.XOAUTH2
    oauth2 = upstream.oauth2
    assert oauth2 is not None
    assert oauth2.provider is OAuth2Provider.GOOGLE
    assert oauth2.token_url == "https://oauth2.googleapis.com/token"
    assert oauth2.scope == "https://mail.google.com/"
    assert oauth2.authorization_url == "https://accounts.google.com/o/oauth2/v2/auth"
    assert oauth2.client_secret is None
    user = config.users["alice"]
    assert user.upstream_password is None
    assert user.upstream_refresh_token_file == tmp_path / "alice.token"


def test_microsoft_preset_with_a_tenant_and_a_client_secret(tmp_path: Path) -> None:
    Path("client.secret").write_text("s3cr3t\n")
    config = load_config(
        config_with("""\
        host: outlook.office365.com
        auth: oauthbearer
        oauth2:
          provider: microsoft
          tenant: contoso.onmicrosoft.com
          client_id: 00000000-0000-0000-0000-000000000000
          client_secret_file: client.secret
        """)
    )
    oauth2 = config.upstreams["gmail"].oauth2
    assert oauth2 is not None
    base = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0"
    assert oauth2.token_url == f"{base}/token"
    assert oauth2.device_authorization_url == f"{base}/devicecode"
    assert "POP.AccessAsUser.All" in oauth2.scope and "offline_access" in oauth2.scope
    assert oauth2.client_secret is not None and oauth2.client_secret.reveal() == b"s3cr3t"
    assert "s3cr3t" not in repr(oauth2)
    assert preset(OAuth2Provider.MICROSOFT).token_url.startswith(
        "https://login.microsoftonline.com/common/"
    )


def test_keys_override_the_preset() -> None:
    config = load_config(
        config_with("""\
        host: pop.gmail.com
        auth: xoauth2
        oauth2:
          provider: google
          client_id: abc
          token_url: http://127.0.0.1:8080/token
          scope: "https://mail.google.com/ openid"
        """)
    )
    oauth2 = config.upstreams["gmail"].oauth2
    assert oauth2 is not None
    assert oauth2.token_url == "http://127.0.0.1:8080/token"
    assert oauth2.scope == "https://mail.google.com/ openid"


def test_without_a_provider_token_url_and_scope_are_required() -> None:
    found = issues("""\
    host: pop.example.net
    auth: oauthbearer
    oauth2: {client_id: abc}
    """)
    assert found == [
        "upstreams.gmail.oauth2.token_url: missing; expected a string",
        "upstreams.gmail.oauth2.scope: missing; expected a string",
    ]


def test_a_token_auth_needs_an_oauth2_section() -> None:
    found = issues("host: pop.gmail.com\nauth: xoauth2\n")
    assert found == [
        "upstreams.gmail.oauth2: missing; expected an oauth2 section for auth: xoauth2"
        " (provider, client_id, ...)"
    ]


def test_oauth2_without_a_token_auth_is_refused() -> None:
    found = issues(
        "host: pop.gmail.com\noauth2: {provider: google, client_id: x}\n",
        "upstream_password_file: alice.token",
    )
    assert found == ["upstreams.gmail.oauth2: only meaningful with auth: xoauth2 or oauthbearer"]


def test_bad_values_are_named() -> None:
    found = issues("""\
    host: pop.gmail.com
    auth: xoauth3
    """)
    assert found == [
        "upstreams.gmail.auth: expected one of pass, xoauth2, oauthbearer, got the string"
        " 'xoauth3'; did you mean 'xoauth2'?"
    ]
    found = issues("""\
    host: pop.gmail.com
    auth: xoauth2
    login: plain
    oauth2: {provider: yahoo, client_id: x, tenant: t, colour: blue}
    """)
    assert found == [
        "upstreams.gmail.oauth2.colour: unknown key (expected one of: client_id, token_url,"
        " scope, provider, tenant, client_secret_file, authorization_url,"
        " device_authorization_url)",
        "upstreams.gmail.oauth2.provider: expected one of google, microsoft, got the string"
        " 'yahoo'",
        "upstreams.gmail.oauth2.tenant: only meaningful with provider: microsoft",
        "upstreams.gmail.oauth2.token_url: missing; expected a string",
        "upstreams.gmail.oauth2.scope: missing; expected a string",
        "upstreams.gmail.login: only meaningful with auth: pass",
    ]


@pytest.mark.parametrize(
    "url",
    [
        "http://oauth2.example.net/token",
        "ftp://127.0.0.1/token",
        "https:///token",
        "token",
    ],
)
def test_endpoints_must_be_https_except_to_loopback(url: str) -> None:
    assert endpoint_problem(url) is not None
    found = issues(f"""\
    host: pop.gmail.com
    auth: xoauth2
    oauth2: {{provider: google, client_id: x, token_url: "{url}"}}
    """)
    assert len(found) == 1 and found[0].startswith("upstreams.gmail.oauth2.token_url: expected an")


@pytest.mark.parametrize(
    "url", ["https://login.example.net/t", "http://127.0.0.1:9/t", "http://[::1]:9/t"]
)
def test_good_endpoints(url: str) -> None:
    assert endpoint_problem(url) is None


def test_an_empty_client_secret_file_is_refused() -> None:
    Path("empty").write_text("\n")
    found = issues("""\
    host: pop.gmail.com
    auth: xoauth2
    oauth2: {provider: google, client_id: x, client_secret_file: empty}
    """)
    assert len(found) == 1 and "it is empty" in found[0]


def test_a_token_user_needs_a_refresh_token_file_not_a_password() -> None:
    Path("pw").write_text("pw\n")
    found = issues(GMAIL, "upstream_password_file: pw")
    assert found == [
        "users.alice.upstream_password_file: the upstream logs in with auth: xoauth2; give"
        " upstream_refresh_token_file (from `popproxy oauth-login`) instead",
        "users.alice.upstream_refresh_token_file: missing; expected the file holding the"
        " refresh token for auth: xoauth2 (write it with `popproxy oauth-login`)",
    ]


def test_a_password_user_cannot_have_a_refresh_token_file() -> None:
    Path("pw").write_text("pw\n")
    found = issues(
        "host: pop.example.net\n",
        "upstream_password_file: pw\nupstream_refresh_token_file: alice.token\n",
    )
    assert found == [
        "users.alice.upstream_refresh_token_file: only meaningful with an upstream whose auth"
        " is xoauth2 or oauthbearer"
    ]


def test_a_refresh_token_file_open_to_others_is_refused() -> None:
    os.chmod("alice.token", 0o644)
    found = issues(GMAIL)
    assert len(found) == 1
    assert "mode 0644" in found[0] and "chmod 600" in found[0]


def test_a_missing_or_empty_refresh_token_file_is_refused() -> None:
    found = issues(GMAIL, "upstream_refresh_token_file: nope.token")
    assert len(found) == 1 and "does not exist" in found[0]
    Path("empty.token").write_text("\n")
    os.chmod("empty.token", 0o600)
    found = issues(GMAIL, "upstream_refresh_token_file: empty.token")
    assert len(found) == 1 and "expected a refresh token" in found[0]


def test_check_config_shows_the_token_login(capsys: pytest.CaptureFixture[str]) -> None:
    path = config_with(GMAIL)
    assert cli.main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gmail: pop.gmail.com:995 tls=implicit auth=xoauth2 provider=google" in out
    assert "token_url=https://oauth2.googleapis.com/token" in out
    assert "alice: upstream gmail as alice@gmail.com with the refresh token in" in out
    assert "1//refresh-token" not in out


def gateway_config(source: str) -> Path:
    """``config_with(GMAIL)`` plus a gateway user carol with one ``fetch`` source."""
    Path("mail").mkdir(exist_ok=True)
    path = config_with(GMAIL, "upstream_refresh_token_file: alice.token\n")
    path.write_text(
        path.read_text()
        + f'  carol:\n    password_hash: "{HASH}"\n    maildir: mail\n'
        + f"    fetch:\n      - {{upstream: gmail, upstream_user: carol@gmail.com, {source}}}\n"
    )
    return path


def gateway_issues(source: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(gateway_config(source))
    return [f"{i.key_path}: {i.message}" for i in info.value.issues]


def test_a_gateway_source_on_a_token_upstream_takes_a_refresh_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "carol.token"
    token.write_text("1//carol-refresh\n")
    token.chmod(0o600)
    config = load_config(gateway_config("upstream_refresh_token_file: carol.token"))
    (source,) = config.users["carol"].fetch
    assert source.upstream_refresh_token_file == token
    assert source.upstream_password is None
    assert cli.main(["check-config", "-c", "popproxy.yaml"]) == 0
    out = capsys.readouterr().out
    assert f"fetch: gmail/carol@gmail.com with the refresh token in {token}" in out
    assert "1//carol-refresh" not in out


def test_a_gateway_source_is_checked_like_a_proxy_user() -> None:
    Path("pw").write_text("pw\n")
    assert gateway_issues("upstream_password_file: pw") == [
        "users.carol.fetch[0].upstream_password_file: the upstream logs in with auth: xoauth2;"
        " give upstream_refresh_token_file (from `popproxy oauth-login`) instead",
        "users.carol.fetch[0].upstream_refresh_token_file: missing; expected the file holding"
        " the refresh token for auth: xoauth2 (write it with `popproxy oauth-login`)",
    ]
    # Mutually exclusive: a password beside the token file is refused, not ignored.
    both = "upstream_refresh_token_file: alice.token, upstream_password_file: pw"
    assert gateway_issues(both) == [
        "users.carol.fetch[0].upstream_password_file: the upstream logs in with auth: xoauth2;"
        " give upstream_refresh_token_file (from `popproxy oauth-login`) instead",
    ]
    Path("open.token").write_text("1//x\n")
    os.chmod("open.token", 0o644)
    [found] = gateway_issues("upstream_refresh_token_file: open.token")
    assert found.startswith("users.carol.fetch[0].upstream_refresh_token_file: ")
    assert "mode 0644" in found and "chmod 600" in found
    [found] = gateway_issues("upstream_refresh_token_file: nope.token")
    assert "does not exist" in found


def test_a_gateway_source_on_a_password_upstream_cannot_have_a_refresh_token_file() -> None:
    Path("pw").write_text("pw\n")
    path = config_with("host: pop.example.net\n", "upstream_password_file: pw\n")
    Path("mail").mkdir()
    path.write_text(
        path.read_text()
        + f'  carol:\n    password_hash: "{HASH}"\n    maildir: mail\n'
        + "    fetch:\n      - {upstream: gmail, upstream_password_file: pw,"
        " upstream_refresh_token_file: alice.token}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [f"{i.key_path}: {i.message}" for i in info.value.issues] == [
        "users.carol.fetch[0].upstream_refresh_token_file: only meaningful with an upstream"
        " whose auth is xoauth2 or oauthbearer"
    ]
