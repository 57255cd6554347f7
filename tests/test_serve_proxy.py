"""serve(): PROXY protocol listeners and the per-address session limit, over loopback.

Raw sockets send real v1 and v2 headers (popproxy.proxy_protocol's encoders, checked
against the specification's bytes in tests/test_proxy_protocol.py); the server runs
in-process. The trusted network is 127.0.0.0/8 unless a test needs otherwise.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import test_serve
import trio
import trio.testing
from pop3client import Pop3Client, open_loopback
from prometheus_client import CollectorRegistry
from test_serve import (
    TEST_DEADLINE_SECONDS,
    Running,
    Tls,
    login,
    make_config,
    start,
)

from popproxy import acceptor as acceptor_module
from popproxy import serve as serve_module
from popproxy.config import Config, TlsMode
from popproxy.metrics import ConnectionRejection, Metrics
from popproxy.peer import UNKNOWN_PEER, PeerAddress
from popproxy.proxy_protocol import encode_v1, encode_v2
from popproxy.serve import serve

# The fixtures of test_serve.py, used here by name.
maildir = test_serve.maildir
tls = test_serve.tls

CLIENT = PeerAddress("203.0.113.9", 50123)
LISTENER = PeerAddress("198.51.100.1", 110)


def proxied_config(maildir: Path, tls: Tls, trusted: str = "127.0.0.0/8", **limits: Any) -> Config:
    config = make_config(maildir, tls, **limits)
    return replace(
        config,
        listen=tuple(replace(listener, proxy_protocol=True) for listener in config.listen),
        trusted_proxies=(ipaddress.ip_network(trusted),),
        allow_plaintext_auth=True,
    )


async def open_raw(running: Running, mode: TlsMode = TlsMode.NONE) -> trio.SocketStream:
    stream = await open_loopback(running.ports[mode])
    return stream


async def proxied(running: Running, header: bytes, mode: TlsMode = TlsMode.NONE) -> Pop3Client:
    stream = await open_raw(running, mode)
    await stream.send_all(header)
    return Pop3Client(stream)


async def start_before_the_clock_jumps(
    nursery: trio.Nursery, config: Config, clock: trio.testing.MockClock
) -> Running:
    """Start the server in real time (it loads files in worker threads, and a clock that
    jumps while a thread works would expire every deadline), then let the clock jump."""
    clock.autojump_threshold = math.inf
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, config)
    clock.autojump_threshold = 0
    return running


def session_ends(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "session_end"]


def logged(caplog: pytest.LogCaptureFixture, msg: str) -> list[dict[str, object]]:
    return [r.__dict__["fields"] for r in caplog.records if r.getMessage() == msg]


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
async def test_the_header_names_the_peer_of_the_session(
    maildir: Path,
    tls: Tls,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    encode: Any,
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, proxied_config(maildir, tls))
        client = await proxied(running, encode(CLIENT, LISTENER))
        assert (await client.line()).startswith(b"+OK popproxy ready.")
        await login(client)
        assert (await client.cmd(b"QUIT")).startswith(b"+OK")
        assert await client.at_eof()
        running.shutdown.set()
        await running.stopped.wait()
    [end] = session_ends(caplog)
    assert end["peer"] == "203.0.113.9:50123"
    assert end["result"] == "quit"


async def test_octets_after_the_header_in_the_same_segment_reach_the_session(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, proxied_config(maildir, tls))
        client = await proxied(running, encode_v2(CLIENT, LISTENER) + b"CAPA\r\nUSER demo\r\n")
        assert (await client.line()).startswith(b"+OK popproxy ready.")
        assert (await client.line()).startswith(b"+OK")  # CAPA
        while await client.line() != b".":
            pass
        assert await client.line() == b"+OK"  # USER


async def test_implicit_tls_follows_the_header(
    maildir: Path, tls: Tls, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, proxied_config(maildir, tls))
        raw = await open_raw(running, TlsMode.IMPLICIT)
        await raw.send_all(encode_v1(PeerAddress("2001:db8::7", 4444), PeerAddress("::1", 995)))
        stream = trio.SSLStream(raw, tls.client_context(), server_hostname="127.0.0.1")
        client = Pop3Client(stream)
        assert (await client.line()).startswith(b"+OK popproxy ready.")
        await login(client)
        assert (await client.cmd(b"QUIT")).startswith(b"+OK")
        running.shutdown.set()
        await running.stopped.wait()
    [end] = session_ends(caplog)
    assert end["peer"] == "[2001:db8::7]:4444"


@pytest.mark.parametrize(
    "header", [encode_v2(None), encode_v1(None)], ids=["v2-local", "v1-unknown"]
)
async def test_local_and_unknown_headers_keep_the_proxy_address(
    maildir: Path,
    tls: Tls,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    header: bytes,
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, proxied_config(maildir, tls))
        stream = await open_raw(running)
        await stream.send_all(header)
        client = Pop3Client(stream)
        assert (await client.line()).startswith(b"+OK")
        assert (await client.cmd(b"QUIT")).startswith(b"+OK")
        own_port = stream.socket.getsockname()[1]
        running.shutdown.set()
        await running.stopped.wait()
    [end] = session_ends(caplog)
    assert end["peer"] == f"127.0.0.1:{own_port}"


async def test_an_untrusted_source_is_closed_without_a_word(
    maildir: Path, tls: Tls, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Only trusted proxies may name a client (proxy-protocol.txt §2; Dovecot's
    haproxy_trusted_networks): the header is never read, nothing is answered."""
    metrics = Metrics(CollectorRegistry())
    config = proxied_config(maildir, tls, trusted="192.0.2.0/24")
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        shutdown = trio.Event()
        bound = await nursery.start(serve_with(config, shutdown, metrics))
        stream = await open_loopback(bound[0][1])
        await stream.send_all(encode_v1(CLIENT, LISTENER))
        assert await Pop3Client(stream).at_eof()
        shutdown.set()
    [line] = logged(caplog, "proxy_untrusted")
    assert str(line["proxy"]).startswith("127.0.0.1:")
    assert rejected(metrics, "none", ConnectionRejection.UNTRUSTED_PROXY) == 1
    assert not session_ends(caplog)


@pytest.mark.parametrize(
    "data",
    [
        b"USER demo\r\n",  # a client that speaks POP3 straight away
        b"PROXY TCP4 203.0.113.9 198.51.100.1 050123 110\r\n",
        encode_v2(CLIENT, LISTENER)[:13] + b"\x99",
    ],
    ids=["pop3", "v1-leading-zero", "v2-bad-family"],
)
async def test_a_bad_header_closes_the_connection(
    maildir: Path, tls: Tls, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    metrics = Metrics(CollectorRegistry())
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        shutdown = trio.Event()
        bound = await nursery.start(serve_with(proxied_config(maildir, tls), shutdown, metrics))
        stream = await open_loopback(bound[0][1])
        await stream.send_all(data)
        assert await Pop3Client(stream).at_eof()
        shutdown.set()
    [line] = logged(caplog, "proxy_header_invalid")
    assert line["reason"]
    assert rejected(metrics, "none", ConnectionRejection.PROXY_HEADER) == 1


async def test_a_header_that_does_not_come_in_time_closes_the_connection(
    maildir: Path,
    tls: Tls,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    running = await start_before_the_clock_jumps(
        nursery, proxied_config(maildir, tls), autojump_clock
    )
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        started = trio.current_time()
        client = await proxied(running, b"PROXY TCP4 203.0.113.9")  # and then nothing
        assert await client.at_eof()
        waited = trio.current_time() - started
    assert waited == pytest.approx(serve_module.PROXY_HEADER_TIMEOUT_SECONDS, abs=0.1)
    [line] = logged(caplog, "proxy_header_invalid")
    assert line["reason"] == "no complete header in time"


async def test_the_header_counts_against_the_login_timeout(
    maildir: Path,
    tls: Tls,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The login timeout runs from the accept: a header sent 4 s late leaves 2 s of a 6 s
    login timeout, not 6."""
    config = proxied_config(maildir, tls, login_timeout_seconds=6)
    running = await start_before_the_clock_jumps(nursery, config, autojump_clock)
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        stream = await open_raw(running)
        accepted = trio.current_time()
        await trio.sleep(4)
        await stream.send_all(encode_v2(CLIENT, LISTENER))
        client = Pop3Client(stream)
        assert (await client.line()).startswith(b"+OK")
        assert await client.line() == b"-ERR [SYS/TEMP] Disconnected: login timeout."
        assert trio.current_time() - accepted == pytest.approx(6, abs=0.5)


async def test_sessions_per_address_over_the_limit_are_refused(
    maildir: Path, tls: Tls, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a PROXY header the TCP peer is the address counted."""
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, make_config(maildir, tls, max_sessions_per_ip=2))
        first = Pop3Client(await open_raw(running))
        second = Pop3Client(await open_raw(running))
        assert (await first.line()).startswith(b"+OK")
        assert (await second.line()).startswith(b"+OK")
        third = Pop3Client(await open_raw(running))
        assert await third.line() == b"-ERR [SYS/TEMP] Too many connections from your address."
        assert await third.at_eof()
        # an implicit TLS listener counts the same address, and closes without a line
        implicit = Pop3Client(await open_raw(running, TlsMode.IMPLICIT))
        assert await implicit.at_eof()
        assert (await first.cmd(b"QUIT")).startswith(b"+OK")
        assert await first.at_eof()
        await trio.testing.wait_all_tasks_blocked()
        fourth = Pop3Client(await open_raw(running))
        assert (await fourth.line()).startswith(b"+OK")
    refusals = logged(caplog, "session_refused")
    assert [r["reason"] for r in refusals] == ["max_sessions_per_ip"] * 2


async def test_behind_a_proxy_the_limit_counts_the_client_address(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    """Many clients behind one proxy are not one address; one client behind it is."""
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, proxied_config(maildir, tls, max_sessions_per_ip=2))
        others = [
            await proxied(running, encode_v2(PeerAddress(f"203.0.113.{n}", 1000), LISTENER))
            for n in range(10, 15)
        ]
        for other in others:
            assert (await other.line()).startswith(b"+OK")
        one = [await proxied(running, encode_v1(CLIENT, LISTENER)) for _ in range(2)]
        for client in one:
            assert (await client.line()).startswith(b"+OK")
        again = await proxied(running, encode_v1(PeerAddress(CLIENT.host, 9), LISTENER))
        assert await again.line() == b"-ERR [SYS/TEMP] Too many connections from your address."
        assert await again.at_eof()
        # the same /64 counts as one address
        v6 = [
            await proxied(running, encode_v2(PeerAddress(f"2001:db8::{n}", 1), LISTENER6))
            for n in range(1, 4)
        ]
        assert (await v6[0].line()).startswith(b"+OK")
        assert (await v6[1].line()).startswith(b"+OK")
        assert (await v6[2].line()).startswith(b"-ERR [SYS/TEMP] Too many connections from")


LISTENER6 = PeerAddress("2001:db8:ffff::1", 110)


async def test_the_address_table_empties_when_sessions_end(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    """The table holds only addresses with sessions running, so max_sessions bounds it."""
    servers: list[serve_module.Server] = []
    real = serve_module.Server

    def spy(*args: Any, **kwargs: Any) -> serve_module.Server:
        server = real(*args, **kwargs)
        servers.append(server)
        return server

    with trio.fail_after(TEST_DEADLINE_SECONDS), pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve_module, "Server", spy)
        running = await start(nursery, proxied_config(maildir, tls))
        clients = [
            await proxied(running, encode_v1(PeerAddress(f"203.0.113.{n}", 1), LISTENER))
            for n in range(1, 6)
        ]
        for client in clients:
            assert (await client.line()).startswith(b"+OK")
        [server] = servers
        assert len(server._per_address) == 5
        for client in clients:
            assert (await client.cmd(b"QUIT")).startswith(b"+OK")
            assert await client.at_eof()
        await trio.testing.wait_all_tasks_blocked()
        assert server._per_address == {}


def serve_with(config: Config, shutdown: trio.Event, metrics: Metrics) -> Any:
    async def run(task_status: trio.TaskStatus[Any]) -> None:
        await serve(config, shutdown=shutdown, metrics=metrics, task_status=task_status)

    return run


def rejected(metrics: Metrics, listener: str, reason: ConnectionRejection) -> float:
    value = metrics.registry.get_sample_value(
        "popproxy_connections_rejected_total", {"listener": listener, "reason": reason.value}
    )
    assert value is not None
    return value


async def test_the_proxy_own_connections_are_not_counted_per_address(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    """LOCAL (health checks) and UNKNOWN are the balancer's own connections: with
    max_sessions_per_ip 1 it still gets as many as it opens."""
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, proxied_config(maildir, tls, max_sessions_per_ip=1))
        checks = [
            await proxied(running, header)
            for header in (encode_v2(None), encode_v2(None), encode_v1(None), encode_v1(None))
        ]
        for check in checks:
            assert (await check.line()).startswith(b"+OK popproxy ready.")


async def test_a_shutdown_while_a_header_is_awaited_closes_the_connection(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, proxied_config(maildir, tls, shutdown_grace_seconds=0))
        client = await proxied(running, b"PROXY ")
        await trio.testing.wait_all_tasks_blocked()
        running.shutdown.set()
        await running.stopped.wait()
        assert await client.at_eof()


async def test_a_connection_gone_before_it_is_accepted_is_closed_without_a_line(
    maildir: Path,
    tls: Tls,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """getpeername fails on a connection the client reset before the accept (a health
    check that connects and resets): nothing to serve, and no proxy_untrusted line."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(acceptor_module, "connection_peer", lambda connection: UNKNOWN_PEER)
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, proxied_config(maildir, tls))
        client = await proxied(running, encode_v1(CLIENT, LISTENER))
        assert await client.at_eof()
    assert not logged(caplog, "proxy_untrusted")
    assert not logged(caplog, "session_refused")
    assert not session_ends(caplog)


async def test_behind_a_proxy_the_login_throttle_keys_on_the_client_address(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    """Guesses from one client behind the proxy lock that client's address out, not
    the proxy's: another client behind the same proxy still logs in."""
    config = proxied_config(maildir, tls, auth_lockout_address_failures=2)
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, config)
        for n in range(2):
            guesser = await proxied(running, encode_v1(CLIENT, LISTENER))
            assert (await guesser.line()).startswith(b"+OK")
            assert await guesser.cmd(f"USER nobody{n}".encode()) == b"+OK"
            assert (await guesser.cmd(b"PASS guess")).startswith(b"-ERR [AUTH]")
        locked = await proxied(running, encode_v1(PeerAddress(CLIENT.host, 9), LISTENER))
        assert (await locked.line()).startswith(b"+OK")
        assert await locked.cmd(b"USER demo") == b"+OK"
        assert (await locked.cmd(b"PASS secret")).startswith(b"-ERR [AUTH]")
        other = await proxied(running, encode_v1(PeerAddress("203.0.113.77", 1), LISTENER))
        assert (await other.line()).startswith(b"+OK")
        await login(other)
