"""The ``/metrics`` exporter: a small HTTP/1.1 server for the registry of :mod:`popproxy.metrics`.

It is network I/O, so it lives apart from the metric definitions (DESIGN.md, Layers:
``metrics.py`` declares, the exporter serves). :func:`serve_metrics` serves
``GET /metrics`` in the text exposition format over a deliberately small HTTP/1.1
server (RFC 9112): one request per connection (``Connection: close``), a bounded
request head, deadlines on reading and writing. It collects the registry in the trio
thread, between two steps of the event loop: the series that the trio thread counts
as plain numbers (:mod:`popproxy.metric_series`) are all read at one instant.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from popproxy.config import MetricsConfig

# The exporter's log lines (metrics_listening, metrics_collection_failed) keep the
# ``logger=popproxy.metrics`` they had before it moved out of metrics.py.
log = logging.getLogger("popproxy.metrics")


# The request line and headers. Prometheus sends about 300 octets; 8 KiB is the
# common per-line limit of HTTP servers (nginx's large_client_header_buffers).
MAX_REQUEST_HEAD_BYTES = 8192
RECEIVE_CHUNK_BYTES = 4096
# Prometheus's default scrape_timeout is 10 s: a scraper slower than that has given up.
REQUEST_READ_TIMEOUT_SECONDS = 10.0
RESPONSE_SEND_TIMEOUT_SECONDS = 10.0
# Concurrent connections; one more is closed at once. A scraper or two, plus a curl.
MAX_EXPORTER_CONNECTIONS = 8

_HEAD_END_RE = re.compile(rb"\r?\n\r?\n")
_REQUEST_LINE_RE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/1\.[01]")
_ALLOWED_METHODS = (b"GET", b"HEAD")
_INDEX_BODY = b"popproxy metrics exporter: scrape /metrics\n"
_TEXT_PLAIN = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    reason: str
    content_type: str
    body: bytes
    extra_headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, include_body: bool) -> bytes:
        headers = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            ("Connection", "close"),
            *self.extra_headers,
        ]
        head = f"HTTP/1.1 {self.status} {self.reason}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers
        )
        return head.encode("ascii") + b"\r\n" + (self.body if include_body else b"")


def _error(status: int, reason: str, *extra: tuple[str, str]) -> _Response:
    return _Response(status, reason, _TEXT_PLAIN, f"{status} {reason}\n".encode(), extra)


class _HeadTooLarge(Exception):
    pass


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The request head up to the blank line (RFC 9112 §2.1); None if the peer closed first."""
    buffer = bytearray()
    while True:
        data = await stream.receive_some(RECEIVE_CHUNK_BYTES)
        if not data:
            return None
        buffer += data
        end = _HEAD_END_RE.search(buffer)
        if end is not None and end.start() <= MAX_REQUEST_HEAD_BYTES:
            return bytes(buffer[: end.start()])
        if len(buffer) > MAX_REQUEST_HEAD_BYTES:
            raise _HeadTooLarge


def _respond(head: bytes, registry: CollectorRegistry) -> tuple[_Response, bool]:
    """The response to a request head, and whether to send its body (not for HEAD)."""
    request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    match = _REQUEST_LINE_RE.fullmatch(request_line)
    if match is None:
        return _error(400, "Bad Request"), True
    method, target = match.group(1), match.group(2)
    if method not in _ALLOWED_METHODS:
        return _error(405, "Method Not Allowed", ("Allow", "GET, HEAD")), True
    path = target.split(b"?", 1)[0]
    include_body = method == b"GET"
    if path == b"/metrics":
        try:
            body = generate_latest(registry)
        except Exception:
            # A broken collector must not take the proxy down with the exporter.
            log.exception("metrics_collection_failed")
            return _error(500, "Internal Server Error"), include_body
        return _Response(200, "OK", CONTENT_TYPE_LATEST, body), include_body
    if path == b"/":
        return _Response(200, "OK", _TEXT_PLAIN, _INDEX_BODY), include_body
    return _error(404, "Not Found"), include_body


async def handle_http_connection(stream: trio.abc.Stream, registry: CollectorRegistry) -> None:
    """Answer one HTTP/1.1 request on ``stream`` and close it (RFC 9112 §9.6, ``close``).

    ``GET /metrics`` gets the registry in the Prometheus text format; ``GET /`` a
    pointer to it; other paths 404, other methods 405, a malformed request 400 and
    a head over ``MAX_REQUEST_HEAD_BYTES`` 431. A client that does not finish its
    head within ``REQUEST_READ_TIMEOUT_SECONDS`` is disconnected without a reply.
    """
    async with stream:
        try:
            head: bytes | None = None
            response: _Response | None = None
            include_body = True
            with trio.move_on_after(REQUEST_READ_TIMEOUT_SECONDS):
                try:
                    head = await _read_head(stream)
                except _HeadTooLarge:
                    response = _error(431, "Request Header Fields Too Large")
            if response is None:
                if head is None:
                    return  # the peer closed or timed out before a whole request
                response, include_body = _respond(head, registry)
            with trio.move_on_after(RESPONSE_SEND_TIMEOUT_SECONDS):
                await stream.send_all(response.encode(include_body=include_body))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def serve_metrics(
    config: MetricsConfig,
    registry: CollectorRegistry,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``registry`` at ``http://{address}:{port}/metrics`` until cancelled.

    Binds ``config.address`` and ``config.port`` (0 asks the OS for a free port),
    then reports the bound ``(address, port)`` of the first socket through
    ``task_status`` (``await nursery.start(serve_metrics, config, registry)``).
    Each connection carries one request (:func:`handle_http_connection`); at most
    ``MAX_EXPORTER_CONNECTIONS`` are served at once, more are closed at once.
    """
    listeners = await trio.open_tcp_listeners(config.port, host=config.address)
    limiter = trio.CapacityLimiter(MAX_EXPORTER_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            await handle_http_connection(stream, registry)
        finally:
            limiter.release()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            address, port = listeners[0].socket.getsockname()[:2]
            log.info("metrics_listening", extra={"fields": {"address": address, "port": port}})
            task_status.started((address, port))
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


class ExporterBindError(Exception):
    """The exporter cannot listen where the config says (the address is in use, ...)."""


async def start_exporter(
    nursery: trio.Nursery, config: MetricsConfig, registry: CollectorRegistry
) -> None:
    """Start ``serve_metrics`` in ``nursery``, listening when this returns; an address it
    cannot bind raises ExporterBindError, naming the address."""
    try:
        await nursery.start(serve_metrics, config, registry)
    except OSError as exc:
        raise ExporterBindError(
            f"cannot serve metrics on {config.address}:{config.port}: {exc}"
        ) from exc
