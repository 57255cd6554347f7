"""popproxy/native_tls.py over loopback TCP: the listeners' TLS on the kernel socket.

The ALPN check (ALPACA, RFC 7301 §3.2) by peeking, also at a ClientHello cut into
pieces; data both ways; a cancelled receive loses nothing; clean, ragged and reset
ends; close_notify on aclose; the socket closed after a failed handshake; any other
transport falls back to trio.SSLStream. Every test runs under a deadline.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from test_socket_stream import observe_yields
from test_tls import client_hello_of

from popproxy.config import TlsConfig
from popproxy.native_tls import NativeTlsStream, accept_tls
from popproxy.socket_stream import (
    MAX_OPS_WITHOUT_CHECKPOINT,
    TcpStream,
    wait_bounded,
)
from popproxy.tls import AlpnRefused, server_context
from popproxy.tls_hello import NO_APPLICATION_PROTOCOL_ALERT

DEADLINE_SECONDS = 10


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    pem = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    return server_context(TlsConfig(pem, pem))


def client_context(ca: trustme.CA, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


@pytest.fixture
async def pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """A connected loopback TCP pair: (the server's accepted stream, the client's)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    accepted = await listeners[0].accept()
    yield accepted, client
    for stream in (accepted, client, *listeners):
        await trio.aclose_forcefully(stream)


async def handshake(
    transport: trio.abc.Stream, server: ssl.SSLContext, client: trio.SSLStream[trio.SocketStream]
) -> trio.abc.Stream:
    """Both sides' handshakes at once; the server's stream."""
    server_side, client_side = await both_sides(transport, server, client)
    assert isinstance(server_side, trio.abc.Stream), server_side
    assert client_side is None, client_side
    return server_side


async def both_sides(
    transport: trio.abc.Stream, server: ssl.SSLContext, client: trio.SSLStream[trio.SocketStream]
) -> tuple[trio.abc.Stream | BaseException, BaseException | None]:
    """Both sides' handshakes at once: the server's stream or exception, the client's
    exception or None."""
    outcome: dict[str, trio.abc.Stream | BaseException | None] = {"client": None}

    async def serve() -> None:
        try:
            outcome["server"] = await accept_tls(transport, server)
        except (trio.BrokenResourceError, OSError) as exc:
            outcome["server"] = exc

    async def connect() -> None:
        try:
            await client.do_handshake()
        except trio.BrokenResourceError as exc:
            outcome["client"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        nursery.start_soon(connect)
    server_side, client_side = outcome["server"], outcome["client"]
    assert server_side is not None
    assert not isinstance(client_side, trio.abc.Stream)
    return server_side, client_side


async def test_data_flows_both_ways_on_the_kernel_socket(
    pair: tuple[trio.SocketStream, trio.SocketStream], server: ssl.SSLContext, ca: trustme.CA
) -> None:
    accepted, raw = pair
    client = trio.SSLStream(raw, client_context(ca, ["pop3"]), server_hostname="localhost")
    with trio.fail_after(DEADLINE_SECONDS):
        tls = await handshake(accepted, server, client)
        assert isinstance(tls, NativeTlsStream)
        assert client.selected_alpn_protocol() == "pop3"
        assert accepted.socket.fileno() == -1  # the TLS stream owns the descriptor now
        big = bytes(range(256)) * 1024  # 256 KiB: more than the socket buffer takes at once
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tls.send_all, big)
            got = bytearray()
            while len(got) < len(big):
                got += await client.receive_some(65536)
        assert got == big
        await client.send_all(b"CAPA\r\n")
        assert await tls.receive_some(100) == b"CAPA\r\n"
        # aclose sends close_notify: the client sees a clean EOF, not a ragged one.
        await tls.aclose()
        assert await client.receive_some(100) == b""
        with pytest.raises(trio.ClosedResourceError):
            await tls.receive_some(100)


async def test_the_listeners_tcp_stream_is_taken_over_too(
    pair: tuple[trio.SocketStream, trio.SocketStream], server: ssl.SSLContext, ca: trustme.CA
) -> None:
    """serve.py gives a plain session popproxy's TcpStream (popproxy/socket_stream.py):
    STLS and implicit TLS over it run on the kernel socket as over trio's stream."""
    accepted, raw = pair
    stream = TcpStream.from_trio(accepted)
    client = trio.SSLStream(raw, client_context(ca, ["pop3"]), server_hostname="localhost")
    with trio.fail_after(DEADLINE_SECONDS):
        tls = await handshake(stream, server, client)
        assert isinstance(tls, NativeTlsStream)
        assert stream.socket.fileno() == -1  # the TLS stream owns the descriptor now
        await client.send_all(b"CAPA\r\n")
        assert await tls.receive_some(100) == b"CAPA\r\n"
        await tls.send_all(b"+OK\r\n")
        assert await client.receive_some(100) == b"+OK\r\n"
        await tls.aclose()


@pytest.mark.parametrize("alpn", [["http/1.1"], ["h2", "http/1.1"]])
async def test_an_alpn_offer_without_pop3_gets_the_alert_and_nothing_else(
    pair: tuple[trio.SocketStream, trio.SocketStream],
    server: ssl.SSLContext,
    ca: trustme.CA,
    alpn: list[str],
) -> None:
    accepted, raw = pair
    client = trio.SSLStream(raw, client_context(ca, alpn), server_hostname="localhost")
    with trio.fail_after(DEADLINE_SECONDS):
        refused, failed = await both_sides(accepted, server, client)
    assert isinstance(refused, AlpnRefused)
    assert refused.offered == tuple(a.encode() for a in alpn)
    assert accepted.socket.fileno() == -1  # closed by accept_tls, not leaked
    assert failed is not None
    assert "alert no application protocol" in str(failed.__cause__)


async def test_a_client_hello_sent_in_pieces_is_judged_whole(
    pair: tuple[trio.SocketStream, trio.SocketStream], server: ssl.SSLContext, ca: trustme.CA
) -> None:
    accepted, raw = pair
    flight = client_hello_of(client_context(ca, ["http/1.1"]))
    pieces = [flight[:3], flight[3:5], flight[5:40], flight[40:-1], flight[-1:]]
    with trio.fail_after(DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                with pytest.raises(AlpnRefused):
                    await accept_tls(accepted, server)

            nursery.start_soon(serve)
            for piece in pieces:
                await trio.testing.wait_all_tasks_blocked()  # the server waits for more
                await raw.send_all(piece)
        assert await raw.receive_some(100) == NO_APPLICATION_PROTOCOL_ALERT


@pytest.fixture
async def established(
    pair: tuple[trio.SocketStream, trio.SocketStream], server: ssl.SSLContext, ca: trustme.CA
) -> tuple[trio.abc.Stream, trio.SSLStream[trio.SocketStream], trio.SocketStream]:
    """A finished handshake without ALPN: (the server's TLS stream, the client's TLS
    stream, the client's TCP stream under it)."""
    accepted, raw = pair
    client = trio.SSLStream(raw, client_context(ca), server_hostname="localhost")
    with trio.fail_after(DEADLINE_SECONDS):
        tls = await handshake(accepted, server, client)
    return tls, client, raw


async def test_a_cancelled_receive_loses_nothing(
    established: tuple[trio.abc.Stream, trio.SSLStream[trio.SocketStream], trio.SocketStream],
) -> None:
    tls, client, _ = established
    with trio.fail_after(DEADLINE_SECONDS):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tls.receive_some, 100)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert scope.cancelled_caught
        await client.send_all(b"NOOP\r\n")
        assert await tls.receive_some(100) == b"NOOP\r\n"
        await tls.aclose()


async def test_wait_seconds_bound_only_the_waiting(
    established: tuple[trio.abc.Stream, trio.SSLStream[trio.SocketStream], trio.SocketStream],
) -> None:
    tls, client, _ = established
    assert isinstance(tls, NativeTlsStream)
    with trio.fail_after(DEADLINE_SECONDS):
        # Nothing to read: a bound of 0 s ends the wait at once, and loses nothing.
        with pytest.raises(trio.TooSlowError):
            await tls.receive_some(100, wait_seconds=0.0)
        with pytest.raises(trio.TooSlowError):
            await wait_bounded(tls).receive_some(100, wait_seconds=0.0)
        # A write OpenSSL and the kernel take at once never times out, whatever the bound.
        await wait_bounded(tls).send_all(b"+OK at once\r\n", wait_seconds=0.0)
        assert await client.receive_some(100) == b"+OK at once\r\n"
        await client.send_all(b"NOOP\r\n")
        assert await tls.receive_some(100, wait_seconds=DEADLINE_SECONDS) == b"NOOP\r\n"
        await tls.aclose()


async def test_a_send_that_runs_out_of_its_wait_breaks_the_stream(
    established: tuple[trio.abc.Stream, trio.SSLStream[trio.SocketStream], trio.SocketStream],
) -> None:
    tls, _, _ = established
    assert isinstance(tls, NativeTlsStream)
    with trio.fail_after(DEADLINE_SECONDS):
        with pytest.raises(trio.TooSlowError):  # nobody reads: the buffers fill
            await tls.send_all(bytes(8 * 1024 * 1024), wait_seconds=0.0)
        with pytest.raises(trio.BrokenResourceError):  # records may be half sent
            await tls.send_all(b"+OK\r\n")
        await tls.aclose()


@pytest.mark.parametrize("send", [True, False], ids=["send_all", "receive_some"])
async def test_operations_that_never_wait_still_yield_every_bound(
    established: tuple[trio.abc.Stream, trio.SSLStream[trio.SocketStream], trio.SocketStream],
    send: bool,
) -> None:
    tls, client, _ = established
    assert isinstance(tls, NativeTlsStream)
    rounds = 10
    operations = rounds * MAX_OPS_WITHOUT_CHECKPOINT
    with trio.fail_after(DEADLINE_SECONDS):
        if not send:
            await client.send_all(b"x" * (1 + operations))  # one record
            assert await tls.receive_some(1) == b"x"  # waits for it; OpenSSL keeps the rest
        seen = await observe_yields(operations, tls, send)
        await tls.aclose()
    # One pass through the scheduler per MAX_OPS_WITHOUT_CHECKPOINT operations, as
    # TcpStream's, and not at every operation.
    assert rounds - 1 <= seen <= rounds + 1


async def test_a_ragged_eof_reads_as_eof(
    established: tuple[trio.abc.Stream, trio.SSLStream[trio.SocketStream], trio.SocketStream],
) -> None:
    tls, _, raw = established
    with trio.fail_after(DEADLINE_SECONDS):
        await raw.aclose()  # no close_notify
        assert await tls.receive_some(100) == b""
        await tls.aclose()


async def test_a_reset_breaks_the_stream(
    established: tuple[trio.abc.Stream, trio.SSLStream[trio.SocketStream], trio.SocketStream],
) -> None:
    tls, _, raw = established
    with trio.fail_after(DEADLINE_SECONDS):
        raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await raw.aclose()  # linger 0: a reset
        with pytest.raises(trio.BrokenResourceError):
            while True:  # the reset, whichever of receive or send meets it first
                assert await tls.receive_some(100) == b""
                await tls.send_all(b"+OK\r\n")
        await tls.aclose()


async def test_a_handshake_that_is_not_tls_fails_and_closes_the_socket(
    pair: tuple[trio.SocketStream, trio.SocketStream], server: ssl.SSLContext
) -> None:
    accepted, raw = pair
    with trio.fail_after(DEADLINE_SECONDS):
        await raw.send_all(b"USER demo\r\n")
        with pytest.raises(ssl.SSLError):
            await accept_tls(accepted, server)
        assert accepted.socket.fileno() == -1
        while await raw.receive_some(100):
            pass  # an alert, then EOF


async def test_eof_before_the_hello_fails_the_handshake(
    pair: tuple[trio.SocketStream, trio.SocketStream], server: ssl.SSLContext
) -> None:
    accepted, raw = pair
    with trio.fail_after(DEADLINE_SECONDS):
        await raw.send_all(b"\x16\x03")  # a record header cut short
        await raw.send_eof()
        with pytest.raises((ssl.SSLError, OSError)):
            await accept_tls(accepted, server)


async def test_another_transport_gets_trio_ssl_stream(
    server: ssl.SSLContext, ca: trustme.CA
) -> None:
    left, right = trio.testing.memory_stream_pair()
    client = trio.SSLStream(right, client_context(ca, ["http/1.1"]), server_hostname="localhost")
    with trio.fail_after(DEADLINE_SECONDS):
        refused, failed = await both_sides(left, server, client)  # type: ignore[arg-type]
        assert isinstance(refused, AlpnRefused)
        assert refused.offered == (b"http/1.1",)
        assert failed is not None
        left, right = trio.testing.memory_stream_pair()
        client = trio.SSLStream(right, client_context(ca), server_hostname="localhost")
        tls = await handshake(left, server, client)  # type: ignore[arg-type]
        assert isinstance(tls, trio.SSLStream)
