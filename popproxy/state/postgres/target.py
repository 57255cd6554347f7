"""Where and how the PostgreSQL store connects: the URL and its password apart,
libpq's bounds on every network wait, and the error text of a failed call.

A URL's own query options (``sslmode``, ``connect_timeout``,
``options=-csearch_path=...``) win over popproxy's defaults. A password in the URL
is refused: it belongs in ``state.password_file`` or ``state.password_env``, and
never reaches a message (``describe``). The store (``store.py``) and the shared
leases and login failures (``shared.py``) connect alike.
"""

from __future__ import annotations

import contextlib
import select
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from popproxy.config.schema import postgres_url_problem
from popproxy.secret import Secret
from popproxy.state.base import StateError

# How long opening a connection may take (libpq connect_timeout; whole seconds).
PG_CONNECT_TIMEOUT_SECONDS = 10
# How long sent data may stay unacknowledged before the connection is dropped
# (libpq tcp_user_timeout, in ms): a server that vanished fails the call instead
# of hanging it.
PG_TCP_USER_TIMEOUT_MS = 30_000
# A pooled connection idle longer than this is checked with a round trip (an empty
# query) before it is lent; one used more recently is checked without one
# (``check_lent``). Far below any server's or firewall's idle cut-off.
PG_CHECK_IDLE_SECONDS = 30.0

_T = TypeVar("_T")
_P = ParamSpec("_P")

# When each pooled connection was last given back (time.monotonic()), for check_lent.
_returned: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()
# The connections lent without a round trip, until given back (run_pooled).
_unchecked: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class PostgresTarget:
    """Where to connect: a libpq URL without a password, and the password apart."""

    url: str
    password: Secret | None = None

    def connection_kwargs(self) -> dict[str, Any]:
        """libpq parameters beside the URL: the password and popproxy's bounds, each
        unless the URL sets it (the URL's own value wins). Raises ``StateError`` for a
        URL libpq cannot parse or one that carries a password."""
        refuse_password(self.url)
        try:
            given = conninfo_to_dict(self.url)
        except psycopg.Error as exc:
            raise StateError(f"the state URL is not a PostgreSQL URL: {first_line(exc)}") from exc
        defaults: dict[str, Any] = {
            "connect_timeout": PG_CONNECT_TIMEOUT_SECONDS,
            "tcp_user_timeout": PG_TCP_USER_TIMEOUT_MS,
            "keepalives": 1,
            "application_name": "popproxy",
        }
        kwargs = {key: value for key, value in defaults.items() if key not in given}
        if self.password is not None:
            try:
                kwargs["password"] = self.password.reveal().decode("utf-8")
            except UnicodeDecodeError:
                raise StateError("the state store's password is not UTF-8 text") from None
        return kwargs

    def describe(self) -> str:
        """The server and database, for messages (never a password)."""
        parts = urlsplit(self.url)
        return f"postgresql://{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def refuse_password(url: str) -> None:
    """Raise ``StateError`` for a URL the config would refuse (a password in it belongs
    in ``state.password_file`` or ``state.password_env``); a second guard for callers
    that build a ``StateConfig`` themselves."""
    problem = postgres_url_problem(url)
    if problem is not None:
        raise StateError(f"the state URL is refused: {problem}")


def first_line(exc: BaseException) -> str:
    """An exception's first line (psycopg appends DETAIL, HINT and a query excerpt)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_pooled(
    pool: ConnectionPool[psycopg.Connection[Any]],
    target: PostgresTarget,
    work: Callable[[psycopg.Connection[Any]], _T],
) -> _T:
    """``work`` on a connection of ``pool`` (committed on return, rolled back on an
    error); psycopg's errors, the pool's timeout too, become ``StateError``.

    A call whose connection the server had ended while it was lent without a round
    trip (``check_lent``) runs once more, on another connection: the check it skipped
    would have found the connection broken. What failed with it was rolled back (the
    server ends a connection only between statements or by aborting the one running),
    and every single statement run in autocommit (``one_statement``) may run twice.
    """
    try:
        try:
            return _on_pooled(pool, work)
        except _EndedUnchecked:
            return _on_pooled(pool, work)  # once: a connection lent now was checked
    except _EndedUnchecked as ended:
        exc = ended.__cause__
        raise StateError(f"state store {target.describe()}: {first_line(ended)}") from exc
    except psycopg.Error as exc:
        raise StateError(f"state store {target.describe()}: {first_line(exc)}") from exc


class _EndedUnchecked(Exception):
    """The server had ended a connection lent without a round trip (``run_pooled``)."""


def _on_pooled(
    pool: ConnectionPool[psycopg.Connection[Any]], work: Callable[[psycopg.Connection[Any]], _T]
) -> _T:
    with pool.connection() as conn:
        try:
            return work(conn)
        except psycopg.Error as exc:
            ended = conn.broken or conn.closed or isinstance(exc, psycopg.errors.AdminShutdown)
            if ended and conn in _unchecked:
                raise _EndedUnchecked(first_line(exc)) from exc
            raise
        finally:
            _returned[conn] = time.monotonic()
            _unchecked.discard(conn)


def check_lent(conn: psycopg.Connection[Any]) -> None:
    """The pools' check of a connection before they lend it (raises if it is broken).

    A connection idle in the pool for ``PG_CHECK_IDLE_SECONDS`` or more, or whose
    socket has something to read (an idle connection is sent nothing unless the server
    ends it: a restart, ``pg_terminate_backend``, an idle timeout), gets psycopg's
    check, one empty round trip. Any other is lent as is: under load, one round trip
    fewer per call. A connection the network lost silently within that time fails
    its next call (libpq's TCP user timeout bounds the wait), as it would have after
    the check.
    """
    returned = _returned.get(conn)
    recent = returned is not None and time.monotonic() - returned < PG_CHECK_IDLE_SECONDS
    if recent and not conn.closed and not socket_readable(conn.fileno()):
        _unchecked.add(conn)
        return
    _unchecked.discard(conn)
    ConnectionPool.check_connection(conn)


def socket_readable(fd: int) -> bool:
    """Whether the server sent anything to an idle connection's socket ``fd`` (poll, no
    wait): an idle connection is sent nothing unless the server ends it."""
    poller = select.poll()  # not select(): a busy process has descriptors past 1024
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def one_statement(
    work: Callable[Concatenate[psycopg.Connection[Any], _P], _T],
) -> Callable[Concatenate[psycopg.Connection[Any], _P], _T]:
    """``work``, which runs a single statement, run in autocommit: the statement is its
    own transaction, so the call costs one round trip instead of three (psycopg's
    ``BEGIN`` and the ``COMMIT`` on return are each one more). Only for work of one
    statement; a call of several keeps its transaction."""

    def run(conn: psycopg.Connection[Any], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        conn.autocommit = True
        try:
            return work(conn, *args, **kwargs)
        finally:
            with contextlib.suppress(psycopg.Error):  # a broken one is discarded anyway
                conn.autocommit = False

    return run


def run_connected(target: PostgresTarget, work: Callable[[psycopg.Connection[Any]], None]) -> None:
    """``work`` on a connection of its own, outside any pool (the migration at open, so
    a server that cannot be reached fails at once, with libpq's reason)."""
    try:
        with psycopg.connect(target.url, **target.connection_kwargs()) as conn:
            work(conn)
    except psycopg.Error as exc:
        raise StateError(
            f"cannot open the state store {target.describe()}: {first_line(exc)}"
        ) from exc
