"""The shared ``StateStore``: PostgreSQL, for several popproxy processes on one store.

Theory of operation. psycopg 3's synchronous ``ConnectionPool`` (psycopg-pool)
holds at most ``PG_THREADS`` connections; each call runs in a worker thread
behind a ``CapacityLimiter`` of the same size (``workers.Workers``), takes a
connection from the pool for one transaction and gives it back. psycopg's async
API would need asyncio, and popproxy runs on trio. (The pool also runs three
threads of its own that open and replace connections in the background.) The
pool checks a connection before lending it (one empty round trip), so a
PostgreSQL restart costs no failed call; a connection that breaks during a call
fails that call with ``StateError`` and is discarded.

Every wait on the server is bounded: libpq's ``connect_timeout`` and TCP user
timeout for the network, ``statement_timeout`` for one statement, and
``lock_timeout`` (``state.busy_timeout_seconds``) for waiting on another
writer's row locks. A URL's own query options (``sslmode``, ``connect_timeout``,
``options=-csearch_path=...``) win over these defaults.

Concurrency. Transactions run at READ COMMITTED. ``record`` first upserts its
account row and so holds that row's lock until it commits: the records of one
account (from any process) apply one after another, those of different accounts
in parallel. ``prune`` deletes in batches and re-checks each row against the
committed listing it would remove (so a record that lists a UIDL again wins).
``messages`` reads one REPEATABLE READ snapshot.

Migrations (``pg_schema.py``) run at open, once across every process that
starts at the same time (an advisory lock), and are versioned in the database.

Times are ``timestamptz`` (microseconds, as Python's ``datetime``); names and
UIDLs are ``text COLLATE "C"``, so they compare and sort by their bytes, as in
sqlite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from popproxy.config.schema import postgres_url_problem
from popproxy.secret import Secret
from popproxy.state.base import (
    AccountKey,
    MessageFacts,
    SessionRecord,
    StateError,
    StoredMessage,
)
from popproxy.state.checks import (
    MAX_LISTED_MESSAGES,
    MAX_USER_OCTETS,
    PRUNE_BATCH,
    check_account,
    check_aware,
    check_record,
    check_text,
    check_uids,
    split_listing,
)
from popproxy.state.pg_schema import MIGRATIONS, Migration, migrate
from popproxy.state.workers import Workers

# Worker threads, and so pooled connections, per process: enough for logins' reads
# beside commits; a fleet of N instances holds at most N * PG_THREADS connections
# (PostgreSQL's default max_connections is 100).
PG_THREADS = 4
# Connections the pool keeps open when idle (it grows to PG_THREADS under load).
PG_MIN_CONNECTIONS = 1
# How long opening a connection may take (libpq connect_timeout; whole seconds).
PG_CONNECT_TIMEOUT_SECONDS = 10
# How long sent data may stay unacknowledged before the connection is dropped
# (libpq tcp_user_timeout, in ms): a server that vanished fails the call instead
# of hanging it.
PG_TCP_USER_TIMEOUT_MS = 30_000
# The longest one statement may run: a record of a whole listing (MAX_RECORD_MESSAGES
# rows) takes a few seconds on a slow server; this bounds a stuck one.
PG_STATEMENT_TIMEOUT_SECONDS = 60


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


class PostgresStore:
    """``StateStore`` on a PostgreSQL database, shared by any number of processes."""

    def __init__(
        self,
        target: PostgresTarget,
        *,
        lock_timeout_seconds: float,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        """Use ``open_postgres``; this only builds the (not yet open) pool."""
        self._target = target
        self._lock_timeout = lock_timeout_seconds
        self._migrations = tuple(migrations)
        self._workers = Workers(PG_THREADS)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            target.url,
            kwargs=target.connection_kwargs(),
            min_size=PG_MIN_CONNECTIONS,
            max_size=PG_THREADS,
            open=False,
            configure=self._configure,
            check=ConnectionPool.check_connection,
            timeout=PG_CONNECT_TIMEOUT_SECONDS,
            name="popproxy-state",
        )

    # -- the StateStore protocol -------------------------------------------------------

    async def facts(
        self, account: AccountKey, user: str, uids: Collection[str]
    ) -> Mapping[str, MessageFacts]:
        """The facts for those of ``uids`` the store knows, as seen by local ``user``."""
        check_account(account)
        check_text("user", user, MAX_USER_OCTETS)
        wanted = list(dict.fromkeys(uids))
        check_uids(wanted)
        return await self._run(lambda conn: _facts(conn, account, user, wanted))

    async def record(self, record: SessionRecord) -> None:
        """Write what one QUIT did in one transaction; committed when this returns."""
        check_record(record)
        await self._run(lambda conn: _record(conn, record))

    async def messages(self, account: AccountKey | None = None) -> Sequence[StoredMessage]:
        """Every stored UIDL (of ``account``, or all), at most ``MAX_LISTED_MESSAGES``."""
        if account is not None:
            check_account(account)
        return await self._run(lambda conn: _messages(conn, account))

    async def prune(self, gone_before: datetime) -> int:
        """Forget UIDLs gone from the upstream (``StoredMessage.is_gone``), ``PRUNE_BATCH``
        rows a transaction."""
        check_aware(gone_before)
        total = 0
        while True:  # ends: each pass deletes at least one row or stops
            deleted = await self._run(lambda conn: _prune_batch(conn, gone_before))
            total += deleted
            if deleted < PRUNE_BATCH:
                return total

    async def aclose(self) -> None:
        """Wait for running calls, then close the pool and its connections."""
        await self._workers.close(self._pool.close)

    # -- opening -----------------------------------------------------------------------

    async def _open(self) -> None:
        """Migrate over a connection of its own (so a server that cannot be reached
        fails at once, with libpq's reason), then let the pool connect."""
        await self._workers.run(self._migrate)
        await self._workers.run(functools.partial(self._pool.open, wait=False))

    def _migrate(self) -> None:
        try:
            with psycopg.connect(self._target.url, **self._target.connection_kwargs()) as conn:
                self._configure(conn)
                migrate(conn, self._migrations)
        except psycopg.Error as exc:
            raise StateError(
                f"cannot open the state store {self._target.describe()}: {first_line(exc)}"
            ) from exc

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Each new connection's session settings (run by the pool, in its thread)."""
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false),"
            " set_config('lock_timeout', %s, false), set_config('TimeZone', 'UTC', false)",
            (f"{PG_STATEMENT_TIMEOUT_SECONDS}s", f"{int(self._lock_timeout * 1000)}ms"),
        )
        conn.commit()

    # -- threads and connections -------------------------------------------------------

    async def _run(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        return await self._workers.run(functools.partial(self._in_worker, work))

    def _in_worker(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """Run ``work`` on a pooled connection (committed on return); a worker thread."""
        try:
            with self._pool.connection() as conn:
                return work(conn)
        except psycopg.Error as exc:
            raise StateError(f"state store {self._target.describe()}: {first_line(exc)}") from exc


async def open_postgres(
    target: PostgresTarget,
    *,
    lock_timeout_seconds: float,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> PostgresStore:
    """Connect to ``target`` and bring its schema up to date (see the module docstring).

    The tables live in the first schema of the connection's ``search_path`` (set one
    with ``?options=-csearch_path%3Dname`` in the URL). Raises ``StateError``.
    """
    store = PostgresStore(target, lock_timeout_seconds=lock_timeout_seconds, migrations=migrations)
    try:
        await store._open()
    except BaseException:
        await store.aclose()
        raise
    return store


# -- the work, in a worker thread --------------------------------------------------------


def _utc(when: datetime) -> datetime:
    return when.astimezone(UTC)


def _maybe_utc(when: datetime | None) -> datetime | None:
    return None if when is None else when.astimezone(UTC)


def _facts(
    conn: psycopg.Connection[Any], account: AccountKey, user: str, uids: list[str]
) -> dict[str, MessageFacts]:
    rows = conn.execute(  # one statement: one snapshot
        "SELECT m.uid, m.size, m.first_seen, m.last_seen, r.at, h.local_user IS NOT NULL,"
        " m.deleted_upstream_at FROM accounts AS a JOIN messages AS m ON m.account_id = a.id"
        " LEFT JOIN retrievals AS r ON r.message_id = m.id AND r.local_user = %(user)s"
        " LEFT JOIN hides AS h ON h.message_id = m.id AND h.local_user = %(user)s"
        " WHERE a.upstream = %(upstream)s AND a.upstream_user = %(upstream_user)s"
        " AND m.uid = ANY(%(uids)s::text[])",
        {
            "user": user,
            "upstream": account.upstream,
            "upstream_user": account.upstream_user,
            "uids": uids,
        },
    )
    return {
        uid: MessageFacts(
            uid=uid,
            size=size,
            first_seen=_utc(first),
            last_seen=_utc(last),
            retrieved_at=_maybe_utc(retrieved),
            hidden=hidden,
            deleted_upstream_at=_maybe_utc(deleted),
        )
        for uid, size, first, last, retrieved, hidden, deleted in rows
    }


def _record(conn: psycopg.Connection[Any], record: SessionRecord) -> None:
    at = record.at
    sizes = {m.uid: m.size for m in record.seen}
    with conn.transaction():
        # Creates the account or moves its last listing, and holds its row lock until
        # COMMIT: records of one account apply one after another.
        row = conn.execute(
            "INSERT INTO accounts (upstream, upstream_user, last_listed) VALUES (%s, %s, %s)"
            " ON CONFLICT (upstream, upstream_user) DO UPDATE"
            " SET last_listed = greatest(accounts.last_listed, excluded.last_listed)"
            " RETURNING id",
            (record.account.upstream, record.account.upstream_user, at),
        ).fetchone()
        assert row is not None  # RETURNING of an upsert always has its row
        account_id = int(row[0])
        stale = _apply_listing(conn, account_id, sizes, at)
        current = set(sizes) - stale
        who = {"user": record.user, "at": at, "session": record.session_id, "account": account_id}
        conn.execute(
            "INSERT INTO retrievals (message_id, local_user, at, session_id)"
            " SELECT id, %(user)s, %(at)s, %(session)s FROM messages"
            " WHERE account_id = %(account)s AND uid = ANY(%(uids)s::text[])"
            " ON CONFLICT DO NOTHING",  # the first complete RETR is the one kept
            {**who, "uids": sorted(record.retrieved & current)},
        )
        hidden: dict[str, str] = {}
        for d in record.hidden:
            if d.uid in current:
                hidden.setdefault(d.uid, d.rule)  # as sqlite: the first hide of a UIDL wins
        conn.execute(
            "INSERT INTO hides (message_id, local_user, at, session_id, rule)"
            " SELECT m.id, %(user)s, %(at)s, %(session)s, t.rule"
            " FROM unnest(%(uids)s::text[], %(rules)s::text[]) AS t (uid, rule)"
            " JOIN messages AS m ON m.account_id = %(account)s AND m.uid = t.uid"
            " ON CONFLICT DO NOTHING",  # hidden for good since the first hide
            {**who, "uids": list(hidden), "rules": list(hidden.values())},
        )
        deleted = {d.uid: d.rule for d in record.deleted_upstream if d.uid in current}
        conn.execute(
            "UPDATE messages AS m SET deleted_upstream_at = %(at)s,"
            " deleted_session_id = %(session)s, deleted_by_rule = t.rule"
            " FROM unnest(%(uids)s::text[], %(rules)s::text[]) AS t (uid, rule)"
            " WHERE m.account_id = %(account)s AND m.uid = t.uid",
            {**who, "uids": list(deleted), "rules": list(deleted.values())},
        )
        audit = [
            (d.uid, sizes[d.uid], action, d.rule)
            for action, items in (
                ("hide", record.hidden),
                ("delete_upstream", record.deleted_upstream),
            )
            for d in items
        ]
        conn.execute(
            "INSERT INTO disposals (local_user, at, session_id, account_id, uid, size, action,"
            " rule) SELECT %(user)s, %(at)s, %(session)s, %(account)s, t.uid, t.size,"
            " t.action, t.rule FROM unnest(%(uids)s::text[], %(sizes)s::bigint[],"
            " %(actions)s::text[], %(rules)s::text[]) WITH ORDINALITY"
            " AS t (uid, size, action, rule, n) ORDER BY t.n",
            {
                **who,
                "uids": [a[0] for a in audit],
                "sizes": [a[1] for a in audit],
                "actions": [a[2] for a in audit],
                "rules": [a[3] for a in audit],
            },
        )


def _apply_listing(
    conn: psycopg.Connection[Any], account_id: int, sizes: Mapping[str, int], at: datetime
) -> set[str]:
    """Upsert the session's listing; return the UIDLs whose stored content is newer
    (``checks.split_listing``). Same size: ``first_seen`` takes the earlier,
    ``last_seen`` the later time (so commits out of order agree)."""
    uids = list(sizes)
    stored = {
        uid: (size, later)
        for uid, size, later in conn.execute(
            "SELECT uid, size, last_seen > %s FROM messages"
            " WHERE account_id = %s AND uid = ANY(%s::text[])",
            (at, account_id, uids),
        )
    }
    stale, reused = split_listing(sizes, stored)
    if reused:
        conn.execute(
            "DELETE FROM messages WHERE account_id = %s AND uid = ANY(%s::text[])",
            (account_id, reused),
        )
    kept = [uid for uid in uids if uid not in stale]
    conn.execute(
        "INSERT INTO messages (account_id, uid, size, first_seen, last_seen)"
        " SELECT %(account)s, t.uid, t.size, %(at)s, %(at)s"
        " FROM unnest(%(uids)s::text[], %(sizes)s::bigint[]) AS t (uid, size)"
        " ON CONFLICT (account_id, uid) DO UPDATE SET"
        " first_seen = least(messages.first_seen, excluded.first_seen),"
        " last_seen = greatest(messages.last_seen, excluded.last_seen)",
        {"account": account_id, "at": at, "uids": kept, "sizes": [sizes[uid] for uid in kept]},
    )
    return stale


def _messages(conn: psycopg.Connection[Any], account: AccountKey | None) -> list[StoredMessage]:
    where = ""
    args: tuple[str, ...] = ()
    if account is not None:
        where = " WHERE a.upstream = %s AND a.upstream_user = %s"
        args = (account.upstream, account.upstream_user)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        rows = conn.execute(
            "SELECT m.id, a.upstream, a.upstream_user, m.uid, m.size, m.first_seen,"
            " m.last_seen, m.deleted_upstream_at, m.deleted_by_rule, a.last_listed"
            " FROM messages AS m JOIN accounts AS a ON a.id = m.account_id"
            f"{where} ORDER BY a.upstream, a.upstream_user, m.first_seen, m.uid LIMIT %s",
            (*args, MAX_LISTED_MESSAGES + 1),
        ).fetchall()
        if len(rows) > MAX_LISTED_MESSAGES:
            raise StateError(
                f"more than {MAX_LISTED_MESSAGES} stored messages; show one account at a time"
            )
        retrieved: dict[int, list[tuple[str, datetime]]] = {}
        hidden: dict[int, list[tuple[str, str, datetime]]] = {}
        join = (
            " JOIN messages AS m ON m.id = x.message_id JOIN accounts AS a ON a.id = m.account_id"
        )
        for message_id, user, when in conn.execute(
            f"SELECT x.message_id, x.local_user, x.at FROM retrievals AS x{join}{where}"
            " ORDER BY x.at, x.local_user",
            args,
        ):
            retrieved.setdefault(message_id, []).append((user, _utc(when)))
        for message_id, user, rule, when in conn.execute(
            f"SELECT x.message_id, x.local_user, x.rule, x.at FROM hides AS x{join}{where}"
            " ORDER BY x.at, x.local_user",
            args,
        ):
            hidden.setdefault(message_id, []).append((user, rule, _utc(when)))
    return [
        StoredMessage(
            account=AccountKey(upstream, upstream_user),
            uid=uid,
            size=size,
            first_seen=_utc(first),
            last_seen=_utc(last),
            retrieved_by=tuple(retrieved.get(message_id, ())),
            hidden_for=tuple(hidden.get(message_id, ())),
            deleted_upstream_at=_maybe_utc(deleted),
            deleted_by_rule=rule,
            account_last_listed=_maybe_utc(listed),
        )
        for message_id, upstream, upstream_user, uid, size, first, last, deleted, rule, listed in (
            rows
        )
    ]


def _prune_batch(conn: psycopg.Connection[Any], cutoff: datetime) -> int:
    with conn.transaction():
        # The SQL form of StoredMessage.is_gone, stated twice: once to pick the batch,
        # once on the joined rows, which PostgreSQL re-checks against a row a concurrent
        # record changed (a UIDL listed again is no longer gone and stays).
        cursor = conn.execute(
            "DELETE FROM messages AS m USING accounts AS a"
            " WHERE m.id IN (SELECT m2.id FROM messages AS m2"
            " JOIN accounts AS a2 ON a2.id = m2.account_id"
            " WHERE m2.last_seen < %(cutoff)s AND m2.last_seen < a2.last_listed LIMIT %(batch)s)"
            " AND a.id = m.account_id AND m.last_seen < %(cutoff)s"
            " AND m.last_seen < a.last_listed",
            {"cutoff": cutoff, "batch": PRUNE_BATCH},
        )
        return cursor.rowcount
