"""The upstream connection as the gateway drives it (popproxy.maildrop.connection).

The scripted upstreams of test_upstream.py: pipelined RETRs in one write, each
body streamed to a sink, un-stuffed or still stuffed; ``exchange`` breaking the
connection when a reply is left half read; the ``Login`` seam answering a SASL
challenge. No Mock stands in for a peer.
"""

from __future__ import annotations

import base64
import logging

import pytest
from prometheus_client import CollectorRegistry
from test_upstream import (
    CAPA_PIPELINING,
    MESSAGES,
    Mailbox,
    Peer,
    account,
    multiline,
    scripted_upstream,
    stuff,
)

from popproxy.maildrop.connection import UpstreamConnection, UpstreamError
from popproxy.maildrop.token_login import TokenLogin, TokenRefused
from popproxy.maildrop.upstream_login import open_connection
from popproxy.metrics import Metrics
from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.client_replies import ListedMessage
from popproxy.pop3.commands import Noop, Retr, Stat
from popproxy.pop3.oauth import OAuthMechanism
from popproxy.pop3.replies import Ok, ResponseCode
from popproxy.secret import Secret


async def open_to(port: int) -> tuple[UpstreamConnection, list[ListedMessage]]:
    drop_account = account(port)
    return await open_connection(drop_account.upstream, drop_account.login(), tls_context=None)


@pytest.mark.parametrize("stuffed", [False, True], ids=["unstuffed", "stuffed"])
async def test_pipelined_retrs_go_in_one_write_and_stream_to_a_sink(stuffed: bool) -> None:
    async with scripted_upstream(Mailbox(MESSAGES, capa=CAPA_PIPELINING)) as upstream:
        connection, listing = await open_to(upstream.port)
        assert [m.number for m in listing] == [1, 2, 3]
        assert connection.pipelining
        bodies: list[bytes] = []
        with connection.exchange():
            await connection.send(Retr(1), Retr(2), Retr(3), stuffed_body=stuffed)
            for _ in listing:
                chunks: list[bytes] = []

                async def sink(data: bytes | bytearray, chunks: list[bytes] = chunks) -> None:
                    chunks.append(bytes(data))

                assert isinstance(await connection.status(), Ok)
                await connection.stream_body(sink, read_seconds=1.0)
                bodies.append(b"".join(chunks))
        await connection.commit([2])
    expected = [m for _, (_, m) in sorted(MESSAGES.items())]
    assert bodies == ([stuff(m) for m in expected] if stuffed else expected)
    retrs = [read for read, _ in upstream.peer.reads if read.startswith(b"RETR")]
    assert retrs == [b"RETR 1\r\nRETR 2\r\nRETR 3\r\n"]
    assert upstream.lines[-2:] == [b"DELE 2", b"QUIT"]


# As an upstream that does not dot-stuff sends it: a line of a single dot ended by a bare
# LF, then text a lenient client would take for a reply (RFC 1939 §3 has no such line).
POISONED = b"Subject: poisoned\r\n\r\n.\n+OK FAKE\r\n"


@pytest.mark.parametrize("stuffed", [False, True], ids=["unstuffed", "stuffed"])
async def test_a_poisoned_dot_line_streams_as_content_counted_and_logged(
    stuffed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """What the gateway's local copy needs: the body is the upstream's octets (``.`` LF
    kept, or stuffed to ``..`` LF for a relay), the connection stays usable, and the line
    is counted and logged once for the reply."""
    caplog.set_level(logging.INFO)
    metrics = Metrics(CollectorRegistry())
    metrics.declare(upstreams=["provider"])
    mailbox = Mailbox(
        {1: (b"uid-poisoned", POISONED)}, replies={b"RETR 1": b"+OK\r\n" + POISONED + b".\r\n"}
    )
    async with scripted_upstream(mailbox) as upstream:
        drop_account = account(upstream.port)
        connection, _ = await open_connection(
            drop_account.upstream,
            drop_account.login(),
            tls_context=None,
            metrics=metrics.upstream("provider"),
        )
        chunks: list[bytes] = []

        async def sink(data: bytes | bytearray) -> None:
            chunks.append(bytes(data))

        with connection.exchange():
            await connection.send(Retr(1), stuffed_body=stuffed)
            assert isinstance(await connection.status(), Ok)
            await connection.stream_body(sink, read_seconds=1.0)
        assert connection.idle
        with connection.exchange():
            assert isinstance(await connection.request(Noop(), within=1.0), Ok)
        await connection.commit([])
    expected = b"Subject: poisoned\r\n\r\n..\n+OK FAKE\r\n" if stuffed else POISONED
    assert b"".join(chunks) == expected
    sample = metrics.registry.get_sample_value(
        "popproxy_upstream_poisoned_dot_lines_total", {"upstream": "provider"}
    )
    assert sample == 1
    logged = [r for r in caplog.records if r.getMessage() == "upstream_poisoned_dot_line"]
    assert [getattr(r, "fields", None) for r in logged] == [{"upstream": "provider", "lines": 1}]


class StoppedEarly(Exception):
    """Any stop in the middle of a body: a caller's error, a cancel, a closed generator."""


async def test_a_reply_left_half_read_breaks_the_connection() -> None:
    async with scripted_upstream(Mailbox(MESSAGES)) as upstream:
        connection, _ = await open_to(upstream.port)
        with pytest.raises(StoppedEarly), connection.exchange():
            await connection.send(Retr(1))
            await connection.status()
            raise StoppedEarly
        assert not connection.idle
        with pytest.raises(UpstreamError) as info, connection.exchange():
            pytest.fail("a broken connection is never used again")
        assert info.value.failure is UpstreamFailure.CLOSED
        await connection.aclose()
    assert upstream.lines[-1] == b"RETR 1"


async def test_an_err_read_in_full_leaves_the_connection_usable() -> None:
    async with scripted_upstream(Mailbox(MESSAGES)) as upstream:
        connection, _ = await open_to(upstream.port)
        with connection.exchange():
            assert not isinstance(await connection.request(Stat(), within=1.0), Ok)
        assert connection.idle
        with connection.exchange():
            assert isinstance(await connection.request(Noop(), within=1.0), Ok)
        await connection.aclose()


GOOGLE_401 = b'{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}'


async def test_a_token_login_plugs_into_the_seam_and_its_error_challenge_is_answered() -> None:
    """The XOAUTH2 login (maildrop/token_login.py) through the Login seam: its error
    challenge gets the empty line before the -ERR, which asks for a retry."""
    token = Secret(b"ya29.token")
    response = b"user=" + b"someone@example.net\x01auth=Bearer ya29.token\x01\x01"

    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.reply_after_one_line(b"CAPA", multiline([b"UIDL", b"SASL XOAUTH2"]))
        await peer.reply_after_one_line(
            b"AUTH XOAUTH2 " + base64.b64encode(response),
            b"+ " + base64.b64encode(GOOGLE_401) + b"\r\n",
        )
        await peer.reply_after_one_line(b"", b"-ERR [AUTH] Invalid credentials.\r\n")
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        upstream_config = account(upstream.port).upstream
        login = TokenLogin(
            OAuthMechanism.XOAUTH2,
            "someone@example.net",
            token,
            upstream="provider",
            host="127.0.0.1",
            port=upstream.port,
        )
        with pytest.raises(TokenRefused) as info:
            await open_connection(upstream_config, login, tls_context=None)
    assert info.value.retry
    assert info.value.failure is UpstreamFailure.TOKEN_REJECTED
    assert info.value.code is ResponseCode.AUTH
