"""One POP3 client connection to an upstream: the stream, the protocol core, the state.

Theory of operation. ``UpstreamConnection.connect`` opens the TCP connection;
``secure`` (implicit TLS) and ``starttls`` (STLS, RFC 2595 §4) secure it, and
``logged_in`` records a login. The steps of opening a session (greeting, CAPA,
the login and the listing, pipelined where the upstream allows) are
``open_connection`` in ``upstream_login.py``, which drives this class only
through these methods.

This is the layer both modes drive: the proxy's ``UpstreamMaildrop``
(``upstream.py``) and the gateway's fetcher. It lives in ``maildrop/`` beside its
adapter, as DESIGN.md's layers place it, and is not itself a ``Maildrop``. After
login the caller writes any commands at once with ``send`` (pipelined RETRs are
``send(Retr(a), Retr(b))``), then reads each reply in order: ``status`` for the
status line, and ``stream_body(sink)`` or ``event`` for a multi-line body, which
is never held whole. ``exchange`` wraps each use of a logged-in connection: one
user at a time, a failure counted once, and a reply left half read (a failure,
a timeout, a cancel, a caller that stopped early) breaks the connection for good.

Every reply goes through the sans-IO ``ClientConnection``: a reply is matched to
the command that asked for it, and an unsolicited, overlong or malformed line,
or an end of stream inside a message, is fatal (logged once, as
``upstream_protocol_error``, by ``protocol_error``). Every later use then fails
with ``[SYS/TEMP]``, so a client is never sent a truncated message as if it were
complete. Before each command on an idle connection, ``check_quiet`` looks for
octets nobody asked for, so a line the upstream sent on its own is not taken for
that command's reply. ``commit`` sends the DELEs and QUIT; closing without it
never sends QUIT, so the upstream deletes nothing (RFC 1939 §6).

Metrics. Through the ``UpstreamMetrics`` it is given (popproxy/metrics.py, bound
to the upstream's name), the connection reports: its connect time (TCP connect plus
TLS handshake), the login (login command sent to its +OK) and an attempt ok or
failed with its ``UpstreamFailure``, each command's time to its status line,
octets received, the session open while logged in, every failure after login
once, and the messages deleted once QUIT answered +OK.
"""

from __future__ import annotations

import contextlib
import logging
import select
import ssl
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

import trio

from popproxy.config import UpstreamConfig
from popproxy.maildrop.base import RETRIEVE_CHUNK_BYTES, MaildropError
from popproxy.maildrop.tcp import connect_failure, open_tcp
from popproxy.metrics import UpstreamMetrics
from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.client import ClientConnection, ClientEvent
from popproxy.pop3.client_replies import (
    MAX_LISTING_OCTETS,
    UNAVAILABLE,
    BodyLines,
    Capabilities,
    ListingError,
)
from popproxy.pop3.commands import Command, Dele, Quit, SaslLine, Stls, Verb
from popproxy.pop3.errors import RemoteProtocolError
from popproxy.pop3.events import NEED_DATA, Data, EndOfData, PoisonedDotLines, StuffedData
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.socket_stream import TcpStream, wait_bounded
from popproxy.tls import upstream_alpn_problem

log = logging.getLogger("popproxy.upstream")

# One read from the upstream: a RETR chunk passes through the session in pieces of
# at most this size (the same trade-off as the Maildir's chunks, docs/benchmarks.md).
UPSTREAM_RECEIVE_BYTES = RETRIEVE_CHUNK_BYTES
# How long closing the upstream connection (a TLS close_notify) may take.
UPSTREAM_CLOSE_TIMEOUT_SECONDS = 2.0

_CONNECTION_LOST = "Lost the connection to the mail provider."
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)


class UpstreamError(MaildropError):
    """An upstream failure, carrying the client's ``-ERR`` (RFC 3206) and why.

    ``detail`` is the cause for an operator (``popproxy explain``, log lines):
    ``TLS handshake failed: CERTIFICATE_VERIFY_FAILED (...)``. The client hears only
    ``text``; neither ever holds a credential.
    """

    def __init__(
        self,
        failure: UpstreamFailure,
        code: ResponseCode | None,
        text: str,
        detail: str | None = None,
    ) -> None:
        super().__init__(code, text)
        self.failure = failure
        self.detail = detail or failure.value


def unavailable(failure: UpstreamFailure, detail: str | None = None) -> UpstreamError:
    """``[SYS/TEMP]``: the upstream cannot be used now (RFC 3206 §4)."""
    return UpstreamError(failure, ResponseCode.SYS_TEMP, UNAVAILABLE, detail)


def lost(failure: UpstreamFailure, detail: str | None = None) -> UpstreamError:
    """``[SYS/TEMP]``: the connection broke after login (RFC 3206 §4)."""
    return UpstreamError(failure, ResponseCode.SYS_TEMP, _CONNECTION_LOST, detail)


class UpstreamConnection:
    """A trio stream and a ``ClientConnection`` to one upstream, under deadlines.

    Made by ``open_connection``; its stream, protocol core, timings and state
    (broken, busy, closed) are its own and change only through its methods.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        upstream: UpstreamConfig,
        metrics: UpstreamMetrics,
        *,
        connect_seconds: float,
    ) -> None:
        # A plain TCP stream goes over to popproxy's own (popproxy/socket_stream.py): a
        # command or reply that the kernel takes or has at once skips trio's scheduler.
        self._stream = (
            TcpStream.from_trio(stream) if isinstance(stream, trio.SocketStream) else stream
        )
        # Every command's write and reply's read, with its wait bounded: the stream
        # itself when it bounds its own waits (a plain TcpStream), else wrapped in
        # scopes (popproxy/socket_stream.py's wait_bounded).
        self._bounded = wait_bounded(self._stream)
        self._quiet_poll = _quiet_poll(self._stream)  # what check_quiet polls, if any
        self._upstream = upstream
        self._core = ClientConnection(max_reply_line_octets=upstream.max_reply_line_bytes)
        self._metrics = metrics
        self._bytes_received = 0
        self._connect_seconds = connect_seconds  # TCP connect plus TLS handshake
        self._capabilities: Capabilities = {}
        self._logged_in = False
        self._broken = False
        self._busy = False
        self._closed = False

    @classmethod
    async def connect(
        cls, upstream: UpstreamConfig, metrics: UpstreamMetrics
    ) -> UpstreamConnection:
        """A TCP connection to ``upstream``, within its ``connect_timeout_seconds``;
        ``[SYS/TEMP]`` if it cannot be made (RFC 3206 §4). Not yet secured or greeted."""
        started = trio.current_time()
        try:
            # The deadline is a cancel scope only if the connect has to wait (maildrop/tcp.py).
            stream = await open_tcp(
                upstream.host, upstream.port, deadline=started + upstream.connect_timeout_seconds
            )
        except OSError as exc:
            reason = connect_failure(exc)
            log.warning(
                "upstream_connect_failed",
                extra={"fields": {"upstream": upstream.name, "reason": reason}},
            )
            raise unavailable(
                UpstreamFailure.CONNECT,
                f"cannot connect to {upstream.host}:{upstream.port}: {reason}",
            ) from None
        except trio.TooSlowError:
            raise unavailable(
                UpstreamFailure.TIMEOUT,
                f"no TCP connection to {upstream.host}:{upstream.port}"
                f" within {upstream.connect_timeout_seconds:g} s",
            ) from None
        return cls(stream, upstream, metrics, connect_seconds=trio.current_time() - started)

    @property
    def upstream(self) -> UpstreamConfig:
        """The upstream this connection is to."""
        return self._upstream

    @property
    def bytes_received(self) -> int:
        """Octets received from the upstream so far."""
        return self._bytes_received

    @property
    def pipelining(self) -> bool:
        """Whether this session's CAPA listed PIPELINING (RFC 2449 §6.6)."""
        return "PIPELINING" in self._capabilities

    @property
    def idle(self) -> bool:
        """Usable and not in an exchange: a keep-alive may run."""
        return not (self._broken or self._closed or self._busy)

    # -- securing and logging in (the steps are in upstream_login.py) ------------------

    def secured(self) -> None:
        """The connection is secured as configured: report its connect time."""
        self._metrics.connected(self._connect_seconds)

    async def secure(self, context: ssl.SSLContext | None) -> None:
        """The TLS handshake as the client; ``context`` verifies the certificate and the
        host name (RFC 8314 §4.1). Its time is added to the connect time."""
        upstream = self._upstream
        if context is None:
            raise RuntimeError(f"upstream {upstream.name} uses TLS but has no TLS context")
        started = trio.current_time()
        tls = trio.SSLStream(self._stream, context, server_hostname=upstream.host)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            reason = getattr(cause, "reason", None) or type(cause).__name__
            # ssl.SSLCertVerificationError says why the chain or the name did not verify.
            verify = getattr(cause, "verify_message", None)
            log.warning(
                "upstream_tls_failed",
                extra={"fields": {"upstream": upstream.name, "reason": str(reason)}},
            )
            raise unavailable(
                UpstreamFailure.TLS,
                f"TLS handshake with {upstream.host}:{upstream.port} failed: {reason}"
                + (f" ({verify})" if verify else ""),
            ) from None
        # ALPACA: we offered pop3; an upstream answering another protocol is not the
        # POP3 server it should be (RFC 7301 §3.2). No answer is fine.
        problem = upstream_alpn_problem(tls.selected_alpn_protocol())
        if problem is not None:
            log.warning(
                "upstream_tls_failed",
                extra={"fields": {"upstream": upstream.name, "reason": problem}},
            )
            raise unavailable(  # the caller closes the stream
                UpstreamFailure.TLS, f"TLS with {upstream.host}:{upstream.port}: {problem}"
            )
        self._stream = tls
        self._bounded = wait_bounded(tls)
        self._quiet_poll = _quiet_poll(tls)
        self._connect_seconds += trio.current_time() - started
        self.secured()

    async def starttls(self, context: ssl.SSLContext | None, capabilities: Capabilities) -> None:
        """STLS, required: not offered or refused means no credential is sent (RFC 2595 §4)."""
        name = self._upstream.name
        if "STLS" not in capabilities:
            log.warning("upstream_stls_unavailable", extra={"fields": {"upstream": name}})
            raise unavailable(
                UpstreamFailure.STLS_UNAVAILABLE, "tls: starttls, but CAPA does not list STLS"
            )
        await self.send(Stls())
        if isinstance(await self.status(), Err):
            log.warning("upstream_stls_refused", extra={"fields": {"upstream": name}})
            raise unavailable(UpstreamFailure.STLS_UNAVAILABLE, "the upstream refused STLS")
        if self._core.buffered:
            # Octets after "+OK" came before the handshake: plaintext injected into what
            # would be read as protected (RFC 2595 §4, CVE-2011-0411 class).
            raise self.protocol_error("data after the STLS reply")
        await self.secure(context)
        self._core.tls_established()

    def logged_in(self, capabilities: Capabilities, login_seconds: float) -> None:
        """The login succeeded ``login_seconds`` after it was sent, on an upstream whose
        CAPA (after any STLS) said ``capabilities``; the session is open until ``aclose``."""
        self._capabilities = capabilities
        self._logged_in = True
        self._metrics.login_succeeded(login_seconds)
        self._metrics.session_opened()  # closed in aclose, which every path reaches

    # -- commands and replies ---------------------------------------------------------

    async def send(
        self, *commands: Command | SaslLine, stuffed_body: bool = False, within: float | None = None
    ) -> None:
        """Write ``commands`` in one write (pipelined when there are several, RFC 2449 §6.6).

        With ``stuffed_body`` their multi-line bodies come as ``StuffedData``, still
        dot-stuffed, for a relay (pop3/client.py). With ``within``, the write waits at most
        that long (``trio.TooSlowError``); without, the caller sets the deadline.
        """
        core = self._core
        if len(commands) == 1:
            data = core.send(commands[0], stuffed_body=stuffed_body)
        else:
            data = b"".join(core.send(c, stuffed_body=stuffed_body) for c in commands)
        try:
            await self._bounded.send_all(data, wait_seconds=within)
        except _STREAM_ERRORS:
            raise lost(UpstreamFailure.CLOSED) from None

    async def event(
        self, read_seconds: float | None = None, *, deadline: float | None = None
    ) -> ClientEvent:
        """The next reply event, reading as needed.

        With ``read_seconds``, each read waits at most that long; with ``deadline`` (trio
        time), the reads wait until then at most (``trio.TooSlowError``). An event already
        buffered, or a read that the socket answers at once, costs no cancel scope.
        Without either, the caller sets the deadline.
        """
        core = self._core
        bounded = self._bounded
        while True:
            try:
                event = core.next_event()
            except RemoteProtocolError as exc:
                raise self.protocol_error(exc.reply.text) from None
            if event is not NEED_DATA:
                # A body chunk never ends a reply; anything else may be the last one due.
                if type(event) is not StuffedData and core.unsolicited:
                    # Octets after the last expected reply (RFC 1939 §3: a server only
                    # answers). Left there, they would be read as the next command's reply.
                    raise self.protocol_error("unsolicited reply")
                return event
            if deadline is not None:
                read_seconds = deadline - trio.current_time()
            data: bytes | bytearray
            try:
                data = await bounded.receive_some(UPSTREAM_RECEIVE_BYTES, wait_seconds=read_seconds)
            except _STREAM_ERRORS:
                data = b""
            self._bytes_received += len(data)
            self._metrics.bytes_received(len(data))
            core.receive_data(data)

    async def status(self, deadline: float | None = None) -> Ok | Err:
        """The next status reply, read by ``deadline`` (trio time, ``trio.TooSlowError``; None:
        the caller's); anything else here is a protocol error."""
        event = await self.event(deadline=deadline)
        if isinstance(event, (Ok, Err)):
            return event
        raise self.protocol_error("expected a status line")

    async def request(
        self, command: Command, *, within: float, stuffed_body: bool = False
    ) -> Ok | Err:
        """Send ``command`` and read its status line, all within ``within`` seconds
        (``trio.TooSlowError``), and report the time it took. Each write and read waits
        until that deadline at most, and enters a cancel scope only if it has to wait
        (popproxy/socket_stream.py): this is every RETR's path."""
        sent = trio.current_time()
        await self.send(command, stuffed_body=stuffed_body, within=within)
        reply = await self.event(deadline=sent + within)
        if type(reply) is not Ok and type(reply) is not Err:
            raise self.protocol_error("expected a status line")
        self._metrics.command(command.verb, trio.current_time() - sent)
        return reply

    def answered(self, verb: Verb, since: float) -> None:
        """``verb``'s status line arrived ``since`` (trio time) its command was sent."""
        self._metrics.command(verb, trio.current_time() - since)

    async def stream_body(
        self,
        sink: Callable[[bytes | bytearray], Awaitable[None]],
        *,
        read_seconds: float | None = None,
    ) -> None:
        """Pass the body of the multi-line reply whose ``+OK`` was read to ``sink``, chunk
        by chunk, until its end (RFC 1939 §3). The next chunk is read only once ``sink``
        has taken the last one (back-pressure). ``read_seconds`` as in ``event``."""
        while True:
            match await self.event(read_seconds):
                case Data(data=data) | StuffedData(data=data):
                    await sink(data)
                case PoisonedDotLines(count=count):
                    self.poisoned_dot_lines(count)
                case EndOfData():
                    return
                case _:
                    raise self.protocol_error("expected a multi-line body")

    async def body_lines(self, max_lines: int) -> list[bytes]:
        """The body of a multi-line reply whose ``+OK`` was read, as lines without ends:
        at most ``max_lines`` lines and ``MAX_LISTING_OCTETS`` in all, each no longer
        than a reply line (``max_reply_line_bytes``, RFC 2449 §4), line end included."""
        lines = BodyLines(
            max_lines=max_lines,
            max_line_octets=self._upstream.max_reply_line_bytes,
            max_octets=MAX_LISTING_OCTETS,
        )

        async def feed(data: bytes | bytearray) -> None:
            lines.feed(data)

        try:
            await self.stream_body(feed)
            return lines.finish()
        except ListingError as exc:
            raise self.protocol_error(str(exc)) from None

    def check_quiet(self) -> None:
        """Raise a protocol error if the upstream sent anything since its last awaited
        reply (RFC 1939 §3: a server only answers). Called before a command on an idle
        logged-in connection: an unsolicited line that arrived on its own would
        otherwise be read as that command's reply. Octets still buffered are checked,
        then, without reading, whether the socket is readable (TLS records after the
        handshake's session tickets are likewise never sent unasked).
        """
        if self._core.buffered:
            raise self.protocol_error("unsolicited reply")
        # poll(2) on a registered poll object: no lists to build, as select(2) needs.
        # Anything reported (readable, hung up, an error) is something nobody asked for.
        if self._quiet_poll is not None and self._quiet_poll.poll(0):
            raise self.protocol_error("unsolicited reply")

    def poisoned_dot_lines(self, count: int, **fields: object) -> None:
        """The multi-line reply just read held ``count`` lines of a single dot ended by a
        bare LF, passed on as content (``Data``: ``.`` LF; ``StuffedData``: stuffed, ``..``
        LF), never as its end (RFC 1939 §3, pop3/dotstuff.py). One log line per reply,
        ``upstream_poisoned_dot_line`` with ``fields`` (the session, the UIDL), and the
        count."""
        log.warning(
            "upstream_poisoned_dot_line",
            extra={"fields": {**fields, "upstream": self._upstream.name, "lines": count}},
        )
        self._metrics.poisoned_dot_lines(count)

    def protocol_error(self, reason: str) -> UpstreamError:
        """Log the upstream's protocol fault (one shape: ``upstream_protocol_error`` with
        ``upstream`` and ``reason``) and return the error that drops the connection."""
        log.warning(
            "upstream_protocol_error",
            extra={"fields": {"upstream": self._upstream.name, "reason": reason}},
        )
        return lost(UpstreamFailure.PROTOCOL, f"protocol error: {reason}")

    # -- using the logged-in connection -------------------------------------------------

    def exchange(self) -> _Exchange:
        """One use of the logged-in connection: a command (or several) and their replies.

        Raises ``[SYS/TEMP]`` at once if the connection is broken or closed, and
        RuntimeError if it is in use (a caller's bug). A ``trio.TooSlowError`` inside
        becomes an ``UpstreamError`` (``timeout``); an ``UpstreamError`` is counted once
        and breaks the connection; so does any other exit but a ``MaildropError`` (an
        ``-ERR`` read in full): a reply may be half read, so it is never reused.
        """
        if self._broken or self._closed:
            raise lost(UpstreamFailure.CLOSED)
        if self._busy:
            raise RuntimeError("the upstream connection is already in use")
        return _Exchange(self)

    def _fail(self, failure: UpstreamFailure) -> None:
        """The logged-in connection failed: broken for good, counted once (later uses
        fail as ``closed`` uncounted)."""
        self._broken = True
        self._metrics.error(failure)

    async def commit(self, numbers: Sequence[int]) -> None:
        """DELE each of the upstream's message ``numbers``, then QUIT, and close; only
        QUIT's ``+OK`` confirms the deletions (RFC 1939 §6).

        If a DELE is refused or anything fails before QUIT is sent, the connection
        is dropped without QUIT, so the upstream deletes nothing.
        """
        with self.exchange():
            self.check_quiet()
            # Every write and read waits until one deadline at most (trio.TooSlowError),
            # entering a cancel scope only if it has to wait: every session's QUIT.
            deadline = trio.current_time() + self._upstream.command_timeout_seconds
            await self._dele(numbers, deadline)
            sent = trio.current_time()
            await self.send(Quit(), within=deadline - sent)
            reply = await self.status(deadline)
            self.answered(Quit.verb, sent)
        await self.aclose()
        if isinstance(reply, Err):
            # RFC 1939 §6: "some deleted messages not removed".
            self._fail(UpstreamFailure.REJECTED)
            raise UpstreamError(
                UpstreamFailure.REJECTED,
                ResponseCode.SYS_TEMP,
                "The mail provider did not confirm the deletions.",
            )
        self._metrics.messages_deleted(len(numbers))

    async def _dele(self, numbers: Sequence[int], deadline: float) -> None:
        """DELE each message by ``deadline`` (trio time, ``trio.TooSlowError``); pipelined
        where the upstream allows (RFC 2449 §6.6)."""
        deles = [Dele(n) for n in numbers]
        pipelining = self.pipelining
        if pipelining and deles:
            await self.send(*deles, within=deadline - trio.current_time())
        # Pipelined, each DELE is timed from the previous reply (the first from the
        # write): what one more command costs; otherwise from its own write.
        since = trio.current_time()
        for dele in deles:
            if not pipelining:
                since = trio.current_time()
                await self.send(dele, within=deadline - since)
            reply = await self.status(deadline)
            self.answered(Dele.verb, since)
            since = trio.current_time()
            if isinstance(reply, Err):
                raise UpstreamError(
                    UpstreamFailure.REJECTED,
                    ResponseCode.SYS_TEMP,
                    "The mail provider refused a deletion; nothing was deleted.",
                )

    async def aclose(self) -> None:
        """Drop the connection without QUIT: nothing is deleted (RFC 1939 §6)."""
        if self._closed:
            return
        self._closed = True
        if self._logged_in:
            self._metrics.session_closed()
        stream = self._stream
        if type(stream) is TcpStream:
            # A plain socket closes without waiting: no scopes, no pass through the
            # scheduler (every session's end, issue 15).
            stream.close()
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(UPSTREAM_CLOSE_TIMEOUT_SECONDS) as scope:
                with contextlib.suppress(*_STREAM_ERRORS):
                    await self._stream.aclose()
            if scope.cancelled_caught:
                await trio.aclose_forcefully(self._stream)


def _quiet_poll(stream: trio.abc.Stream) -> select.poll | None:
    """A poll object for readability of the TCP socket under ``stream`` (itself, or under
    its TLS), for ``check_quiet``; None for other transports (the memory streams of tests)."""
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(transport, TcpStream | trio.SocketStream):
        return None
    poll = select.poll()
    poll.register(transport.socket.fileno(), select.POLLIN)
    return poll


class _Exchange:
    """``UpstreamConnection.exchange``'s block: a class, not a generator context
    manager, as it is on every command's path (issue 15)."""

    __slots__ = ("_connection",)

    def __init__(self, connection: UpstreamConnection) -> None:
        self._connection = connection

    def __enter__(self) -> None:
        self._connection._busy = True

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        connection = self._connection
        connection._busy = False
        if exc is None or (isinstance(exc, MaildropError) and not isinstance(exc, UpstreamError)):
            return
        if isinstance(exc, trio.TooSlowError):
            connection._fail(UpstreamFailure.TIMEOUT)
            raise lost(UpstreamFailure.TIMEOUT) from None
        if isinstance(exc, UpstreamError):
            connection._fail(exc.failure)
        else:
            connection._broken = True
