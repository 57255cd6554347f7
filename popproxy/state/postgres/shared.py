"""What several popproxy instances share in PostgreSQL beside the store: leases and
login failures (docs/scaling.md).

Theory of operation. ``PostgresShared`` has connections of its own, apart from the
store's: a QUIT's record of a large listing may take seconds, and a lease's renewal
must not queue behind it. Every call is one short transaction, bounded by
``SHARED_STATEMENT_TIMEOUT_SECONDS`` and ``SHARED_LOCK_TIMEOUT_SECONDS``; a server
that cannot be reached fails a call after at most ``SHARED_CONNECT_TIMEOUT_SECONDS``.
Every failure is a ``StateError``; for the login throttle a ``ThrottleUnavailable``.
A call of one statement (every lease call, a login's read of the failure counts:
several per session) runs in autocommit from the trio thread, with libpq in
non-blocking mode (``nonblocking.Statements``, at most ``SHARED_THREADS``
connections): one round trip to the server and no worker thread. A change of the
failure counts (a failed login) is a transaction of several statements: it runs in
a worker thread on a pool of its own (``SHARED_THREADS`` connections).

Leases (table ``leases``, one row per name): a row is held while its
``expires_at`` (the database's clock) is in the future. ``take_lease`` inserts the
row or takes over one that expired; ``renew_leases`` moves the expiry of a holder's
live rows and says which are still held; ``confirm_lease`` does the same for one
row before an irreversible step; ``release_lease`` deletes the row. Holding a lease
costs no connection: 10,000 idle sessions hold 10,000 rows, renewed by one
statement per process (``popproxy/shared_locks.py``).

Login failures (table ``login_failures``, one row per user name or client address
with failures that still matter): a change reads the rows of its keys ``FOR UPDATE``
(in key order, so two changes never deadlock), applies the pure rules of
``popproxy/auth/throttle.py`` with the database's clock as ``now``, and writes them
back in the same transaction: N instances count as one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from popproxy.auth.throttle import Failures, LockScope
from popproxy.auth.throttling import FailureChange, FailureKey, ThrottleUnavailable
from popproxy.state.base import StateError
from popproxy.state.postgres.nonblocking import (
    Statements,
    as_float,
    as_float_array,
    as_text,
    text_array,
)
from popproxy.state.postgres.schema import MIGRATIONS, Migration, migrate
from popproxy.state.postgres.target import (
    PostgresTarget,
    check_lent,
    run_connected,
    run_pooled,
)
from popproxy.state.workers import Workers

# Connections and worker threads for leases and login failures, per process: each
# login and QUIT makes a few short calls here (throttle, take, confirm, give back),
# as many as the store's own pool serves beside them.
SHARED_THREADS = 4
# How long a one-statement call waits for its answer: the statement's own timeout
# (statement_timeout, lock_timeout) and as much again for the network.
SHARED_CALL_SECONDS = 10
# How long a call waits for a connection (a server that is down fails a login's
# lease or throttle call after this long: the client gets -ERR [SYS/TEMP]).
SHARED_CONNECT_TIMEOUT_SECONDS = 5
# The longest one statement may run, and may wait for another's row lock: each is
# one row (or two) by primary key, so anything near this means trouble.
SHARED_STATEMENT_TIMEOUT_SECONDS = 5
SHARED_LOCK_TIMEOUT_SECONDS = 5
# A lease that lapsed this long ago and was not taken again is deleted (it kept the
# name of a mailbox nobody uses now).
STALE_LEASE_SECONDS = 3600
# Rows deleted per pruning statement, so a prune never holds many locks.
PRUNE_ROWS = 1000

_T = TypeVar("_T")


class PostgresShared:
    """Leases and login failures on PostgreSQL, shared by every instance of one store."""

    def __init__(self, target: PostgresTarget) -> None:
        """Use ``open_shared``; this only builds the (not yet open) pool."""
        self._target = target
        self._workers = Workers(SHARED_THREADS)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            target.url,
            kwargs=target.connection_kwargs(),
            min_size=1,
            max_size=SHARED_THREADS,
            open=False,
            configure=_configure,
            check=check_lent,
            timeout=SHARED_CONNECT_TIMEOUT_SECONDS,
            name="popproxy-shared",
        )
        self._statements = Statements(
            target,
            size=SHARED_THREADS,
            configure=_configure,
            connect_seconds=SHARED_CONNECT_TIMEOUT_SECONDS,
            call_seconds=SHARED_CALL_SECONDS,
        )

    @property
    def where(self) -> str:
        """The server and database, for log lines (never a password)."""
        return self._target.describe()

    # -- leases --------------------------------------------------------------------------

    async def take_lease(self, name: str, holder: str, token: str, seconds: float) -> bool:
        """Take lease ``name`` for ``seconds`` as ``token`` of ``holder`` if nobody holds it."""
        taken = await self._statements.run(
            "INSERT INTO leases AS l (name, holder, token, taken_at, expires_at)"
            " VALUES ($1::text, $2::text, $3::text, now(),"
            " now() + $4::float8 * interval '1 second')"
            " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
            " token = excluded.token, taken_at = excluded.taken_at,"
            " expires_at = excluded.expires_at"
            # or a take of this token that committed before its reply was lost: run
            # again (nonblocking.Statements), it holds the lease as it should
            " WHERE l.expires_at <= now() OR l.token = excluded.token"
            " RETURNING l.token",
            (name, holder, token, _seconds(seconds)),
        )
        return bool(taken.rows)

    async def renew_leases(
        self, holder: str, tokens: Sequence[str], seconds: float
    ) -> frozenset[str]:
        """Move the expiry of ``holder``'s live leases among ``tokens`` to ``seconds`` from
        now; return the tokens still held (one that lapsed is lost for good)."""
        renewed = await self._statements.run(
            "UPDATE leases SET expires_at = now() + $1::float8 * interval '1 second'"
            " WHERE holder = $2::text AND token = ANY($3::text[]) AND expires_at > now()"
            " RETURNING token",
            (_seconds(seconds), holder, text_array(tokens)),
        )
        return frozenset(as_text(row[0]) for row in renewed.rows)

    async def confirm_lease(self, name: str, token: str, seconds: float) -> bool:
        """Whether ``token`` still holds ``name``; if so its expiry moves to ``seconds``
        from now."""
        confirmed = await self._statements.run(
            "UPDATE leases SET expires_at = now() + $1::float8 * interval '1 second'"
            " WHERE name = $2::text AND token = $3::text AND expires_at > now() RETURNING token",
            (_seconds(seconds), name, token),
        )
        return bool(confirmed.rows)

    async def release_lease(self, name: str, token: str) -> None:
        """Give lease ``name`` up (nothing happens unless ``token`` holds it)."""
        await self._statements.run(
            "DELETE FROM leases WHERE name = $1::text AND token = $2::text", (name, token)
        )

    async def prune_leases(self) -> int:
        """Delete leases that lapsed ``STALE_LEASE_SECONDS`` ago; return how many."""
        pruned = await self._statements.run(
            "DELETE FROM leases WHERE name IN (SELECT name FROM leases"
            " WHERE expires_at < now() - $1::float8 * interval '1 second' LIMIT $2::integer)",
            (_seconds(STALE_LEASE_SECONDS), str(PRUNE_ROWS)),
        )
        return pruned.count

    # -- login failures ------------------------------------------------------------------

    async def change_failures(
        self, keys: Sequence[FailureKey], change: FailureChange[_T], *, writes: bool
    ) -> _T:
        """Apply ``change`` to the rows of ``keys`` in one transaction (see the module doc);
        ``writes`` False reads without locking and must write nothing.

        Raises ``ThrottleUnavailable`` when the database cannot be used.
        """
        ordered = sorted(set(keys), key=_key_order)
        try:
            if not writes:  # one statement: the clock and the rows (a login's throttle)
                return await self._read_failures(ordered, change)
            return await self._run(lambda conn: _change_failures(conn, ordered, change))
        except StateError as exc:
            raise ThrottleUnavailable(str(exc)) from exc

    async def prune_failures(self, remembered_seconds: float) -> int:
        """Forget rows whose last failure is ``remembered_seconds`` old and that lock
        nothing now; return how many."""
        try:
            return await self._run(
                lambda conn: (
                    conn.execute(
                        "DELETE FROM login_failures WHERE (scope, key) IN (SELECT scope, key"
                        " FROM login_failures WHERE last_failure < %(cutoff)s"
                        " AND locked_until < %(now)s LIMIT %(rows)s)",
                        _prune_bounds(conn, remembered_seconds),
                    ).rowcount
                )
            )
        except StateError as exc:
            raise ThrottleUnavailable(str(exc)) from exc

    async def _read_failures(self, keys: Sequence[FailureKey], change: FailureChange[_T]) -> _T:
        """``change`` that only reads: the database's clock and the rows of ``keys`` in
        one statement (one snapshot, no lock), without a row of the keys as well (the
        LEFT JOIN's one row of NULLs)."""
        keyed = _keyed(keys)
        read = await self._statements.run(
            "SELECT extract(epoch FROM clock_timestamp())::double precision,"
            " f.scope, f.key, f.penalty, f.last_failure, f.failures, f.locked_until"
            " FROM (SELECT) AS one LEFT JOIN login_failures AS f ON (f.scope, f.key) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[]))"
            " ORDER BY f.scope, f.key",
            (text_array(keyed["scopes"]), text_array(keyed["keys"])),
        )
        now = as_float(read.rows[0][0])
        found = {
            (LockScope(as_text(scope)), as_text(key)): Failures(
                penalty=int(as_text(penalty)),
                last_failure=as_float(last),
                failures=as_float_array(failures),
                locked_until=as_float(locked),
            )
            for _, scope, key, penalty, last, failures, locked in read.rows
            if scope is not None
        }
        result, changed = change(now, found)
        if changed:
            raise ValueError("a read of login failures may not write")
        return result

    # -- opening and closing -------------------------------------------------------------

    async def _open(self, migrations: Sequence[Migration]) -> None:
        await self._workers.run(functools.partial(self._migrate, migrations))
        await self._workers.run(functools.partial(self._pool.open, wait=False))

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        def work(conn: psycopg.Connection[Any]) -> None:
            _configure(conn)
            migrate(conn, migrations)

        run_connected(self._target, work)

    async def aclose(self) -> None:
        """Wait for running calls, then close the connections."""
        await self._statements.aclose()
        await self._workers.close(self._pool.close)

    async def _run(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        return await self._workers.run(functools.partial(self._in_worker, work))

    def _in_worker(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        return run_pooled(self._pool, self._target, work)


async def open_shared(
    target: PostgresTarget, *, migrations: Sequence[Migration] = MIGRATIONS
) -> PostgresShared:
    """Connect to ``target`` for leases and login failures (migrating, as the store does).

    Raises ``StateError``.
    """
    shared = PostgresShared(target)
    try:
        await shared._open(migrations)
    except BaseException:
        await shared.aclose()
        raise
    return shared


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "SELECT set_config('statement_timeout', %s, false),"
        " set_config('lock_timeout', %s, false), set_config('TimeZone', 'UTC', false)",
        (f"{SHARED_STATEMENT_TIMEOUT_SECONDS}s", f"{SHARED_LOCK_TIMEOUT_SECONDS}s"),
    )
    conn.commit()


def _now(conn: psycopg.Connection[Any]) -> float:
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::double precision").fetchone()
    assert row is not None
    return float(row[0])


def _prune_bounds(conn: psycopg.Connection[Any], remembered_seconds: float) -> dict[str, Any]:
    now = _now(conn)
    return {"now": now, "cutoff": now - remembered_seconds, "rows": PRUNE_ROWS}


def _seconds(seconds: float) -> str:
    """A number of seconds as a ``float8`` parameter (repr: exact, shortest)."""
    return repr(float(seconds))


def _key_order(key: FailureKey) -> tuple[str, str]:
    return (key[0].value, key[1])


def _keyed(keys: Sequence[FailureKey]) -> dict[str, list[str]]:
    return {"scopes": [scope.value for scope, _ in keys], "keys": [name for _, name in keys]}


def _failures(rows: Iterable[Sequence[Any]]) -> dict[FailureKey, Failures]:
    return {
        (LockScope(scope), str(key)): Failures(
            penalty=int(penalty),
            last_failure=float(last),
            failures=tuple(float(t) for t in failures),
            locked_until=float(locked),
        )
        for scope, key, penalty, last, failures, locked in rows
    }


def _change_failures(
    conn: psycopg.Connection[Any], keys: Sequence[FailureKey], change: FailureChange[_T]
) -> _T:
    keyed = _keyed(keys)
    with conn.transaction():
        now = _now(conn)
        # A row for each key first, so that FOR UPDATE has rows to lock: two
        # instances counting a new key's first failures at once count both.
        conn.execute(
            "INSERT INTO login_failures"
            " (scope, key, penalty, last_failure, failures, locked_until)"
            " SELECT t.scope, t.key, 0, '-infinity', '{}', '-infinity'"
            " FROM unnest(%(scopes)s::text[], %(keys)s::text[]) AS t (scope, key)"
            " ORDER BY t.scope, t.key ON CONFLICT DO NOTHING",
            keyed,
        )
        rows = conn.execute(
            "SELECT scope, key, penalty, last_failure, failures, locked_until"
            " FROM login_failures WHERE (scope, key) IN"
            " (SELECT * FROM unnest(%(scopes)s::text[], %(keys)s::text[]))"
            " ORDER BY scope, key FOR UPDATE",
            keyed,
        ).fetchall()
        result, changed = change(now, _failures(rows))
        for (scope, key), value in sorted(changed.items(), key=lambda i: _key_order(i[0])):
            if value is None:
                conn.execute(
                    "DELETE FROM login_failures WHERE scope = %s AND key = %s", (scope.value, key)
                )
                continue
            conn.execute(
                "INSERT INTO login_failures"
                " (scope, key, penalty, last_failure, failures, locked_until)"
                " VALUES (%s, %s, %s, %s, %s::double precision[], %s)"
                " ON CONFLICT (scope, key) DO UPDATE SET penalty = excluded.penalty,"
                " last_failure = excluded.last_failure, failures = excluded.failures,"
                " locked_until = excluded.locked_until",
                (
                    scope.value,
                    key,
                    value.penalty,
                    value.last_failure,
                    list(value.failures),
                    value.locked_until,
                ),
            )
        return result
