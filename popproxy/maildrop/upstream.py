"""The live upstream maildrop (proxy mode): one upstream session per client session.

A thin ``Maildrop`` adapter over ``connection.py``, which connects, secures,
logs in and takes the listing (``open_connection``), and over which this module
maps the client's message numbers to the upstream's, streams RETR and TOP, keeps
an idle session alive and commits the client's deletions at QUIT.

RETR and TOP bodies are relayed still dot-stuffed (``StuffedData``): the
session passes the octets on unchanged, reading the next chunk from upstream
only once the last one has been written to the client (back-pressure), so no
message is ever held whole. DELEs are sent only by ``commit``, at the client's
QUIT; the upstream's QUIT must answer ``+OK`` before the client hears ``+OK``.
Closing without ``commit`` never sends QUIT, so the upstream deletes nothing
(RFC 1939 §6). Each use of the connection runs inside its ``exchange``: after a
failure, or a stop in the middle of a reply, the connection is not reused.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncGenerator, Sequence, Set
from contextlib import AbstractContextManager
from itertools import repeat
from operator import attrgetter
from typing import NoReturn

import trio

from popproxy import gc_pause
from popproxy.config import UpstreamConfig
from popproxy.maildrop.base import Committed, MaildropError, MessageChunks, MessageInfo
from popproxy.maildrop.connection import UPSTREAM_RECEIVE_BYTES, UpstreamConnection, UpstreamError
from popproxy.maildrop.upstream_login import CapabilityMemo, UpstreamAccount, open_account
from popproxy.metrics import UpstreamMetrics
from popproxy.oauth2.cache import TokenCache
from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.client_replies import UNAVAILABLE
from popproxy.pop3.commands import Command, Noop, Retr, Top
from popproxy.pop3.events import EndOfData, PoisonedDotLines, StuffedData
from popproxy.pop3.replies import Err, ResponseCode

# Re-exported: serve.py, explain.py and the tests name them here.
__all__ = [
    "UPSTREAM_RECEIVE_BYTES",
    "CapabilityMemo",
    "UpstreamAccount",
    "UpstreamError",
    "UpstreamMaildrop",
    "open_upstream",
]

log = logging.getLogger("popproxy.upstream")

# TOP n 0 commands in flight at once when the header rules read every message's header
# from an upstream that said PIPELINING (RFC 2449 §6.6): one write and one round trip
# per window instead of per message, and a bounded number of replies owed.
HEADER_WINDOW = 32

# An upstream's -ERR to RETR or TOP keeps only a code that still applies (RFC 3206 §4).
_PASSED_CODES = (ResponseCode.SYS_TEMP, ResponseCode.SYS_PERM)


class UpstreamMaildrop:
    """An upstream POP3 session as a ``Maildrop`` (RFC 1939 §5-§7)."""

    dot_stuffed = True
    # What popproxy itself does; retention policy (retention.py) wraps this with its own.
    expire = "NEVER"

    def __init__(
        self,
        connection: UpstreamConnection,
        numbers: list[int],
        messages: list[MessageInfo],
        *,
        session_id: str | None = None,
    ) -> None:
        self._connection = connection
        self._upstream: UpstreamConfig = connection.upstream
        self._numbers = numbers
        self._messages = messages
        self._session_id = session_id  # the client session served, for log lines

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

    def retrieve(self, index: int, *, body_lines: int | None = None) -> MessageChunks:
        """Stream RETR (or TOP with ``body_lines``) from upstream, still dot-stuffed.

        Raises ``MaildropError`` before the first chunk if the upstream answers
        ``-ERR``, and ``UpstreamError`` at any point if the connection fails;
        after a failure, or a stop before the end, the connection is not reused.
        """
        return _Retrieval(self, index, body_lines)

    async def headers(
        self, indexes: Sequence[int], limit: int
    ) -> AsyncGenerator[tuple[int, bytes | None], None]:
        """``TOP n 0`` of each of ``indexes`` in order, as (index, header): the octets
        still dot-stuffed, at most ``limit`` of them kept (the rest is read and
        dropped), or None where the upstream answered ``-ERR`` (RFC 1939 §7).

        Pipelined ``HEADER_WINDOW`` at a time when the upstream said PIPELINING
        (RFC 2449 §6.6), else one at a time. Each reply is timed from the previous one
        (the first from the write) and waits at most the command timeout.
        """
        connection = self._connection
        timeout = self._upstream.command_timeout_seconds
        window = HEADER_WINDOW if connection.pipelining else 1
        with connection.exchange():
            connection.check_quiet()
            for start in range(0, len(indexes), window):
                batch = indexes[start : start + window]
                await connection.send(*(Top(self._numbers[i], 0) for i in batch), stuffed_body=True)
                since = trio.current_time()
                for index in batch:
                    with trio.fail_after(timeout):
                        reply = await connection.status()
                    connection.answered(Top.verb, since)
                    since = trio.current_time()
                    if isinstance(reply, Err):
                        yield index, None
                        continue
                    wire = bytearray()
                    while True:  # ends: EndOfData, or an error raised
                        match await connection.event(timeout):
                            case StuffedData(data=data):
                                if len(wire) < limit:
                                    wire += data[: limit - len(wire)]
                            case PoisonedDotLines(count=count):
                                connection.poisoned_dot_lines(
                                    count,
                                    session=self._session_id or "-",
                                    uid=self._messages[index].uid,
                                )
                            case EndOfData():
                                break
                            case _:
                                raise connection.protocol_error("expected message data")
                    yield index, bytes(wire)

    async def keep_alive(self) -> None:
        """NOOP, so the upstream does not log an idle session out (RFC 1939 §3, §5).

        A failure marks the connection broken; the client hears of it at its next command.
        """
        if not self._connection.idle:
            return
        try:
            await self._noop()
        except UpstreamError:
            log.warning(
                "upstream_keepalive_failed", extra={"fields": {"upstream": self._upstream.name}}
            )

    async def _noop(self) -> None:
        connection = self._connection
        with connection.exchange():
            connection.check_quiet()
            timeout = self._upstream.command_timeout_seconds
            if isinstance(await connection.request(Noop(), within=timeout), Err):
                raise UpstreamError(UpstreamFailure.REJECTED, ResponseCode.SYS_TEMP, UNAVAILABLE)

    async def commit(self, deleted: Set[int]) -> Committed:
        """DELE each marked message, then QUIT; only QUIT's ``+OK`` confirms (RFC 1939 §6).

        If a DELE is refused or anything fails before QUIT is sent, the
        connection is dropped without QUIT, so the upstream deletes nothing.
        """
        await self._connection.commit([self._numbers[i] for i in sorted(deleted)])
        return Committed(deleted_upstream=len(deleted))

    async def aclose(self) -> None:
        """Drop the upstream connection without QUIT: nothing is deleted (RFC 1939 §6)."""
        await self._connection.aclose()


class _Retrieval:
    """``UpstreamMaildrop.retrieve``'s chunks: a small class, not an async generator, as it
    is every RETR's path (issue 15). The first ``__anext__`` enters the connection's
    ``exchange`` and sends the command; the exchange ends with the body's end, a failure
    (which ``exchange`` may turn into an ``UpstreamError``), or ``aclose`` before the end,
    which leaves the reply half read and so breaks the connection."""

    __slots__ = ("_body_lines", "_exchange", "_finished", "_index", "_maildrop")

    def __init__(self, maildrop: UpstreamMaildrop, index: int, body_lines: int | None) -> None:
        self._maildrop = maildrop
        self._index = index
        self._body_lines = body_lines
        self._exchange: AbstractContextManager[None] | None = None
        self._finished = False

    def __aiter__(self) -> _Retrieval:
        return self

    async def __anext__(self) -> bytes:
        if self._finished:
            raise StopAsyncIteration
        maildrop = self._maildrop
        connection = maildrop._connection
        try:
            if self._exchange is None:
                await self._request()
            timeout = maildrop._upstream.command_timeout_seconds
            while True:  # the body's next chunk, or its end (one await: every RETR's path)
                event = await connection.event(timeout)
                if type(event) is StuffedData:
                    return event.data
                match event:
                    case EndOfData():
                        break
                    case PoisonedDotLines(count=count):
                        connection.poisoned_dot_lines(
                            count,
                            session=maildrop._session_id or "-",
                            uid=maildrop._messages[self._index].uid,
                        )
                    case _:
                        _not_message_data(connection)
        except BaseException as exc:
            self._finish(exc)  # the exchange may raise its own error instead
            raise
        self._finish(None)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop: a reply not read to its end breaks the connection (``exchange``)."""
        if not self._finished:
            self._finish(GeneratorExit())

    async def _request(self) -> None:
        maildrop, index = self._maildrop, self._index
        if not 0 <= index < len(maildrop._numbers):
            raise IndexError(index)  # a caller's bug: the session checks message numbers
        number = maildrop._numbers[index]
        body_lines = self._body_lines
        command: Command = Retr(number) if body_lines is None else Top(number, body_lines)
        connection = maildrop._connection
        exchange = connection.exchange()
        exchange.__enter__()
        self._exchange = exchange
        connection.check_quiet()
        # Timed to the status line: the body then flows at the client's pace.
        reply = await connection.request(
            command, within=maildrop._upstream.command_timeout_seconds, stuffed_body=True
        )
        if isinstance(reply, Err):
            code = reply.code if reply.code in _PASSED_CODES else None
            raise MaildropError(code, "That message is no longer available upstream.")

    def _finish(self, exc: BaseException | None) -> None:
        self._finished = True
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            if exc is None:
                exchange.__exit__(None, None, None)
            else:
                exchange.__exit__(type(exc), exc, exc.__traceback__)


def _not_message_data(connection: UpstreamConnection) -> NoReturn:
    raise connection.protocol_error("expected message data")


async def open_upstream(
    account: UpstreamAccount,
    *,
    tls_context: ssl.SSLContext | None,
    own_greeting_token: str | None = None,
    metrics: UpstreamMetrics | None = None,
    capabilities: CapabilityMemo | None = None,
    session_id: str | None = None,
    tokens: TokenCache | None = None,
) -> UpstreamMaildrop:
    """Log in upstream as ``account`` and take the listing (``upstream_login.open_connection``
    has the errors, RFC 3206, and what ``metrics`` and ``capabilities`` are for; a token
    account's access token comes from ``tokens``, ``upstream_login.open_account``).
    ``session_id`` names the client session in the maildrop's log lines."""
    connection, listing = await open_account(
        account,
        tls_context=tls_context,
        tokens=tokens,
        own_greeting_token=own_greeting_token,
        metrics=metrics,
        capabilities=capabilities,
        session=session_id or "",
    )
    with gc_pause.paused():  # up to 100,000 messages
        numbers = list(map(_number, listing))
        # Each (uid, size) made a MessageInfo by tuple.__new__ itself, as the named
        # tuple's own constructor does, without a Python call per message.
        messages = list(map(_new_tuple, repeat(MessageInfo), map(_uid_and_size, listing)))
    return UpstreamMaildrop(connection, numbers, messages, session_id=session_id)


_number = attrgetter("number")
_uid_and_size = attrgetter("uid", "size")
_new_tuple = tuple.__new__
