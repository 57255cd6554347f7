"""Where and how the PostgreSQL store connects: the URL and its password apart,
libpq's bounds on every network wait, and the error text of a failed call.

A URL's own query options (``sslmode``, ``connect_timeout``,
``options=-csearch_path=...``) win over popproxy's defaults. A password in the URL
is refused: it belongs in ``state.password_file`` or ``state.password_env``, and
never reaches a message (``describe``). The store (``store.py``) and the shared
leases and login failures (``shared.py``) connect alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg
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
# The longest one statement may run: a record of a whole listing (MAX_RECORD_MESSAGES

_T = TypeVar("_T")


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
    error); psycopg's errors, the pool's timeout too, become ``StateError``."""
    try:
        with pool.connection() as conn:
            return work(conn)
    except psycopg.Error as exc:
        raise StateError(f"state store {target.describe()}: {first_line(exc)}") from exc


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
