"""The process state kept across reloads: which token accounts a config has, and that a
reload forgets the tokens (and failures) of accounts it removed."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.auth.passwords import hash_password
from popproxy.config import Config, load_config
from popproxy.metrics import Metrics
from popproxy.oauth2.cache import TokenAccount
from popproxy.oauth2.grants import TokenError
from popproxy.outcomes import TokenRefreshResult
from popproxy.runtime import ProcessState, token_accounts
from popproxy.secret import Secret

HASH = hash_password(Secret.from_str("pw"), ln=4)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the config's relative paths are the working directory's


def load(tmp_path: Path, users: str) -> Config:
    for name in ("alice.token", "carol.token", "bob.secret", "carol.secret"):
        secret = tmp_path / name
        secret.write_text("1//refresh-token\n" if name.endswith("token") else "pw\n")
        secret.chmod(0o600)
    (tmp_path / "mail").mkdir(exist_ok=True)
    text = textwrap.dedent("""\
        listen:
          - {address: 127.0.0.1, port: 0, tls: none}
        upstreams:
          gmail:
            host: pop.gmail.com
            auth: xoauth2
            oauth2: {provider: google, client_id: "123.apps.googleusercontent.com"}
          provider: {host: pop.example.net}
        users:
        """) + textwrap.indent(textwrap.dedent(users).replace("HASH", HASH), "  ")
    path = tmp_path / "popproxy.yaml"
    path.write_text(text)
    return load_config(path)


ALL_USERS = """\
alice:
  password_hash: "HASH"
  upstream: gmail
  upstream_user: alice@gmail.com
  upstream_refresh_token_file: alice.token
bob:
  password_hash: "HASH"
  upstream: provider
  upstream_password_file: bob.secret
carol:
  password_hash: "HASH"
  maildir: mail
  fetch:
    - {upstream: gmail, upstream_user: carol@gmail.com, upstream_refresh_token_file: carol.token}
    - {upstream: provider, upstream_user: carol, upstream_password_file: carol.secret}
"""
WITHOUT_CAROLS_GMAIL = ALL_USERS.replace(
    "    - {upstream: gmail, upstream_user: carol@gmail.com,"
    " upstream_refresh_token_file: carol.token}\n",
    "",
)


def test_token_accounts_are_the_proxy_users_and_gateway_sources_with_tokens(
    tmp_path: Path,
) -> None:
    config = load(tmp_path, ALL_USERS)
    assert token_accounts(config) == {("gmail", "alice@gmail.com"), ("gmail", "carol@gmail.com")}


async def test_a_reload_forgets_the_failing_token_account_it_removed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = load(tmp_path, ALL_USERS)
    state = ProcessState.start(config, metrics=Metrics.unexported(), clock=_now)
    tokens = state.maildrops.tokens
    oauth2 = config.upstreams["gmail"].oauth2
    assert oauth2 is not None
    for user in ("alice@gmail.com", "carol@gmail.com"):
        # A refresh-token file that cannot be read fails the refresh before any request.
        with pytest.raises(TokenError):
            await tokens.access_token(TokenAccount("gmail", user, tmp_path / "gone", oauth2))
    assert tokens.failing_accounts("gmail", TokenRefreshResult.UNAVAILABLE) == 2
    state.adopt(load(tmp_path, WITHOUT_CAROLS_GMAIL))
    assert tokens.failing_accounts("gmail", TokenRefreshResult.UNAVAILABLE) == 1


def _now() -> datetime:
    return datetime.now(UTC)
