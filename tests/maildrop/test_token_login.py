"""Token logins upstream (popproxy.maildrop.token_login, upstream_login.open_account).

Against the scripted upstreams of test_upstream.py: the AUTH goes alone (nothing may
follow it before its reply, since a challenge would take the next line as its answer),
and the listing follows in one write once the login is accepted; a password login
keeps its single write. The token cache's refresher is a function here; the endpoint
itself is tested in tests/oauth2, and the whole path against Dovecot in
tests/integration/test_oauth2.py.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pytest
import trio
from test_upstream import CAPA_PIPELINING, Peer, account, multiline, scripted_upstream

from popproxy.config import OAuth2Config, UpstreamAuth
from popproxy.maildrop.connection import UpstreamError
from popproxy.maildrop.route import RefreshTokenFile
from popproxy.maildrop.upstream_login import CapabilityMemo, UpstreamAccount, open_account
from popproxy.oauth2.cache import TokenAccount, TokenCache
from popproxy.oauth2.grants import TokenError, TokenErrorKind, TokenGrant
from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.replies import ResponseCode
from popproxy.secret import Secret

OAUTH2 = OAuth2Config(client_id="c", token_url="https://t.example/token", scope="s")
USER = "alice@example.net"


def token_account(port: int, tmp_path: Path, auth: UpstreamAuth) -> UpstreamAccount:
    base = account(port).upstream
    upstream = dataclasses.replace(base, auth=auth, oauth2=OAUTH2)
    path = tmp_path / "alice.token"
    path.write_text("rt\n")
    path.chmod(0o600)
    return UpstreamAccount(upstream, USER, RefreshTokenFile(path))


def xoauth2(token: bytes) -> bytes:
    return base64.b64encode(b"user=" + USER.encode() + b"\x01auth=Bearer " + token + b"\x01\x01")


class Endpoint:
    def __init__(self, error: TokenError | None = None, length: int = 10) -> None:
        self.error = error
        self.length = length
        self.calls = 0

    async def refresh(self, account: TokenAccount, refresh_token: Secret) -> TokenGrant:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return TokenGrant(Secret(b"t%d" % self.calls + b"x" * self.length), 3600)


async def test_auth_alone_then_the_listing_in_one_write(tmp_path: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.reply_after_one_line(b"CAPA", multiline(CAPA_PIPELINING))
        await peer.reply_after_one_line(b"AUTH XOAUTH2 " + xoauth2(b"t1xxxxxxxxxx"), b"+OK\r\n")
        await peer.expect(b"UIDL", b"LIST")
        await peer.send(multiline([b"1 uid-a"]) + multiline([b"1 42"]))
        await peer.until_eof()

    cache = TokenCache(Endpoint().refresh)
    async with scripted_upstream(script) as upstream:
        acct = token_account(upstream.port, tmp_path, UpstreamAuth.XOAUTH2)
        connection, listing = await open_account(acct, tls_context=None, tokens=cache)
        assert [(m.uid, m.size) for m in listing] == [("uid-a", 42)]
        await connection.aclose()


async def test_with_a_memo_capa_and_auth_go_together_and_the_listing_after(
    tmp_path: Path,
) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.expect(
            b"CAPA",
            b"AUTH OAUTHBEARER "
            + base64.b64encode(
                b"n,a="
                + USER.encode()
                + b",\x01host=127.0.0.1\x01port=%d\x01" % peer_port[0]
                + b"auth=Bearer t1xxxxxxxxxx\x01\x01"
            ),
        )
        await trio.testing.wait_all_tasks_blocked()
        assert not peer.pending()
        await peer.send(multiline(CAPA_PIPELINING) + b"+OK\r\n")
        await peer.expect(b"UIDL", b"LIST")
        await peer.send(multiline([]) + multiline([]))
        await peer.until_eof()

    peer_port = [0]
    memo = CapabilityMemo({"PIPELINING": (), "UIDL": ()})
    cache = TokenCache(Endpoint().refresh)
    async with scripted_upstream(script) as upstream:
        peer_port[0] = upstream.port
        acct = token_account(upstream.port, tmp_path, UpstreamAuth.OAUTHBEARER)
        connection, listing = await open_account(
            acct, tls_context=None, tokens=cache, capabilities=memo
        )
        assert listing == []
        await connection.aclose()


async def test_a_long_token_takes_the_two_step_exchange(tmp_path: Path) -> None:
    long = b"t1" + b"x" * 300

    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.reply_after_one_line(b"CAPA", multiline([b"UIDL", b"SASL XOAUTH2"]))
        await peer.reply_after_one_line(b"AUTH XOAUTH2", b"+ \r\n")
        await peer.reply_after_one_line(xoauth2(long), b"+OK\r\n")
        await peer.reply_after_one_line(b"UIDL", multiline([]))
        await peer.reply_after_one_line(b"LIST", multiline([]))
        await peer.until_eof()

    cache = TokenCache(Endpoint(length=300).refresh)
    async with scripted_upstream(script) as upstream:
        acct = token_account(upstream.port, tmp_path, UpstreamAuth.XOAUTH2)
        connection, _ = await open_account(acct, tls_context=None, tokens=cache)
        await connection.aclose()


@pytest.mark.parametrize(
    ("kind", "code", "failure"),
    [
        (TokenErrorKind.UNAVAILABLE, ResponseCode.SYS_TEMP, UpstreamFailure.TOKEN_UNAVAILABLE),
        (TokenErrorKind.REJECTED, ResponseCode.SYS_TEMP, UpstreamFailure.TOKEN_UNAVAILABLE),
        (TokenErrorKind.REVOKED, ResponseCode.AUTH, UpstreamFailure.TOKEN_REJECTED),
    ],
)
async def test_no_token_no_connection(
    tmp_path: Path, kind: TokenErrorKind, code: ResponseCode, failure: UpstreamFailure
) -> None:
    # Port 9 of an address nothing listens on: a connection attempt would fail differently.
    acct = token_account(9, tmp_path, UpstreamAuth.XOAUTH2)
    cache = TokenCache(Endpoint(TokenError(kind, "x")).refresh)
    with pytest.raises(UpstreamError) as info:
        await open_account(acct, tls_context=None, tokens=cache)
    assert (info.value.code, info.value.failure) == (code, failure)
    assert "Bearer" not in info.value.text


async def test_a_refused_fresh_token_is_auth_after_one_retry(tmp_path: Path) -> None:
    """invalid_token gets one refresh and one retry on a new connection; refused again,
    the client hears [AUTH]. (Both attempts reach this one-connection script in turn:
    the first connection's refusal closes it, so the second is refused at connect.)"""
    error = base64.b64encode(b'{"status":"invalid_token"}')

    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.reply_after_one_line(b"CAPA", multiline([b"UIDL"]))
        await peer.reply_after_one_line(
            b"AUTH XOAUTH2 " + xoauth2(b"t1xxxxxxxxxx"), b"+ " + error + b"\r\n"
        )
        await peer.reply_after_one_line(b"", b"-ERR [AUTH] Authentication failed.\r\n")
        await peer.until_eof()

    endpoint = Endpoint()
    cache = TokenCache(endpoint.refresh)
    async with scripted_upstream(script) as upstream:
        acct = token_account(upstream.port, tmp_path, UpstreamAuth.XOAUTH2)
        with pytest.raises(UpstreamError) as info:
            await open_account(acct, tls_context=None, tokens=cache)
    assert endpoint.calls == 2  # the refused token was replaced once
    assert info.value.code is ResponseCode.SYS_TEMP  # the retry found no upstream listening
