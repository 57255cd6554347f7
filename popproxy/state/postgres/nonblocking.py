"""Single statements to PostgreSQL driven from the trio thread, with no worker thread.

Theory of operation. Through the pools of ``target.run_pooled`` every call is a
hand-off to a worker thread and back, and psycopg's cursor machinery in between;
under load that was about half a millisecond of CPU per call, most of it thread
switches and the GIL passing between the worker and the event loop (issue 15,
docs/scaling.md). The calls of the shared leases, the login throttle's read and a
short listing's facts are each one short statement, several per session.
``Statements`` runs such a statement with libpq in non-blocking mode on the trio
thread instead: ``PQsendQueryPrepared`` (after ``PQsendPrepare`` on the statement's
first use on a connection, ``MAX_PREPARED_STATEMENTS`` at most, so the server parses
and plans it once, as psycopg's cursors do after a few runs), then ``PQflush`` until
it is out and ``PQconsumeInput`` until the result is complete, waiting on the socket
the trio way in between (``wait_writable``, ``wait_readable``, after a brief wait in
poll(2): ``popproxy/quick_wait.py``). Nothing blocks the event loop but libpq's own
work on what the socket holds.

Parameters and results are text: each statement casts its parameters (``$1::text``,
``$2::float8``, ``$3::text[]``, with ``text_array`` for lists) and its callers read
the text back (``as_bool``, ``as_float``, ``as_float_array``).

Connections: at most ``size``, each used by one call at a time. One is opened when
a call finds none idle, by ``psycopg.connect`` in a worker thread (opening blocks,
and happens once per connection), configured there (``configure``: timeouts, the
time zone), in autocommit: a statement is its own transaction. A call waits at most
``connect_seconds`` for a connection (trying again while a server restarts, as
psycopg's pool does) and ``call_seconds`` for its result. A connection whose call
failed midway (a timeout, a cancellation, a broken socket) is closed, never lent
again; one that sat idle is checked without a round trip: if the server sent it
anything (it ends idle connections only: a restart, an idle timeout,
``pg_terminate_backend``) it is closed and another is taken. A call whose idle
connection turns out broken on its first use runs once more on a new one, as
``run_pooled`` does: every statement run here may run twice, and each is written so
that running it again changes nothing more.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.pq
import trio

from popproxy.quick_wait import QuickWait
from popproxy.state.base import StateError
from popproxy.state.postgres.target import PostgresTarget, first_line, socket_readable
from popproxy.state.workers import Workers

# Rows of one result turned into Python values at most (a renewal's tokens, a login's
# few rows): a statement answering more is a bug, refused before its rows are read.
MAX_RESULT_ROWS = 100_000

# Statements prepared per connection (the callers run a handful of texts); any further
# text runs unprepared, parsed and planned by the server each time.
MAX_PREPARED_STATEMENTS = 64
# A connection that could not be opened is tried again after this long, doubling up
# to the maximum, while the call's connect_seconds last.
CONNECT_RETRY_SECONDS = 0.1
MAX_CONNECT_RETRY_SECONDS = 1.0

_OK = frozenset({psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK})


@dataclass(frozen=True, slots=True)
class Result:
    """What a statement answered: its rows (text, None for NULL) and its count (the rows
    an INSERT, UPDATE or DELETE touched, or those a SELECT returned)."""

    rows: tuple[tuple[bytes | None, ...], ...]
    count: int


class _Broken(Exception):
    """The connection failed (libpq's error text): it is closed, and the call may run again."""


class _Connection:
    """One connection of the trio side: psycopg's (kept open, never used to run a
    statement), its libpq handle and socket, and its brief waits (quick_wait.py)."""

    __slots__ = ("closed", "conn", "fd", "pgconn", "prepared", "quick")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.fd = self.pgconn.socket
        self.quick = QuickWait(self.fd)
        # Statement text -> its prepared statement's name on this connection.
        self.prepared: dict[bytes, bytes] = {}
        self.closed = False

    def close(self) -> None:
        """Close it, telling trio first (a task may be waiting on its socket); once only,
        as the descriptor's number may be another socket's afterwards."""
        if self.closed:
            return
        self.closed = True
        trio.lowlevel.notify_closing(self.fd)
        self.conn.close()

    async def execute(
        self, command: bytes, params: list[bytes | None], deadline: float
    ) -> psycopg.pq.abc.PGresult | None:
        """Run ``command`` as a prepared statement of this connection (prepared on its
        first use here, so the server parses and plans it once per connection) and read
        its result by ``deadline`` (trio time; None past it). ``_Broken`` if the
        connection fails."""
        name = self.prepared.get(command)
        if name is None and len(self.prepared) >= MAX_PREPARED_STATEMENTS:
            return await self._exchange(
                functools.partial(self.pgconn.send_query_params, command, params), deadline
            )
        if name is None:
            name = b"popproxy_%d" % len(self.prepared)
            prepared = await self._exchange(
                functools.partial(self.pgconn.send_prepare, name, command), deadline
            )
            if prepared is None or prepared.status not in _OK:
                return prepared  # past the deadline, or the server refused the statement
            self.prepared[command] = name
        return await self._exchange(
            functools.partial(self.pgconn.send_query_prepared, name, params), deadline
        )

    async def _exchange(
        self, send: Callable[[], None], deadline: float
    ) -> psycopg.pq.abc.PGresult | None:
        """``send()`` one request and read its one result (libpq's asynchronous API:
        PostgreSQL docs, "Asynchronous Command Processing"), by ``deadline``. A wait
        that the socket answers within a brief wait costs no cancel scope (as in
        popproxy/socket_stream.py)."""
        pgconn = self.pgconn
        try:
            send()
            while pgconn.flush():  # 1: some is still to go out
                if not await self._wait(trio.lowlevel.wait_writable, deadline):
                    return None
            result: psycopg.pq.abc.PGresult | None = None
            while True:
                pgconn.consume_input()
                while not pgconn.is_busy():
                    got = pgconn.get_result()
                    if got is None:
                        if result is None:
                            raise _Broken("the server answered nothing")
                        return result
                    if result is None:
                        result = got  # one statement: one result, then None
                if self.quick.readable(deadline - trio.current_time()):
                    continue
                if not await self._wait(trio.lowlevel.wait_readable, deadline):
                    return None
        except psycopg.OperationalError as exc:
            raise _Broken(first_line(exc)) from None

    async def _wait(self, wait: Callable[[int], Awaitable[None]], deadline: float) -> bool:
        """``wait`` for the socket until ``deadline``; False if it passed first."""
        with trio.move_on_at(deadline):
            await wait(self.fd)
            return True
        return False


class Statements:
    """Single statements on connections of their own, from the trio thread (module doc)."""

    def __init__(
        self,
        target: PostgresTarget,
        *,
        size: int,
        configure: Callable[[psycopg.Connection[Any]], None],
        connect_seconds: float,
        call_seconds: float,
    ) -> None:
        self._target = target
        self._configure = configure
        self._connect_seconds = connect_seconds
        self._call_seconds = call_seconds
        self._slots = trio.Semaphore(size)
        self._idle: list[_Connection] = []
        self._workers = Workers(size)  # opening connections, which blocks
        self._closed = False

    async def run(self, query: str, params: Sequence[str | None] = ()) -> Result:
        """Run one statement with text ``params`` ($1, $2... cast in ``query``).

        Raises ``StateError`` when the server cannot be reached within
        ``connect_seconds``, does not answer within ``call_seconds``, or refuses the
        statement (its message's first line); ``trio.ClosedResourceError`` once closed
        (as a store's worker threads do)."""
        if self._closed:
            raise trio.ClosedResourceError("the state store is closed")
        try:
            encoded = [None if p is None else p.encode("utf-8") for p in params]
        except UnicodeEncodeError:  # a lone surrogate: no text the server could take
            raise self._error("a parameter is not UTF-8 text") from None
        command = query.encode("utf-8")
        deadline = trio.current_time() + self._connect_seconds  # for a connection
        try:
            self._slots.acquire_nowait()  # a free slot: no cancel scope
        except trio.WouldBlock:
            waited = False
            with trio.move_on_at(deadline):
                await self._slots.acquire()
                waited = True
            if not waited:
                raise self._error(f"no connection within {self._connect_seconds:g} s") from None
        try:
            conn, was_idle = await self._lend(deadline)
            try:
                return await self._on(conn, command, encoded)
            except _Broken as broken:
                if not was_idle:
                    raise self._error(str(broken)) from None
            # The server had ended this idle connection: once more, on a new one.
            conn = await self._open(trio.current_time() + self._connect_seconds)
            try:
                return await self._on(conn, command, encoded)
            except _Broken as broken:
                raise self._error(str(broken)) from None
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        """Close the idle connections (calls still running close theirs as they end)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        await self._workers.close(lambda: None)

    async def _lend(self, deadline: float) -> tuple[_Connection, bool]:
        """An idle connection the server has sent nothing to (True), or a new one."""
        while self._idle:
            conn = self._idle.pop()
            if not socket_readable(conn.fd):
                return conn, True
            conn.close()  # the server ended it (or sent what nobody asked for)
        return await self._open(deadline), False

    async def _open(self, deadline: float) -> _Connection:
        """A new connection, tried again (``CONNECT_RETRY_SECONDS``, doubling) until
        ``deadline`` (trio time): a server restarting is waited for, one that stays down
        fails the call then."""
        pause = CONNECT_RETRY_SECONDS
        while True:  # ends: connected, or the deadline passes
            if self._closed:
                raise trio.ClosedResourceError("the state store is closed")
            remaining = deadline - trio.current_time()
            connect = functools.partial(_connect, self._target, self._configure, remaining)
            try:
                return _Connection(await self._workers.run(connect))
            except psycopg.Error as exc:
                if trio.current_time() + pause >= deadline:
                    raise self._error(first_line(exc)) from exc
            await trio.sleep(pause)
            pause = min(pause * 2, MAX_CONNECT_RETRY_SECONDS)

    async def _on(self, conn: _Connection, command: bytes, params: list[bytes | None]) -> Result:
        """``command`` on ``conn``, which goes back to the idle list only if it ended
        cleanly; closed on any failure but the statement's own error."""
        result = None
        try:
            result = await conn.execute(command, params, trio.current_time() + self._call_seconds)
        finally:
            if result is not None and not self._closed:
                self._idle.append(conn)
            else:
                conn.close()
        if result is None:
            raise self._error(f"no answer within {self._call_seconds:g} s")
        return _result(result, self._error)

    def _error(self, reason: str) -> StateError:
        return StateError(f"state store {self._target.describe()}: {reason}")


def _connect(
    target: PostgresTarget,
    configure: Callable[[psycopg.Connection[Any]], None],
    within: float,
) -> psycopg.Connection[Any]:
    """A connection in autocommit and non-blocking mode, configured (in a worker thread);
    libpq's connect_timeout no longer than ``within`` (unless the URL sets its own)."""
    kwargs = target.connection_kwargs()
    if "connect_timeout" in kwargs:  # whole seconds, at least 2 (libpq)
        kwargs["connect_timeout"] = max(2, min(int(kwargs["connect_timeout"]), math.ceil(within)))
    conn = psycopg.connect(target.url, **kwargs)
    try:
        configure(conn)
        conn.autocommit = True
        conn.pgconn.nonblocking = 1
    except BaseException:
        conn.close()
        raise
    return conn


def _result(result: psycopg.pq.abc.PGresult, error: Callable[[str], StateError]) -> Result:
    if result.status not in _OK:
        lines = result.error_message.decode("utf-8", "replace").strip().splitlines()
        raise error(lines[0] if lines else f"the statement failed (status {result.status})")
    if result.ntuples > MAX_RESULT_ROWS:
        raise error(f"a statement answered {result.ntuples} rows")
    columns = range(result.nfields)
    rows = tuple(
        tuple(result.get_value(row, column) for column in columns) for row in range(result.ntuples)
    )
    return Result(rows, result.command_tuples or 0)


# -- text in and out --------------------------------------------------------------------


def text_array(values: Sequence[str]) -> str:
    """A ``text[]`` literal of ``values``: each element quoted, ``"`` and ``\\`` escaped
    (PostgreSQL docs, "Array Value Input")."""
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(quoted) + "}"


def as_text(value: bytes | None) -> str:
    """A text (or integer) column's value; NULL is an error of the statement."""
    if value is None:
        raise ValueError("unexpected NULL")
    return value.decode("utf-8")


def as_bool(value: bytes | None) -> bool:
    """A boolean column's value (``t`` or ``f``)."""
    return as_text(value) == "t"


def as_float(value: bytes | None) -> float:
    """A ``double precision`` column's value (``Infinity``, ``-Infinity`` included)."""
    return float(as_text(value))


def as_float_array(value: bytes | None) -> tuple[float, ...]:
    """A one-dimensional ``double precision[]`` column's value (no NULL elements)."""
    text = as_text(value)
    if not (text.startswith("{") and text.endswith("}")):
        raise ValueError(f"not an array: {text[:40]!r}")
    inner = text[1:-1]
    return tuple(float(item) for item in inner.split(",")) if inner else ()
