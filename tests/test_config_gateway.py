"""The gateway's config: ``users.NAME.fetch`` sources and the ``gateway`` section."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from popproxy.auth.passwords import hash_password
from popproxy.config import ConfigError, FetchSource, GatewayConfig, load_config
from popproxy.config.gateway import MAX_PIPELINING_DEPTH
from popproxy.config.users import MAX_FETCH_SOURCES
from popproxy.secret import Secret

HASH = hash_password(Secret.from_str("pw"), ln=4)

HEAD = """\
listen:
  - {address: 127.0.0.1, port: 0, tls: none}
upstreams:
  provider: {host: pop.example.net}
  other: {host: pop.example.org}
"""


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("carol.secret").write_text("carol-pass\n")
    monkeypatch.setenv("CAROL_OTHER", "other-pass")


def load(text: str) -> object:
    path = Path("popproxy.yaml")
    path.write_text(HEAD + textwrap.dedent(text), encoding="utf-8")
    return load_config(path)


def issues(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return [(issue.key_path, issue.message) for issue in info.value.issues]


def user(fetch_yaml: str, *, maildir: bool = True) -> str:
    lines = f'users:\n  carol:\n    password_hash: "{HASH}"\n'
    if maildir:
        lines += "    maildir: mail/carol\n"
    return lines + textwrap.indent(textwrap.dedent(fetch_yaml), "    ")


def test_sources_load_with_their_secrets(tmp_path: Path) -> None:
    config = load(
        user("""\
        fetch:
          - upstream: provider
            upstream_user: carol@example.net
            upstream_password_file: carol.secret
          - {upstream: other, upstream_password_env: CAROL_OTHER}
        """)
    )
    carol = config.users["carol"]  # type: ignore[attr-defined]
    assert carol.maildir == tmp_path / "mail/carol"
    first, second = carol.fetch
    assert isinstance(first, FetchSource)
    assert (first.upstream, first.upstream_user, first.label) == (
        "provider",
        "carol@example.net",
        "provider/carol@example.net",
    )
    assert first.upstream_password is not None
    assert first.upstream_password.reveal() == b"carol-pass"
    assert first.upstream_refresh_token_file is None
    assert (second.upstream, second.upstream_user) == ("other", "carol")  # the local name
    assert second.upstream_password is not None
    assert second.upstream_password.reveal() == b"other-pass"
    assert config.gateway == GatewayConfig()  # type: ignore[attr-defined]
    assert config.gateway_users == (carol,)  # type: ignore[attr-defined]
    assert "carol-pass" not in repr(config)


def test_a_plain_maildir_user_has_no_sources() -> None:
    config = load(user(""))
    assert config.users["carol"].fetch == ()  # type: ignore[attr-defined]
    assert config.gateway_users == ()  # type: ignore[attr-defined]


def test_fetch_needs_a_maildir() -> None:
    found = issues(
        user(
            """\
            upstream: provider
            upstream_password_env: CAROL_OTHER
            fetch: [{upstream: other, upstream_password_env: CAROL_OTHER}]
            """,
            maildir=False,
        )
    )
    assert found == [
        (
            "users.carol.fetch",
            "fetch needs maildir: the local Maildir the sources are fetched into",
        )
    ]


@pytest.mark.parametrize(
    ("fetch", "where", "message"),
    [
        ("fetch: []", "users.carol.fetch", "expected a list of sources"),
        ("fetch: provider", "users.carol.fetch", "expected a list of sources"),
        (
            "fetch: [{upstream: provdier, upstream_password_env: CAROL_OTHER}]",
            "users.carol.fetch[0].upstream",
            "did you mean 'provider'?",
        ),
        (
            "fetch: [{upstream_password_env: CAROL_OTHER}]",
            "users.carol.fetch[0].upstream",
            "missing; expected the name of an entry in upstreams",
        ),
        (
            "fetch: [{upstream: provider}]",
            "users.carol.fetch[0].upstream_password_file",
            "missing; expected upstream_password_file or upstream_password_env",
        ),
        (
            "fetch: [{upstream: provider, upstream_password: x, upstream_password_env: CAROL_OTHER}]",  # noqa: E501
            "users.carol.fetch[0].upstream_password",
            "secrets are never inline",
        ),
        (
            "fetch: [{upstream: provider, upstream_password_env: CAROL_OTHER, every: 5}]",
            "users.carol.fetch[0].every",
            "unknown key",
        ),
        (
            "fetch: [{upstream: provider, upstream_password_env: NOT_SET_ANYWHERE}]",
            "users.carol.fetch[0].upstream_password_env",
            "not set",
        ),
    ],
)
def test_bad_sources_are_named_by_key_path(fetch: str, where: str, message: str) -> None:
    found = issues(user(fetch))
    assert len(found) == 1, found
    assert found[0][0] == where
    assert message in found[0][1]


def test_too_many_sources() -> None:
    items = ", ".join(
        f"{{upstream: provider, upstream_user: u{i}, upstream_password_env: CAROL_OTHER}}"
        for i in range(MAX_FETCH_SOURCES + 1)
    )
    ((where, message),) = issues(user(f"fetch: [{items}]"))
    assert where == "users.carol.fetch"
    assert f"at most {MAX_FETCH_SOURCES}" in message


def test_an_account_is_fetched_for_one_user_only() -> None:
    source = "{upstream: provider, upstream_user: shared, upstream_password_env: CAROL_OTHER}"
    twice = issues(user(f"fetch: [{source}, {source}]"))
    assert twice == [
        (
            "users.carol.fetch[1].upstream_user",
            "provider/shared is already fetched by this user;"
            " an upstream account is fetched for one local user only",
        )
    ]
    text = user(f"fetch: [{source}]\n") + (
        f'  dave:\n    password_hash: "{HASH}"\n    maildir: mail/dave\n    fetch: [{source}]\n'
    )
    (found,) = issues(text)
    assert found[0] == "users.dave.fetch[0].upstream_user"
    assert "already fetched by user 'carol'" in found[1]


def test_gateway_section_loads() -> None:
    config = load(
        user("")
        + """\
gateway:
  interval_seconds: 60
  jitter_seconds: 0
  max_concurrent_polls: 2
  max_connections_per_upstream: 1
  pipelining_depth: 16
  backoff_initial_seconds: 10
  backoff_max_seconds: 600
  auth_backoff_seconds: 900
  auth_backoff_max_seconds: 7200
"""
    )
    assert config.gateway == GatewayConfig(  # type: ignore[attr-defined]
        interval_seconds=60,
        jitter_seconds=0,
        max_concurrent_polls=2,
        max_connections_per_upstream=1,
        pipelining_depth=16,
        backoff_initial_seconds=10,
        backoff_max_seconds=600,
        auth_backoff_seconds=900,
        auth_backoff_max_seconds=7200,
    )


@pytest.mark.parametrize(
    ("section", "where", "message"),
    [
        ("interval_seconds: 0", "gateway.interval_seconds", "greater than 0"),
        ("interval_seconds: 100000", "gateway.interval_seconds", "at most 86400"),
        ("jitter_seconds: -1", "gateway.jitter_seconds", "0 or more"),
        ("max_concurrent_polls: 0", "gateway.max_concurrent_polls", "an integer 1..1000"),
        (
            f"pipelining_depth: {MAX_PIPELINING_DEPTH + 1}",
            "gateway.pipelining_depth",
            f"an integer 1..{MAX_PIPELINING_DEPTH}",
        ),
        (
            "{backoff_initial_seconds: 100, backoff_max_seconds: 50}",
            "gateway.backoff_max_seconds",
            "at least backoff_initial_seconds (100)",
        ),
        (
            "{auth_backoff_seconds: 100, auth_backoff_max_seconds: 50}",
            "gateway.auth_backoff_max_seconds",
            "at least auth_backoff_seconds (100)",
        ),
        ("interval: 5", "gateway.interval", "did you mean 'interval_seconds'?"),
        ("5", "gateway", "expected a mapping"),
    ],
)
def test_bad_gateway_values(section: str, where: str, message: str) -> None:
    body = section if section.startswith("{") or ":" not in section else "{" + section + "}"
    found = issues(user("") + f"gateway: {body}\n")
    assert len(found) == 1, found
    assert found[0][0] == where
    assert message in found[0][1]


def test_max_maildir_bytes_goes_with_fetch() -> None:
    source = "fetch: [{upstream: provider, upstream_password_env: CAROL_OTHER}]\n"
    config = load(user(source + "max_maildir_bytes: 1000000000\n"))
    assert config.users["carol"].max_maildir_bytes == 10**9  # type: ignore[attr-defined]
    ((where, message),) = issues(user("max_maildir_bytes: 1000000000\n"))
    assert (where, message) == ("users.carol.max_maildir_bytes", "only meaningful with fetch")
    ((where, message),) = issues(user(source + "max_maildir_bytes: 1000\n"))
    assert where == "users.carol.max_maildir_bytes"
    assert "an integer 1048576.." in message
