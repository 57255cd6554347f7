"""popproxy.metrics_exporter: the HTTP/1.1 server of ``/metrics``.

Tested in-process: raw requests over loopback TCP on a dynamic port and over trio
memory streams (whole and byte by byte), and through a real HTTP client (urllib in a
worker thread). Deadlines are virtual (``autojump_clock``) or bound the test as a
whole; nothing sleeps.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from popproxy import metrics_exporter
from popproxy.config import MetricsConfig
from popproxy.metrics import Metrics
from popproxy.metrics_exporter import (
    MAX_EXPORTER_CONNECTIONS,
    MAX_REQUEST_HEAD_BYTES,
    REQUEST_READ_TIMEOUT_SECONDS,
    handle_http_connection,
    serve_metrics,
)
from popproxy.outcomes import SessionResult, UpstreamFailure
from popproxy.pop3.commands import Verb

TEST_DEADLINE_SECONDS = 20


def new_metrics() -> Metrics:
    """A registry with a few series counted, as a running server's would have."""
    metrics = Metrics(CollectorRegistry())
    metrics.declare(listeners=["starttls"], upstreams=["provider"], rules=["10-archive"])
    starttls = metrics.listener("starttls")
    starttls.session_started()
    starttls.session_ended(SessionResult.QUIT)
    provider = metrics.upstream("provider")
    provider.command(Verb.RETR, 0.25)
    provider.login_failed(UpstreamFailure.TIMEOUT)
    return metrics


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, str, int]]:
    """A running exporter on a dynamic loopback port."""
    metrics = new_metrics()
    async with trio.open_nursery() as nursery:
        address, port = await nursery.start(
            serve_metrics, MetricsConfig(address="127.0.0.1", port=0), metrics.registry
        )
        yield metrics, address, port
        nursery.cancel_scope.cancel()


async def tcp_request(address: str, port: int, request: bytes) -> bytes:
    """Send ``request`` over a new connection and read until the server closes it.

    A connection the server reset (closed without reading) reads as b"".
    """
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        stream = await trio.open_tcp_stream(address, port)
        async with stream:
            try:
                await stream.send_all(request)
                return await read_to_eof(stream)
            except trio.BrokenResourceError:
                return b""


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    while data := await stream.receive_some(65536):
        received += data
    return bytes(received)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, field = line.partition(":")
        headers[name.strip().lower()] = field.strip()
    return int(status), headers, body


async def test_exporter_serves_the_registry_over_tcp(served: tuple[Metrics, str, int]) -> None:
    _, address, port = served
    assert address == "127.0.0.1"
    assert port != 0
    raw = await tcp_request(
        address, port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
    )
    status, headers, body = parse_response(raw)
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert b"popproxy_build_info{" in body
    assert b'popproxy_sessions_started_total{listener="starttls"} 1.0' in body
    # A scrape carries no _created series (docs/metrics.md, Conventions).
    assert b"popproxy_upstream_command_duration_seconds_count{" in body
    assert b"_created" not in body


async def test_exporter_with_a_real_http_client(served: tuple[Metrics, str, int]) -> None:
    metrics, address, port = served

    def fetch(path: str, method: str = "GET") -> tuple[int, str, bytes]:
        request = urllib.request.Request(f"http://{address}:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=TEST_DEADLINE_SECONDS) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers["Content-Type"], exc.read()

    status, content_type, body = await trio.to_thread.run_sync(fetch, "/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    assert body == generate_latest(metrics.registry)
    status, _, body = await trio.to_thread.run_sync(fetch, "/metrics?name[]=x")
    assert status == 200
    status, _, body = await trio.to_thread.run_sync(fetch, "/")
    assert status == 200
    assert b"/metrics" in body
    status, _, _ = await trio.to_thread.run_sync(fetch, "/favicon.ico")
    assert status == 404
    status, _, _ = await trio.to_thread.run_sync(fetch, "/metrics", "POST")
    assert status == 405
    status, _, body = await trio.to_thread.run_sync(fetch, "/metrics", "HEAD")
    assert (status, body) == (200, b"")


async def exchange(request: bytes, *, byte_by_byte: bool = False) -> bytes:
    """Run one connection's handler over memory streams; return all it sent."""
    return await exchange_with(new_metrics(), request, byte_by_byte=byte_by_byte)


async def exchange_with(metrics: Metrics, request: bytes, *, byte_by_byte: bool = False) -> bytes:
    """Run one connection's handler for ``metrics``' registry; return all it sent."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http_connection, server, metrics.registry)
        if byte_by_byte:
            for i in range(len(request)):
                await client.send_all(request[i : i + 1])
        else:
            await client.send_all(request)
        await client.send_eof()
        raw = await read_to_eof(client)
    await client.aclose()
    return raw


REQUESTS = {
    "metrics": (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "bare LF": (b"GET /metrics HTTP/1.0\nHost: x\n\n", 200),
    "index": (b"GET / HTTP/1.1\r\n\r\n", 200),
    "not found": (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
    "post": (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    "delete": (b"DELETE / HTTP/1.1\r\n\r\n", 405),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "http/2": (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
    "no version": (b"GET /metrics\r\n\r\n", 400),
}


@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("case", REQUESTS)
async def test_exporter_requests(case: str, byte_by_byte: bool) -> None:
    request, expected = REQUESTS[case]
    status, headers, body = parse_response(await exchange(request, byte_by_byte=byte_by_byte))
    assert status == expected
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_exporter_head_has_the_length_but_no_body() -> None:
    status, headers, body = parse_response(await exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n"))
    assert status == 200
    assert body == b""
    assert int(headers["content-length"]) > 1000


async def test_exporter_refuses_an_overlong_request_head() -> None:
    request = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * MAX_REQUEST_HEAD_BYTES + b"\r\n\r\n"
    status, _, _ = parse_response(await exchange(request))
    assert status == 431


async def test_exporter_accepts_a_head_just_under_the_limit() -> None:
    start = b"GET /metrics HTTP/1.1\r\nX-Pad: "
    request = start + b"a" * (MAX_REQUEST_HEAD_BYTES - len(start)) + b"\r\n\r\n"
    status, _, _ = parse_response(await exchange(request))
    assert status == 200


async def test_exporter_drops_a_client_that_never_finishes_its_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = new_metrics()
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http_connection, server, metrics.registry)
        await client.send_all(b"GET /metrics HTTP/1.1\r\n")
        started = trio.current_time()
        assert await read_to_eof(client) == b""
        assert trio.current_time() - started == pytest.approx(REQUEST_READ_TIMEOUT_SECONDS)


@pytest.mark.parametrize("request_head", [b"", b"GET /metrics HTTP/1.1\r\n"])
async def test_exporter_does_not_answer_a_client_that_closes_before_the_blank_line(
    request_head: bytes,
) -> None:
    assert await exchange(request_head) == b""


async def test_a_broken_collector_gives_500_not_a_crash() -> None:
    metrics = new_metrics()

    class Broken(Collector):
        def collect(self) -> Iterable[Metric]:
            raise RuntimeError("collector bug")

    metrics.registry.register(Broken())
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http_connection, server, metrics.registry)
        await client.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        status, _, body = parse_response(await read_to_eof(client))
    assert status == 500
    assert b"collector bug" not in body


async def test_a_scrape_is_collected_in_the_trio_thread() -> None:
    """The series counted on every session and command are plain numbers written by the
    trio thread (popproxy.metric_series); collected there too, a scrape reads them all
    between two steps of the event loop, at one instant."""
    metrics = new_metrics()
    collected_in: list[int] = []

    class Witness(Collector):
        def collect(self) -> Iterable[Metric]:
            collected_in.append(threading.get_ident())
            return []

    metrics.registry.register(Witness())
    status, _, body = parse_response(await exchange_with(metrics, b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert status == 200
    assert b'popproxy_sessions_ended_total{listener="starttls",result="quit"} 1.0' in body
    assert collected_in == [threading.get_ident()]


async def test_exporter_bounds_concurrent_connections(served: tuple[Metrics, str, int]) -> None:
    _, address, port = served
    idle = [await trio.open_tcp_stream(address, port) for _ in range(MAX_EXPORTER_CONNECTIONS)]
    try:
        await trio.testing.wait_all_tasks_blocked()
        # Every slot is held by a client that has not sent its request: one more is
        # closed at once, without a reply.
        assert await tcp_request(address, port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
    finally:
        for stream in idle:
            await stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    status, _, _ = parse_response(await tcp_request(address, port, b"GET / HTTP/1.1\r\n\r\n"))
    assert status == 200


def test_the_exporter_module_has_named_limits() -> None:
    assert metrics_exporter.MAX_REQUEST_HEAD_BYTES == 8192
    assert metrics_exporter.REQUEST_READ_TIMEOUT_SECONDS > 0
    assert metrics_exporter.RESPONSE_SEND_TIMEOUT_SECONDS > 0
