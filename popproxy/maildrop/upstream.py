"""The live upstream maildrop (proxy mode): one POP3 client session per client session.

Theory of operation. ``open_upstream`` connects to the account's upstream,
secures the connection as configured (implicit TLS, or STLS that must be
offered and must succeed before any credential is sent; RFC 2595 §4, RFC 8314),
logs in with USER/PASS or AUTH PLAIN, and takes the listing with UIDL and LIST.
Where the upstream advertises PIPELINING (RFC 2449 §6.6) the login and both
listings go out in one write, so a login costs one round trip after CAPA; and
once an upstream has said so (``CapabilityMemo``, kept per upstream), the next
sessions send CAPA in that same write, so a login costs one round trip after
the greeting.

Every upstream reply goes through the sans-IO ``ClientConnection``: a reply is
matched to the command that asked for it, and an unsolicited, overlong or
malformed line, or an end of stream inside a message, is fatal. The connection
is then marked broken and every later use fails with ``[SYS/TEMP]``, so a
client is never sent a truncated message as if it were complete. Before each
command of a logged-in session the socket is checked for octets nobody asked
for, so a line the upstream sent while the session was idle is not taken for
that command's reply.

RETR and TOP bodies are relayed still dot-stuffed (``StuffedData``): the
session passes the octets on unchanged, reading the next chunk from upstream
only once the last one has been written to the client (back-pressure), so no
message is ever held whole. DELEs are sent only by ``commit``, at the client's
QUIT; the upstream's QUIT must answer ``+OK`` before the client hears ``+OK``.
Closing without ``commit`` never sends QUIT, so the upstream deletes nothing
(RFC 1939 §6).

Metrics. Given an ``UpstreamMetrics`` (popproxy/metrics.py, bound to the
upstream's name), the connection reports: its connect time (TCP connect plus
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
from collections.abc import AsyncGenerator, Mapping, Sequence, Set
from dataclasses import dataclass

import trio

from popproxy.config import TlsMode, UpstreamConfig, UpstreamLogin
from popproxy.maildrop.base import RETRIEVE_CHUNK_BYTES, MaildropError, MessageInfo
from popproxy.metrics import UpstreamMetrics
from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.client import ClientConnection, ClientEvent
from popproxy.pop3.commands import (
    Auth,
    Capa,
    Command,
    Dele,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    SaslLine,
    SaslResponse,
    Stls,
    Top,
    Uidl,
    User,
    Verb,
)
from popproxy.pop3.errors import RemoteProtocolError
from popproxy.pop3.events import NEED_DATA, Data, EndOfData, SaslChallenge, StuffedData
from popproxy.pop3.limits import MAX_UIDL_OCTETS
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.secret import Secret

log = logging.getLogger("popproxy.upstream")

# One read from the upstream: a RETR chunk passes through the session in pieces of
# at most this size (the same trade-off as the Maildir's chunks, docs/benchmarks.md).
UPSTREAM_RECEIVE_BYTES = RETRIEVE_CHUNK_BYTES
# A CAPA listing longer than this many lines is an upstream fault (RFC 2449 §5 lists
# a dozen capabilities; real servers send fewer than 20).
MAX_CAPABILITY_LINES = 64
# A maildrop with more messages than this is refused: its listing alone would hold
# tens of megabytes per session. Far above any POP3 mailbox in practice.
MAX_UPSTREAM_MESSAGES = 200_000
# Bound on the octets of one listing (UIDL or LIST): every message's line at its
# longest ("NNNNNN " and a 70-octet UID, RFC 1939 §7, with CRLF) fits.
MAX_LISTING_OCTETS = MAX_UPSTREAM_MESSAGES * 80
# How long closing the upstream connection (a TLS close_notify) may take.
UPSTREAM_CLOSE_TIMEOUT_SECONDS = 2.0


class UpstreamError(MaildropError):
    """An upstream failure, carrying the client's ``-ERR`` (RFC 3206) and why."""

    def __init__(self, failure: UpstreamFailure, code: ResponseCode | None, text: str) -> None:
        super().__init__(code, text)
        self.failure = failure


# RFC 3206 mapping, from the client's point of view: its own password was right.
_UNAVAILABLE = "The mail provider is unavailable, try again later."
_CREDENTIALS_REJECTED = (
    "The mail provider rejected popproxy's stored credentials; contact your administrator."
)
_CONNECTION_LOST = "Lost the connection to the mail provider."


_PASSED_CODES = (ResponseCode.SYS_TEMP, ResponseCode.SYS_PERM)


def _unavailable(failure: UpstreamFailure) -> UpstreamError:
    return UpstreamError(failure, ResponseCode.SYS_TEMP, _UNAVAILABLE)


def _lost(failure: UpstreamFailure) -> UpstreamError:
    return UpstreamError(failure, ResponseCode.SYS_TEMP, _CONNECTION_LOST)


@dataclass(frozen=True, slots=True)
class UpstreamAccount:
    """Where and as whom one local user logs in upstream (DESIGN.md, routing)."""

    upstream: UpstreamConfig
    user: str
    password: Secret


@dataclass(slots=True)
class CapabilityMemo:
    """What one upstream's last CAPA reply said (RFC 2449 §5), kept between sessions.

    Once an upstream has said PIPELINING, the next session sends CAPA, the login
    and both listings in one write right after the greeting, and checks the fresh
    CAPA reply as it arrives: a login then costs one round trip. Every session's
    CAPA reply replaces what is kept, so a change on the upstream is seen at once.
    Not frozen: shared by the sessions of one upstream (one trio thread).
    """

    capabilities: Mapping[str, tuple[str, ...]] | None = None  # None: no CAPA seen yet

    @property
    def pipelining(self) -> bool:
        """Whether the upstream's last CAPA listed PIPELINING (RFC 2449 §6.6)."""
        return self.capabilities is not None and "PIPELINING" in self.capabilities


class _Connection:
    """A trio stream and a ``ClientConnection``: send commands, read events, under deadlines."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        upstream: UpstreamConfig,
        metrics: UpstreamMetrics | None = None,
    ) -> None:
        self.stream = stream
        self.name = upstream.name
        self.max_reply_line_octets = upstream.max_reply_line_bytes
        self.conn = ClientConnection(max_reply_line_octets=self.max_reply_line_octets)
        self.bytes_received = 0
        self.metrics = metrics
        self.connect_seconds = 0.0  # TCP connect plus TLS handshake
        self.login_seconds = 0.0  # login command(s) sent to the login's +OK

    def secured(self) -> None:
        """The connection is secured as configured: report its connect time."""
        if self.metrics is not None:
            self.metrics.connected(self.connect_seconds)

    async def send(self, *commands: Command | SaslLine, stuffed_body: bool = False) -> None:
        """Write ``commands`` in one write (pipelined when there are several)."""
        data = b"".join(self.conn.send(c, stuffed_body=stuffed_body) for c in commands)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            raise _lost(UpstreamFailure.CLOSED) from None

    async def event(self, read_seconds: float | None = None) -> ClientEvent:
        """The next reply event, reading as needed.

        With ``read_seconds``, each read waits at most that long (``trio.TooSlowError``);
        an event already buffered costs no cancel scope. Without, the caller sets
        the deadline.
        """
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                log.warning(
                    "upstream_protocol_error",
                    extra={"fields": {"upstream": self.name, "reason": exc.reply.text}},
                )
                raise _lost(UpstreamFailure.PROTOCOL) from None
            if event is not NEED_DATA:
                if not self.conn.outstanding and self.conn.buffered:
                    # Octets after the last expected reply (RFC 1939 §3: a server only
                    # answers). Left there, they would be read as the next command's reply.
                    raise self.protocol_error("unsolicited reply")
                return event
            if read_seconds is None:
                data = await self._receive()
            else:
                with trio.move_on_after(read_seconds) as scope:
                    data = await self._receive()
                if scope.cancelled_caught:
                    raise trio.TooSlowError
            self.bytes_received += len(data)
            if self.metrics is not None and data:
                self.metrics.bytes_received(len(data))
            self.conn.receive_data(data)

    def check_quiet(self) -> None:
        """Raise a protocol error if the upstream sent anything since its last awaited
        reply (RFC 1939 §3: a server only answers). Called before a command on an idle
        logged-in connection: an unsolicited line that arrived on its own would
        otherwise be read as that command's reply. Octets still buffered are checked,
        then, without reading, whether the socket is readable (TLS records after the
        handshake's session tickets are likewise never sent unasked).
        """
        if self.conn.buffered:
            raise self.protocol_error("unsolicited reply")
        stream = self.stream
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        if not isinstance(transport, trio.SocketStream):
            return
        readable, _, _ = select.select([transport.socket.fileno()], [], [], 0)
        if readable:
            raise self.protocol_error("unsolicited reply")

    async def request(
        self, command: Command, *, within: float, stuffed_body: bool = False
    ) -> Ok | Err:
        """Send ``command`` and read its status line, all within ``within`` seconds
        (``trio.TooSlowError``). A plain cancel scope, not fail_after (a generator
        context manager): this is every RETR's path."""
        with trio.move_on_after(within):
            await self.send(command, stuffed_body=stuffed_body)
            return await self.status()
        raise trio.TooSlowError

    async def _receive(self) -> bytes | bytearray:
        try:
            return await self.stream.receive_some(UPSTREAM_RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            return b""

    async def status(self) -> Ok | Err:
        """The next status reply; anything else here is a protocol error."""
        event = await self.event()
        if isinstance(event, Ok | Err):
            return event
        log.warning(
            "upstream_protocol_error",
            extra={"fields": {"upstream": self.name, "reason": "expected a status line"}},
        )
        raise _lost(UpstreamFailure.PROTOCOL)

    async def lines(self, limit: int) -> list[bytes]:
        """The body of a multi-line reply whose ``+OK`` was read, as lines without ends.

        At most ``limit`` lines and ``MAX_LISTING_OCTETS`` in all, each no longer
        than a reply line (``max_reply_line_bytes``, RFC 2449 §4), line end included:
        checked as they arrive.
        """
        lines: list[bytes] = []
        partial = bytearray()
        total = 0
        while True:
            event = await self.event()
            match event:
                case Data(data=data):
                    partial += data
                    *complete, rest = partial.split(b"\n")
                    for line in complete:
                        if len(line) + 1 > self.max_reply_line_octets:
                            raise self.protocol_error("listing line too long")
                        total += len(line) + 1
                        lines.append(bytes(line.removesuffix(b"\r")))
                    if len(rest) >= self.max_reply_line_octets:
                        raise self.protocol_error("listing line too long")
                    if len(lines) > limit or total > MAX_LISTING_OCTETS:
                        raise self.protocol_error("listing too long")
                    partial = rest
                case EndOfData():
                    if partial:  # the unstuffer ends every body with a line end
                        raise self.protocol_error("listing ends inside a line")
                    return lines
                case _:
                    raise self.protocol_error("expected a multi-line body")

    def protocol_error(self, reason: str) -> UpstreamError:
        log.warning(
            "upstream_protocol_error", extra={"fields": {"upstream": self.name, "reason": reason}}
        )
        return _lost(UpstreamFailure.PROTOCOL)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(UPSTREAM_CLOSE_TIMEOUT_SECONDS) as scope:
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError
                ):
                    await self.stream.aclose()
            if scope.cancelled_caught:
                await trio.aclose_forcefully(self.stream)


def _capabilities(lines: Sequence[bytes]) -> dict[str, tuple[str, ...]]:
    """CAPA lines as ``{TAG: (arguments...)}``, tags upper-cased (RFC 2449 §5)."""
    out: dict[str, tuple[str, ...]] = {}
    for raw in lines:
        words = raw.decode("ascii", "replace").split()
        if words:
            out[words[0].upper()] = tuple(words[1:])
    return out


def _login_failure(reply: Err) -> UpstreamError:
    """Map an upstream login ``-ERR`` to the client's reply (RFC 3206, RFC 2449 §8.1)."""
    match reply.code:
        case ResponseCode.IN_USE:
            return UpstreamError(
                UpstreamFailure.IN_USE, ResponseCode.IN_USE, "The mailbox is in use upstream."
            )
        case ResponseCode.LOGIN_DELAY:
            return UpstreamError(
                UpstreamFailure.LOGIN_DELAY,
                ResponseCode.LOGIN_DELAY,
                "The mail provider asks to wait before logging in again.",
            )
        case ResponseCode.SYS_TEMP:
            return _unavailable(UpstreamFailure.REJECTED)
        case _:
            # [AUTH], [SYS/PERM] or no code: the stored credentials do not work, and
            # asking the client for its own (correct) password again would not help.
            return UpstreamError(
                UpstreamFailure.AUTH_REJECTED, ResponseCode.SYS_PERM, _CREDENTIALS_REJECTED
            )


def _parse_listing(lines: Sequence[bytes]) -> dict[int, bytes]:
    """``n value`` lines of a LIST or UIDL listing (RFC 1939 §5, §7) as ``{n: value}``."""
    out: dict[int, bytes] = {}
    for line in lines:
        words = line.split()
        if len(words) != 2 or not words[0].isdigit() or int(words[0]) in out:
            raise ValueError("malformed listing line")
        out[int(words[0])] = words[1]
    return out


def _valid_uid(uid: bytes) -> bool:
    """RFC 1939 §7: 1 to 70 octets in 0x21..0x7E."""
    return 0 < len(uid) <= MAX_UIDL_OCTETS and all(0x21 <= b <= 0x7E for b in uid)


def build_listing(
    uidl: Sequence[bytes], sizes: Sequence[bytes]
) -> tuple[list[int], list[MessageInfo]]:
    """Upstream numbers and the ``MessageInfo`` of each message, in upstream order.

    Raises ValueError when the listings disagree or break RFC 1939 §5/§7: the
    same numbers in both, positive, each UID valid and unique, each size a number.
    """
    uids = _parse_listing(uidl)
    lengths = _parse_listing(sizes)
    if uids.keys() != lengths.keys():
        raise ValueError("UIDL and LIST list different messages")
    numbers = sorted(uids)
    messages: list[MessageInfo] = []
    seen: set[bytes] = set()
    for number in numbers:
        uid, size = uids[number], lengths[number]
        if number == 0 or not _valid_uid(uid) or uid in seen or not size.isdigit():
            raise ValueError("invalid listing entry")
        seen.add(uid)
        messages.append(MessageInfo(uid.decode("ascii"), int(size)))
    return numbers, messages


def _plain_response(account: UpstreamAccount) -> Secret:
    """SASL PLAIN: empty authzid, authcid, password (RFC 4616 §2)."""
    return Secret(b"\0" + account.user.encode("utf-8") + b"\0" + account.password.reveal())


def _login_method(
    account: UpstreamAccount, capabilities: Mapping[str, tuple[str, ...]]
) -> UpstreamLogin:
    """USER (RFC 1939 §7) or PLAIN (RFC 5034 §4); ``auto`` takes PLAIN where CAPA lists it."""
    method = account.upstream.login
    if method is UpstreamLogin.AUTO:
        sasl = {m.upper() for m in capabilities.get("SASL", ())}
        method = UpstreamLogin.PLAIN if "PLAIN" in sasl else UpstreamLogin.USER
    return method


def _login_commands(account: UpstreamAccount, method: UpstreamLogin) -> list[Command]:
    """USER/PASS (RFC 1939 §7) or AUTH PLAIN with an initial response (RFC 5034 §4)."""
    if method is UpstreamLogin.PLAIN:
        return [Auth("PLAIN", _plain_response(account))]
    return [User(account.user), Pass(account.password, account.user)]


class UpstreamMaildrop:
    """An upstream POP3 session as a ``Maildrop`` (RFC 1939 §5-§7)."""

    dot_stuffed = True
    # What popproxy itself does; retention policy (retention.py) wraps this with its own.
    expire = "NEVER"

    def __init__(
        self,
        connection: _Connection,
        upstream: UpstreamConfig,
        numbers: list[int],
        messages: list[MessageInfo],
        *,
        pipelining: bool,
        metrics: UpstreamMetrics | None = None,
    ) -> None:
        self._connection = connection
        self._upstream = upstream
        self._numbers = numbers
        self._messages = messages
        self._pipelining = pipelining
        self._broken = False
        self._closed = False
        self._busy = False
        self._metrics = metrics
        if metrics is not None:
            metrics.session_opened()  # closed in aclose, which every path reaches

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The listing taken at login; index ``i`` is message number ``i + 1``."""
        return self._messages

    @property
    def keepalive_interval_seconds(self) -> float | None:
        """How often an idle session sends NOOP upstream (RFC 1939 §3 autologout)."""
        return self._upstream.keepalive_interval_seconds

    @property
    def bytes_received(self) -> int:
        """Octets received from the upstream so far."""
        return self._connection.bytes_received

    def _answered(self, verb: Verb, since: float) -> None:
        """``verb``'s status line arrived ``since`` (trio time) its command was sent."""
        if self._metrics is not None:
            self._metrics.command(verb, trio.current_time() - since)

    def _failed(self, failure: UpstreamFailure) -> None:
        """The logged-in session failed (counted once: later uses fail as CLOSED uncounted)."""
        if self._metrics is not None:
            self._metrics.error(failure)

    def _begin(self) -> None:
        if self._broken or self._closed:
            raise _lost(UpstreamFailure.CLOSED)
        if self._busy:
            raise RuntimeError("the upstream connection is already in use")
        self._busy = True

    async def retrieve(
        self, index: int, *, body_lines: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Stream RETR (or TOP with ``body_lines``) from upstream, still dot-stuffed.

        Raises ``MaildropError`` before the first chunk if the upstream answers
        ``-ERR``, and ``UpstreamError`` at any point if the connection fails;
        after a failure, or a stop before the end, the connection is not reused.
        """
        if not 0 <= index < len(self._numbers):
            raise IndexError(index)  # a caller's bug: the session checks message numbers
        number = self._numbers[index]
        self._begin()
        command: Command = Retr(number) if body_lines is None else Top(number, body_lines)
        timeout = self._upstream.command_timeout_seconds
        finished = False
        try:
            self._connection.check_quiet()
            sent = trio.current_time()
            reply = await self._connection.request(command, within=timeout, stuffed_body=True)
            # To the status line: the body then flows at the client's pace.
            self._answered(command.verb, sent)
            if isinstance(reply, Err):
                finished = True
                # Only a code that still applies is kept (RFC 3206 §4: SYS/TEMP, SYS/PERM).
                code = reply.code if reply.code in _PASSED_CODES else None
                raise MaildropError(code, "That message is no longer available upstream.")
            while True:
                event = await self._connection.event(timeout)
                match event:
                    case StuffedData(data=data):
                        yield data
                    case EndOfData():
                        finished = True
                        return
                    case _:
                        raise self._connection.protocol_error("expected message data")
        except trio.TooSlowError:
            self._failed(UpstreamFailure.TIMEOUT)
            raise _lost(UpstreamFailure.TIMEOUT) from None
        except UpstreamError as exc:
            self._failed(exc.failure)
            raise
        finally:
            self._busy = False
            if not finished:
                self._broken = True  # a reply is half read: the connection cannot be reused

    async def keep_alive(self) -> None:
        """NOOP, so the upstream does not log an idle session out (RFC 1939 §3, §5).

        A failure marks the connection broken; the client hears of it at its next command.
        """
        if self._broken or self._closed or self._busy:
            return
        self._busy = True
        failure: UpstreamFailure | None = None
        try:
            self._connection.check_quiet()
            sent = trio.current_time()
            with trio.fail_after(self._upstream.command_timeout_seconds):
                await self._connection.send(Noop())
                reply = await self._connection.status()
            self._answered(Noop.verb, sent)
            if isinstance(reply, Err):
                failure = UpstreamFailure.REJECTED
        except trio.TooSlowError:
            failure = UpstreamFailure.TIMEOUT
        except UpstreamError as exc:
            failure = exc.failure
        finally:
            self._busy = False
        if failure is not None:
            self._broken = True
            self._failed(failure)
            log.warning(
                "upstream_keepalive_failed", extra={"fields": {"upstream": self._upstream.name}}
            )

    async def commit(self, deleted: Set[int]) -> None:
        """DELE each marked message, then QUIT; only QUIT's ``+OK`` confirms (RFC 1939 §6).

        If a DELE is refused or anything fails before QUIT is sent, the
        connection is dropped without QUIT, so the upstream deletes nothing.
        """
        self._begin()
        try:
            self._connection.check_quiet()
            with trio.fail_after(self._upstream.command_timeout_seconds):
                await self._dele(sorted(deleted))
                sent = trio.current_time()
                await self._connection.send(Quit())
                reply = await self._connection.status()
            self._answered(Quit.verb, sent)
        except trio.TooSlowError:
            self._broken = True
            self._failed(UpstreamFailure.TIMEOUT)
            raise _lost(UpstreamFailure.TIMEOUT) from None
        except UpstreamError as exc:
            self._broken = True
            self._failed(exc.failure)
            raise
        finally:
            self._busy = False
        await self.aclose()
        if isinstance(reply, Err):
            # RFC 1939 §6: "some deleted messages not removed".
            self._failed(UpstreamFailure.REJECTED)
            raise UpstreamError(
                UpstreamFailure.REJECTED,
                ResponseCode.SYS_TEMP,
                "The mail provider did not confirm the deletions.",
            )
        if self._metrics is not None and deleted:
            self._metrics.messages_deleted(len(deleted))

    async def _dele(self, indexes: Sequence[int]) -> None:
        """DELE each message; pipelined where the upstream allows (RFC 2449 §6.6)."""
        deles = [Dele(self._numbers[i]) for i in indexes]
        if self._pipelining and deles:
            await self._connection.send(*deles)
        # Pipelined, each DELE is timed from the previous reply (the first from the
        # write): what one more command costs; otherwise from its own write.
        since = trio.current_time()
        for dele in deles:
            if not self._pipelining:
                since = trio.current_time()
                await self._connection.send(dele)
            reply = await self._connection.status()
            self._answered(Dele.verb, since)
            since = trio.current_time()
            if isinstance(reply, Err):
                raise UpstreamError(
                    UpstreamFailure.REJECTED,
                    ResponseCode.SYS_TEMP,
                    "The mail provider refused a deletion; nothing was deleted.",
                )

    async def aclose(self) -> None:
        """Drop the upstream connection without QUIT: nothing is deleted (RFC 1939 §6)."""
        if not self._closed:
            self._closed = True
            if self._metrics is not None:
                self._metrics.session_closed()
            await self._connection.aclose()


async def _connect(upstream: UpstreamConfig) -> trio.abc.Stream:
    try:
        with trio.fail_after(upstream.connect_timeout_seconds):
            return await trio.open_tcp_stream(upstream.host, upstream.port)
    except trio.TooSlowError:
        raise _unavailable(UpstreamFailure.TIMEOUT) from None
    except OSError as exc:
        log.warning(
            "upstream_connect_failed",
            extra={"fields": {"upstream": upstream.name, "reason": exc.strerror or str(exc)}},
        )
        raise _unavailable(UpstreamFailure.CONNECT) from None


async def _handshake(
    stream: trio.abc.Stream, upstream: UpstreamConfig, context: ssl.SSLContext | None
) -> trio.SSLStream[trio.abc.Stream]:
    """TLS as the client; ``context`` verifies certificate and host name (RFC 8314 §4.1)."""
    if context is None:
        raise RuntimeError(f"upstream {upstream.name} uses TLS but has no TLS context")
    tls = trio.SSLStream(stream, context, server_hostname=upstream.host)
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        reason = getattr(cause, "reason", None) or type(cause).__name__
        log.warning(
            "upstream_tls_failed",
            extra={"fields": {"upstream": upstream.name, "reason": str(reason)}},
        )
        raise _unavailable(UpstreamFailure.TLS) from None
    return tls


async def _secure(
    connection: _Connection, upstream: UpstreamConfig, context: ssl.SSLContext | None
) -> None:
    """The TLS handshake on ``connection``, its time added to the connect time."""
    started = trio.current_time()
    connection.stream = await _handshake(connection.stream, upstream, context)
    connection.connect_seconds += trio.current_time() - started
    connection.secured()


async def _capa(connection: _Connection) -> dict[str, tuple[str, ...]]:
    """CAPA (RFC 2449 §5); an upstream without it has no capabilities."""
    await connection.send(Capa())
    return await _capa_reply(connection)


async def _capa_reply(connection: _Connection) -> dict[str, tuple[str, ...]]:
    """The reply to a CAPA sent: ``-ERR`` means no capabilities (RFC 2449 §5)."""
    if isinstance(await connection.status(), Err):
        return {}
    return _capabilities(await connection.lines(MAX_CAPABILITY_LINES))


async def _starttls(
    connection: _Connection,
    upstream: UpstreamConfig,
    context: ssl.SSLContext | None,
    capabilities: Mapping[str, tuple[str, ...]],
) -> None:
    """STLS, required: not offered or refused means no credential is sent (RFC 2595 §4)."""
    if "STLS" not in capabilities:
        log.warning("upstream_stls_unavailable", extra={"fields": {"upstream": upstream.name}})
        raise _unavailable(UpstreamFailure.STLS_UNAVAILABLE)
    await connection.send(Stls())
    if isinstance(await connection.status(), Err):
        log.warning("upstream_stls_refused", extra={"fields": {"upstream": upstream.name}})
        raise _unavailable(UpstreamFailure.STLS_UNAVAILABLE)
    if connection.conn.buffered:
        # Octets after "+OK" came before the handshake: plaintext injected into what
        # would be read as protected (RFC 2595 §4, CVE-2011-0411 class).
        raise connection.protocol_error("data after the STLS reply")
    await _secure(connection, upstream, context)
    connection.conn = ClientConnection(
        expect_greeting=False, max_reply_line_octets=connection.max_reply_line_octets
    )


async def _listing(connection: _Connection) -> list[bytes] | None:
    """The body of the next multi-line reply, or None if it was ``-ERR``."""
    if isinstance(await connection.status(), Err):
        return None
    return await connection.lines(MAX_UPSTREAM_MESSAGES)


async def _login_and_list(
    connection: _Connection,
    account: UpstreamAccount,
    login: Sequence[Command],
    *,
    pipelining: bool,
    sent_at: float | None = None,
    stale: bool = False,
) -> tuple[list[bytes], list[bytes]]:
    """Log in, then UIDL and LIST; one write for all of it with PIPELINING (RFC 2449 §6.6).

    Pipelined, a refused login makes UIDL and LIST fail harmlessly in AUTHORIZATION;
    their replies are not waited for: a server may close the connection after a refusal,
    and the refusal (``[IN-USE]``, ``[AUTH]``, ...) is what the client must hear.

    ``sent_at``: the commands already went out (behind a CAPA) at that time. ``stale``:
    they were chosen from a memo that this session's CAPA reply contradicts, so a
    refusal may be this popproxy's doing and is reported as temporary (RFC 3206
    ``[SYS/TEMP]``); the next session goes by the fresh reply.
    """
    started = trio.current_time() if sent_at is None else sent_at
    if pipelining and sent_at is None:
        await connection.send(*login, Uidl(), List())
    for command in login:
        if not pipelining:
            await connection.send(command)
        reply = await connection.event()
        if isinstance(reply, SaslChallenge) and not pipelining:
            # No initial response support: answer the empty challenge (RFC 5034 §4).
            await connection.send(SaslResponse(_plain_response(account)))
            reply = await connection.event()
        if not isinstance(reply, Ok | Err):
            raise connection.protocol_error("expected a status line")
        if isinstance(reply, Err):
            raise _unavailable(UpstreamFailure.REJECTED) if stale else _login_failure(reply)
    connection.login_seconds = trio.current_time() - started
    if not pipelining:
        await connection.send(Uidl())
    uidl = await _listing(connection)
    if not pipelining:
        await connection.send(List())
    sizes = await _listing(connection)
    if uidl is None or sizes is None:
        log.warning("upstream_without_uidl", extra={"fields": {"upstream": connection.name}})
        raise UpstreamError(
            UpstreamFailure.UNSUPPORTED,
            ResponseCode.SYS_PERM,
            "The mail provider does not support unique ids (UIDL).",
        )
    return uidl, sizes


async def _capa_login_and_list(
    connection: _Connection,
    account: UpstreamAccount,
    memo: CapabilityMemo | None,
) -> tuple[Mapping[str, tuple[str, ...]], list[bytes], list[bytes]]:
    """CAPA, then log in and list: in one write when ``memo`` says the upstream
    pipelines (a login in one round trip), else CAPA first and the rest as it says.

    The memo is updated from this session's CAPA reply either way; the reply is
    returned with the two listings.
    """
    if memo is None or memo.capabilities is None or not memo.pipelining:
        capabilities = await _capa(connection)
        if memo is not None:
            memo.capabilities = capabilities
        login = _login_commands(account, _login_method(account, capabilities))
        pipelining = "PIPELINING" in capabilities
        uidl, sizes = await _login_and_list(connection, account, login, pipelining=pipelining)
        return capabilities, uidl, sizes
    method = _login_method(account, memo.capabilities)
    login = _login_commands(account, method)
    sent_at = trio.current_time()
    await connection.send(Capa(), *login, Uidl(), List())
    capabilities = await _capa_reply(connection)
    memo.capabilities = capabilities
    stale = "PIPELINING" not in capabilities or _login_method(account, capabilities) != method
    uidl, sizes = await _login_and_list(
        connection, account, login, pipelining=True, sent_at=sent_at, stale=stale
    )
    return capabilities, uidl, sizes


async def _open(
    connection: _Connection,
    account: UpstreamAccount,
    context: ssl.SSLContext | None,
    own_greeting_token: str | None,
    memo: CapabilityMemo | None,
) -> UpstreamMaildrop:
    upstream = account.upstream
    if upstream.tls is TlsMode.IMPLICIT:
        await _secure(connection, upstream, context)
    elif upstream.tls is TlsMode.NONE:
        connection.secured()
    greeting = await connection.status()
    if isinstance(greeting, Err):
        # No credential was sent: only [IN-USE] and [LOGIN-DELAY] say more than "unavailable".
        if greeting.code in (ResponseCode.IN_USE, ResponseCode.LOGIN_DELAY):
            raise _login_failure(greeting)
        raise _unavailable(UpstreamFailure.REJECTED)
    if own_greeting_token and own_greeting_token in greeting.text:
        log.error("upstream_is_popproxy_itself", extra={"fields": {"upstream": upstream.name}})
        raise UpstreamError(
            UpstreamFailure.LOOP,
            ResponseCode.SYS_PERM,
            "popproxy is configured to proxy to itself; contact your administrator.",
        )
    if upstream.tls is TlsMode.STARTTLS:
        await _starttls(connection, upstream, context, await _capa(connection))
        # RFC 2595 §4: what was said in clear is forgotten; CAPA is asked again below.
    capabilities, uidl, sizes = await _capa_login_and_list(connection, account, memo)
    try:
        numbers, messages = build_listing(uidl, sizes)
    except ValueError as exc:
        raise connection.protocol_error(str(exc)) from None
    if connection.metrics is not None:
        connection.metrics.login_succeeded(connection.login_seconds)
    return UpstreamMaildrop(
        connection,
        upstream,
        numbers,
        messages,
        pipelining="PIPELINING" in capabilities,
        metrics=connection.metrics,
    )


async def open_upstream(
    account: UpstreamAccount,
    *,
    tls_context: ssl.SSLContext | None,
    own_greeting_token: str | None = None,
    metrics: UpstreamMetrics | None = None,
    capabilities: CapabilityMemo | None = None,
) -> UpstreamMaildrop:
    """Log in upstream and take the listing (RFC 1939 §4-§7, RFC 2449, RFC 2595, RFC 5034).

    Raises ``UpstreamError`` carrying the client's reply: ``[SYS/TEMP]`` when the
    upstream is unreachable, slow, not secured as configured or breaks the
    protocol; ``[SYS/PERM]`` when it rejects the stored credentials; its
    ``[IN-USE]`` and ``[LOGIN-DELAY]`` passed through (RFC 3206, RFC 2449 §8.1).
    An upstream greeting that holds ``own_greeting_token`` is this process itself.

    ``metrics``, bound to this upstream's name, gets the connect and login times,
    the attempt's outcome (one ``UpstreamFailure`` for a failed one; a cancelled
    attempt is not counted) and, through the maildrop, the rest of the session.

    ``capabilities``, one per upstream and shared by its sessions, remembers the
    upstream's last CAPA reply: where it listed PIPELINING, CAPA, the login and the
    listings go out in one write after the greeting (see ``CapabilityMemo``).
    """
    try:
        return await _connect_and_open(
            account, tls_context, own_greeting_token, metrics, capabilities
        )
    except UpstreamError as exc:
        if metrics is not None:
            metrics.login_failed(exc.failure)
        raise


async def _connect_and_open(
    account: UpstreamAccount,
    tls_context: ssl.SSLContext | None,
    own_greeting_token: str | None,
    metrics: UpstreamMetrics | None,
    memo: CapabilityMemo | None,
) -> UpstreamMaildrop:
    upstream = account.upstream
    started = trio.current_time()
    connection = _Connection(await _connect(upstream), upstream, metrics)
    connection.connect_seconds = trio.current_time() - started
    try:
        with trio.fail_after(upstream.login_timeout_seconds):
            return await _open(connection, account, tls_context, own_greeting_token, memo)
    except trio.TooSlowError:
        await connection.aclose()
        raise _unavailable(UpstreamFailure.TIMEOUT) from None
    except BaseException:
        await connection.aclose()
        raise
