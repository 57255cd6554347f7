"""The token endpoint client (popproxy.oauth2.cache.TokenEndpoint) against a real HTTP server."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from oauth2_provider import FakeProvider, running_provider

from popproxy.config import OAuth2Config
from popproxy.oauth2.cache import TokenAccount, TokenEndpoint
from popproxy.oauth2.grants import TokenError, TokenErrorKind
from popproxy.secret import Secret


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with running_provider(FakeProvider(client_secret="shh")) as p:
        yield p


def account_for(url: str, *, secret: bytes | None = b"shh") -> TokenAccount:
    oauth2 = OAuth2Config(
        client_id="popproxy-test-client",
        token_url=url,
        scope="mail",
        client_secret=Secret(secret) if secret else None,
    )
    return TokenAccount("up", "alice", Path("/nonexistent"), oauth2)


async def test_refresh(provider: FakeProvider) -> None:
    refresh = provider.grant("alice")
    grant = await TokenEndpoint().refresh(account_for(provider.token_url), Secret.from_str(refresh))
    assert provider.user_of(grant.access_token.reveal().decode()) == "alice"
    assert grant.expires_in == provider.lifetime
    assert grant.refresh_token is None


async def test_rotation(provider: FakeProvider) -> None:
    provider.rotate = True
    refresh = provider.grant("alice")
    grant = await TokenEndpoint().refresh(account_for(provider.token_url), Secret.from_str(refresh))
    assert grant.refresh_token is not None and grant.refresh_token.reveal() != refresh.encode()


@pytest.mark.parametrize(
    ("setup", "kind"),
    [
        ("revoked", TokenErrorKind.REVOKED),
        ("wrong_secret", TokenErrorKind.REJECTED),
        ("down", TokenErrorKind.UNAVAILABLE),
    ],
)
async def test_errors(provider: FakeProvider, setup: str, kind: TokenErrorKind) -> None:
    refresh = provider.grant("alice")
    account = account_for(provider.token_url)
    if setup == "revoked":
        provider.revoke(refresh)
    elif setup == "wrong_secret":
        account = account_for(provider.token_url, secret=b"wrong")
    else:
        provider.down = True
    with pytest.raises(TokenError) as info:
        await TokenEndpoint().refresh(account, Secret.from_str(refresh))
    assert info.value.kind is kind


async def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TokenError) as info:
        await TokenEndpoint().refresh(account_for(f"http://127.0.0.1:{port}/token"), Secret(b"r"))
    assert info.value.kind is TokenErrorKind.UNAVAILABLE


async def test_a_silent_endpoint_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("popproxy.oauth2.cache.TOKEN_REQUEST_TIMEOUT_SECONDS", 0.3)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/token"
        started = trio.current_time()
        with pytest.raises(TokenError) as info:
            await TokenEndpoint().refresh(account_for(url), Secret(b"r"))
    assert info.value.kind is TokenErrorKind.UNAVAILABLE
    assert trio.current_time() - started < 3
