"""The PostgreSQL store itself: its connection pool and worker threads, opening (the
migrations), and ``record``; the other calls are ``StoreFrontend``'s over this
backend's ``QUERIES``.

psycopg 3's synchronous ``ConnectionPool`` (psycopg-pool) holds at most
``PG_THREADS`` connections; each call runs in a worker thread behind a
``CapacityLimiter`` of the same size (``workers.Workers``), takes a connection from
the pool for one transaction and gives it back. psycopg's async API would need
asyncio, and popproxy runs on trio. (The pool also runs three threads of its own
that open and replace connections in the background.) The pool checks a
connection before lending it (``target.check_lent``: one empty round trip if it sat
idle or the server sent it something, such as the notice of a restart, else none),
so a PostgreSQL restart costs no failed call; a connection that breaks during a call
fails that call with ``StateError`` and is discarded. A call of one statement
(``facts``, ``known_source``) runs in autocommit (``target.one_statement``): one
round trip, no ``BEGIN`` or ``COMMIT``. A login's ``facts`` for a listing of up to
``FACTS_ON_LOOP_MAX_UIDS`` runs from the trio thread instead, with libpq in
non-blocking mode on connections of its own (``nonblocking.Statements``): no worker
thread, the statement prepared once per connection. Those facts also tell whether
the QUIT will change anything (``unchanged.py``); if not, it writes nothing.

Every wait on the server is bounded: libpq's ``connect_timeout`` and TCP user
timeout for the network (``target.py``), ``statement_timeout`` for one statement,
and ``lock_timeout`` (``state.busy_timeout_seconds``) for waiting on another
writer's row locks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from popproxy.state.base import AccountKey, MessageFacts, SessionRecord
from popproxy.state.checks import check_record
from popproxy.state.frontend import Queries, StoreFrontend
from popproxy.state.postgres import audit, gateway, known_sources, retention, sql
from popproxy.state.postgres.nonblocking import Statements
from popproxy.state.postgres.schema import MIGRATIONS, Migration, check_readable, migrate
from popproxy.state.postgres.target import (
    PG_CONNECT_TIMEOUT_SECONDS,
    PostgresTarget,
    check_lent,
    one_statement,
    run_connected,
    run_pooled,
)
from popproxy.state.postgres.unchanged import LoginFacts

# Worker threads, and so pooled connections, per process: enough for logins' reads
# beside commits; a fleet of N instances holds at most N * PG_THREADS connections
# (PostgreSQL's default max_connections is 100).
PG_THREADS = 4
# Connections the pool keeps open when idle (it grows to PG_THREADS under load).
PG_MIN_CONNECTIONS = 1
# The longest one statement may run: a record of a whole listing (MAX_RECORD_MESSAGES
# rows) takes a few seconds on a slow server; this bounds a stuck one.
PG_STATEMENT_TIMEOUT_SECONDS = 60
# A login's facts for a listing of at most this many UIDLs are read from the trio
# thread (one statement, no worker thread); a longer listing's in a worker thread.
# Turning the rows into facts takes about 3.7 µs a message on the event loop (1.1 ms
# for 300, measured on the benchmark machine): this bounds it to about a millisecond.
FACTS_ON_LOOP_MAX_UIDS = 300

_T = TypeVar("_T")

# The work of each call but ``record``, in a worker thread; times as aware datetimes.
QUERIES: Queries[psycopg.Connection[Any], datetime] = Queries(
    stored=sql.stored,
    facts=one_statement(retention.facts),
    messages=retention.messages,
    prune_batch=retention.prune_batch,
    gateway_listing=gateway.gateway_listing,
    gateway_facts=gateway.gateway_facts,
    gateway_staged=gateway.gateway_staged,
    gateway_transition=gateway.gateway_transition,
    gateway_deleted=gateway.gateway_deleted,
    gateway_poll_finished=gateway.gateway_poll_finished,
    gateway_sources=gateway.gateway_sources,
    known_source=one_statement(known_sources.known_source),
    remember_source=known_sources.remember_source,
    audit=audit.audit,
    count_audit=audit.count_audit,
    trim_audit_batch=audit.trim_audit_batch,
)


class PostgresStore(StoreFrontend[psycopg.Connection[Any], datetime]):
    """``StateStore`` on a PostgreSQL database, shared by any number of processes."""

    def __init__(
        self,
        target: PostgresTarget,
        *,
        lock_timeout_seconds: float,
        migrations: Sequence[Migration] = MIGRATIONS,
        read_only: bool = False,
    ) -> None:
        """Use ``open_postgres``; this only builds the (not yet open) pool."""
        super().__init__(QUERIES, threads=PG_THREADS)
        self._read_only = read_only
        self._target = target
        self._lock_timeout = lock_timeout_seconds
        self._migrations = tuple(migrations)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            target.url,
            kwargs=target.connection_kwargs(),
            min_size=PG_MIN_CONNECTIONS,
            max_size=PG_THREADS,
            open=False,
            configure=self._configure,
            check=check_lent,
            timeout=PG_CONNECT_TIMEOUT_SECONDS,
            name="popproxy-state",
        )
        self._logins = LoginFacts()
        self._statements = Statements(
            target,
            size=PG_THREADS,
            configure=self._configure,
            connect_seconds=PG_CONNECT_TIMEOUT_SECONDS,
            call_seconds=PG_STATEMENT_TIMEOUT_SECONDS + PG_CONNECT_TIMEOUT_SECONDS,
        )

    async def _read_facts(
        self, account: AccountKey, user: str, wanted: list[str]
    ) -> Mapping[str, MessageFacts]:
        """A login's facts: from the trio thread (``nonblocking.Statements``) for a
        listing of up to ``FACTS_ON_LOOP_MAX_UIDS``, in a worker thread above that
        (reading 100,000 rows must not hold up the event loop)."""
        if len(wanted) > FACTS_ON_LOOP_MAX_UIDS:
            self._logins.forget(account, user)
            return await super()._read_facts(account, user, wanted)
        read = await self._statements.run(
            retention.FACTS_STATEMENT, retention.facts_parameters(account, user, wanted)
        )
        facts = retention.facts_from_text(read.rows)
        self._logins.read(account, user, wanted, facts)  # for its QUIT (unchanged.py)
        return facts

    async def aclose(self) -> None:
        """Close the connections of the trio side, then wait for running calls and
        close the pool."""
        await self._statements.aclose()
        await super().aclose()

    async def record(self, record: SessionRecord) -> None:
        """Write what one QUIT did in one transaction; committed when this returns.
        A QUIT that by its login's facts changes nothing but times that may wait
        writes nothing (``unchanged.py``)."""
        check_record(record)
        if self._logins.answer_unchanged(record):
            return
        await self._run(lambda conn: retention.record_session(conn, record))

    # -- opening -----------------------------------------------------------------------

    async def _open(self) -> None:
        """Migrate over a connection of its own (so a server that cannot be reached
        fails at once, with libpq's reason), then let the pool connect."""
        await self._workers.run(functools.partial(run_connected, self._target, self._migrate))
        await self._workers.run(functools.partial(self._pool.open, wait=False))

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        self._configure(conn)
        if self._read_only:
            check_readable(conn, self._migrations)
        else:
            migrate(conn, self._migrations)

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Each new connection's session settings (run by the pool, in its thread)."""
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false),"
            " set_config('lock_timeout', %s, false), set_config('TimeZone', 'UTC', false),"
            " set_config('default_transaction_read_only', %s, false)",
            (
                f"{PG_STATEMENT_TIMEOUT_SECONDS}s",
                f"{int(self._lock_timeout * 1000)}ms",
                "on" if self._read_only else "off",
            ),
        )
        conn.commit()

    # -- threads and connections -------------------------------------------------------

    def _in_worker(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """Run ``work`` on a pooled connection (committed on return); a worker thread."""
        return run_pooled(self._pool, self._target, work)

    def _release(self) -> None:
        """Close the pool and its connections."""
        self._pool.close()


async def open_postgres(
    target: PostgresTarget,
    *,
    lock_timeout_seconds: float,
    migrations: Sequence[Migration] = MIGRATIONS,
    read_only: bool = False,
) -> PostgresStore:
    """Connect to ``target`` and bring its schema up to date (see the module docstring).

    The tables live in the first schema of the connection's ``search_path`` (set one
    with ``?options=-csearch_path%3Dname`` in the URL). With ``read_only`` nothing is
    created or migrated and every transaction is read-only
    (``default_transaction_read_only``): ``popproxy audit``. Raises ``StateError``.
    """
    store = PostgresStore(
        target,
        lock_timeout_seconds=lock_timeout_seconds,
        migrations=migrations,
        read_only=read_only,
    )
    try:
        await store._open()
    except BaseException:
        await store.aclose()
        raise
    return store
