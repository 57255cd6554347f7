"""Access tokens per account (popproxy.oauth2.cache): ahead of expiry, single-flight, backoff.

The refresher here is a function standing in for the token endpoint (the endpoint
itself is tested against a real HTTP server in test_token_endpoint.py); the clock is
trio's autojump clock, so the expiries and backoffs take no real time.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.config import OAuth2Config
from popproxy.oauth2.cache import (
    BACKOFF_INITIAL_SECONDS,
    BACKOFF_MAX_SECONDS,
    REFRESH_AHEAD_SECONDS,
    TokenAccount,
    TokenCache,
    refresh_margin,
)
from popproxy.oauth2.grants import TokenError, TokenErrorKind, TokenGrant
from popproxy.outcomes import TokenRefreshResult
from popproxy.secret import Secret

OAUTH2 = OAuth2Config(client_id="c", token_url="https://t.example/token", scope="s")


@dataclass
class Endpoint:
    """What the token endpoint would answer: tokens of ``lifetime``, or ``error``."""

    lifetime: float = 3600.0
    rotate: bool = False
    error: TokenError | None = None
    delay: float = 0.5
    calls: list[bytes] = field(default_factory=list)

    async def refresh(self, account: TokenAccount, refresh_token: Secret) -> TokenGrant:
        self.calls.append(refresh_token.reveal())
        await trio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        n = len(self.calls)
        rotated = Secret(b"rt-%d" % n) if self.rotate else None
        return TokenGrant(Secret(b"at-%d" % n), self.lifetime, rotated)


@pytest.fixture
def account(tmp_path: Path) -> TokenAccount:
    path = tmp_path / "alice.token"
    path.write_text("rt-0\n")
    path.chmod(0o600)
    return TokenAccount("gmail", "alice@gmail.com", path, OAUTH2)


def test_refresh_margin() -> None:
    assert refresh_margin(3600) == REFRESH_AHEAD_SECONDS
    assert refresh_margin(2) == 0.5


async def test_cached_until_shortly_before_expiry(
    account: TokenAccount, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = Endpoint(lifetime=100)
    cache = TokenCache(endpoint.refresh)
    assert await cache.access_token(account) == Secret(b"at-1")
    assert endpoint.calls == [b"rt-0"]
    await trio.sleep(100 - 25 - 0.1)  # a quarter of the lifetime ahead: 25 s
    assert await cache.access_token(account) == Secret(b"at-1")
    await trio.sleep(0.2)
    assert await cache.access_token(account) == Secret(b"at-2")
    assert len(endpoint.calls) == 2


async def test_one_refresh_for_fifty_concurrent_logins(
    account: TokenAccount, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = Endpoint(lifetime=2)
    cache = TokenCache(endpoint.refresh)
    got: list[Secret] = []

    async def login() -> None:
        got.append(await cache.access_token(account))

    for round_ in range(1, 4):
        got.clear()
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(login)
        assert len(endpoint.calls) == round_
        assert set(got) == {Secret(b"at-%d" % round_)}
        await trio.sleep(2)  # past expiry


async def test_stale_token_forces_one_refresh_and_newer_tokens_are_kept(
    account: TokenAccount, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = Endpoint()
    cache = TokenCache(endpoint.refresh)
    first = await cache.access_token(account)
    fresh: list[Secret] = []

    async def retry() -> None:
        fresh.append(await cache.access_token(account, stale=first))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(retry)
    assert len(endpoint.calls) == 2  # ten sessions refused with the same token: one refresh
    assert set(fresh) == {Secret(b"at-2")}


async def test_rotation_is_written_back_0600(
    account: TokenAccount, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = Endpoint(lifetime=10, rotate=True)
    cache = TokenCache(endpoint.refresh)
    await cache.access_token(account)
    assert account.token_file.read_text() == "rt-1\n"
    assert stat.S_IMODE(account.token_file.stat().st_mode) == 0o600
    await trio.sleep(10)
    await cache.access_token(account)
    assert endpoint.calls == [b"rt-0", b"rt-1"]  # the rotated token was used next
    assert account.token_file.read_text() == "rt-2\n"


async def test_revoked_refresh_token_says_to_run_oauth_login(
    account: TokenAccount,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint = Endpoint(error=TokenError(TokenErrorKind.REVOKED, "invalid_grant"))
    seen: list[tuple[str, TokenRefreshResult]] = []
    cache = TokenCache(endpoint.refresh, on_refresh=lambda up, result: seen.append((up, result)))
    with caplog.at_level(logging.INFO, logger="popproxy.oauth2"), pytest.raises(TokenError) as info:
        await cache.access_token(account, session="s1")
    assert info.value.kind is TokenErrorKind.REVOKED
    assert seen == [("gmail", TokenRefreshResult.REVOKED)]
    [record] = [r for r in caplog.records if r.msg == "oauth2_refresh_token_revoked"]
    fields = record.fields  # type: ignore[attr-defined]
    assert "popproxy oauth-login" in fields["action"]
    assert fields["session"] == "s1" and fields["upstream"] == "gmail"
    assert "rt-0" not in caplog.text


async def test_backoff_while_the_endpoint_is_down(
    account: TokenAccount, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = Endpoint(error=TokenError(TokenErrorKind.UNAVAILABLE, "http 503"), delay=0)
    cache = TokenCache(endpoint.refresh)
    waits = []
    backoff = BACKOFF_INITIAL_SECONDS
    for _ in range(9):
        with pytest.raises(TokenError):
            await cache.access_token(account)
        calls = len(endpoint.calls)
        with pytest.raises(TokenError):  # within the backoff: the same error, no request
            await cache.access_token(account)
        assert len(endpoint.calls) == calls
        waits.append(backoff)
        await trio.sleep(backoff)
        backoff = min(BACKOFF_MAX_SECONDS, backoff * 2)
    assert len(endpoint.calls) == 9
    assert waits[-1] == BACKOFF_MAX_SECONDS
    endpoint.error = None
    assert await cache.access_token(account) == Secret(b"at-10")


async def test_an_unreadable_token_file_is_unavailable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = Endpoint()
    cache = TokenCache(endpoint.refresh)
    missing = TokenAccount("gmail", "bob", tmp_path / "nope", OAUTH2)
    with pytest.raises(TokenError) as info:
        await cache.access_token(missing)
    assert info.value.kind is TokenErrorKind.UNAVAILABLE
    assert endpoint.calls == []
    assert "oauth2_token_file_error" in caplog.text


async def test_oldest_token_age(
    account: TokenAccount, autojump_clock: trio.testing.MockClock
) -> None:
    cache = TokenCache(Endpoint(delay=0).refresh, age_clock=trio.current_time)
    assert cache.oldest_token_age("gmail") == 0.0
    await cache.access_token(account)
    await trio.sleep(30)
    other = TokenAccount("gmail", "bob", account.token_file, OAUTH2)
    await cache.access_token(other)
    await trio.sleep(5)
    assert cache.oldest_token_age("gmail") == pytest.approx(35)
    assert cache.oldest_token_age("outlook") == 0.0


async def test_failing_accounts_count_each_account_until_its_refresh_succeeds(
    account: TokenAccount, autojump_clock: trio.testing.MockClock
) -> None:
    """An account whose refresh failed counts as failing (by its result) until a later
    refresh succeeds, however long it goes untried: what the alert needs for a gateway
    source polled once an hour."""
    endpoint = Endpoint(error=TokenError(TokenErrorKind.REVOKED, "invalid_grant"), delay=0)
    cache = TokenCache(endpoint.refresh)
    other = TokenAccount("gmail", "bob", account.token_file, OAUTH2)
    elsewhere = TokenAccount("outlook", "carol", account.token_file, OAUTH2)
    for failed in (account, other, elsewhere):
        with pytest.raises(TokenError):
            await cache.access_token(failed)
    assert cache.failing_accounts("gmail", TokenRefreshResult.REVOKED) == 2
    assert cache.failing_accounts("gmail", TokenRefreshResult.UNAVAILABLE) == 0
    assert cache.failing_accounts("outlook", TokenRefreshResult.REVOKED) == 1
    await trio.sleep(3600)  # untried for an hour: still failing
    assert cache.failing_accounts("gmail", TokenRefreshResult.REVOKED) == 2
    endpoint.error = TokenError(TokenErrorKind.UNAVAILABLE, "http 503")
    with pytest.raises(TokenError):
        await cache.access_token(other)  # its result is now the latest one's
    assert cache.failing_accounts("gmail", TokenRefreshResult.REVOKED) == 1
    assert cache.failing_accounts("gmail", TokenRefreshResult.UNAVAILABLE) == 1
    endpoint.error = None  # the operator ran oauth-login; the endpoint is back
    await trio.sleep(BACKOFF_MAX_SECONDS)
    await cache.access_token(account)
    await cache.access_token(other)
    for result in TokenRefreshResult:
        assert cache.failing_accounts("gmail", result) == 0
    assert cache.failing_accounts("outlook", TokenRefreshResult.REVOKED) == 1


async def test_retain_forgets_accounts_no_longer_configured(
    account: TokenAccount, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = Endpoint(error=TokenError(TokenErrorKind.REJECTED, "invalid_client"), delay=0)
    cache = TokenCache(endpoint.refresh, age_clock=trio.current_time)
    removed = TokenAccount("gmail", "bob", account.token_file, OAUTH2)
    with pytest.raises(TokenError):
        await cache.access_token(removed)
    endpoint.error = None
    await cache.access_token(account)
    await trio.sleep(30)
    cache.retain({account.key})
    assert cache.failing_accounts("gmail", TokenRefreshResult.REJECTED) == 0
    assert cache.oldest_token_age("gmail") == pytest.approx(30)  # the kept one's token
    cache.retain(set())
    assert cache.oldest_token_age("gmail") == 0.0
