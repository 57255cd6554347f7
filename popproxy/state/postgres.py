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
    AuditAction,
    AuditEntry,
    AuditQuery,
    Disposal,
    FetchFacts,
    FetchState,
    MessageFacts,
    PollSummary,
    SeenMessage,
    SessionRecord,
    SourceKey,
    SourceStatus,
    StagedMessage,
    StateError,
    StoredMessage,
)
from popproxy.state.checks import (
    MAX_LISTED_MESSAGES,
    MAX_USER_OCTETS,
    PRUNE_BATCH,
    check_account,
    check_audit_query,
    check_aware,
    check_disposals,
    check_listing,
    check_login_source,
    check_record,
    check_source,
    check_text,
    check_uids,
    gateway_audit,
    split_listing,
)
from popproxy.state.pg_schema import MIGRATIONS, Migration, check_readable, migrate
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
        read_only: bool = False,
    ) -> None:
        """Use ``open_postgres``; this only builds the (not yet open) pool."""
        self._read_only = read_only
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

    # -- the GatewayStore protocol -----------------------------------------------------

    async def gateway_listing(
        self, source: SourceKey, listing: Sequence[SeenMessage], at: datetime
    ) -> Mapping[str, FetchFacts]:
        """See ``GatewayStore.gateway_listing``."""
        check_source(source)
        check_listing(listing)
        check_aware(at)
        return await self._run(lambda conn: _gateway_listing(conn, source, listing, at))

    async def gateway_facts(
        self, source: SourceKey, uids: Collection[str]
    ) -> Mapping[str, FetchFacts]:
        """See ``GatewayStore.gateway_facts``."""
        check_source(source)
        wanted = list(dict.fromkeys(uids))
        check_uids(wanted)
        return await self._run(lambda conn: _gateway_facts(conn, source, wanted))

    async def gateway_staged(self, source: SourceKey) -> Sequence[FetchFacts]:
        """See ``GatewayStore.gateway_staged``."""
        check_source(source)
        return await self._run(lambda conn: _gateway_staged(conn, source))

    async def gateway_stage(
        self, source: SourceKey, staged: Sequence[StagedMessage], at: datetime
    ) -> None:
        """See ``GatewayStore.gateway_stage``."""
        check_source(source)
        check_aware(at)
        moves = [_Move("staged", m.file_name, m.uid, m.size, "listed") for m in staged]
        await self._run(lambda conn: _gateway_transition(conn, source, moves, at))

    async def gateway_settle(
        self,
        source: SourceKey,
        delivered: Collection[str],
        returned: Collection[str],
        at: datetime,
    ) -> None:
        """See ``GatewayStore.gateway_settle``."""
        check_source(source)
        check_aware(at)
        moves = [_Move("delivered", None, uid, None, "staged") for uid in delivered]
        moves += [_Move("listed", None, uid, None, "staged") for uid in returned]
        await self._run(lambda conn: _gateway_transition(conn, source, moves, at))

    async def gateway_deleted(
        self, source: SourceKey, deleted: Sequence[Disposal], at: datetime, *, session_id: str
    ) -> None:
        """See ``GatewayStore.gateway_deleted``."""
        check_source(source)
        check_disposals(deleted, session_id)
        check_aware(at)
        await self._run(lambda conn: _gateway_deleted(conn, source, deleted, at, session_id))

    async def gateway_poll_finished(self, source: SourceKey, summary: PollSummary) -> None:
        """See ``GatewayStore.gateway_poll_finished``."""
        check_source(source)
        check_aware(summary.at)
        await self._run(lambda conn: _gateway_poll_finished(conn, source, summary))

    async def gateway_sources(self) -> Sequence[SourceStatus]:
        """See ``GatewayStore.gateway_sources``."""
        return await self._run(_gateway_sources)

    async def known_source(self, user: str, source: str, since: datetime) -> datetime | None:
        """When ``user`` last logged in from ``source``, if at or after ``since``."""
        check_login_source(user, source)
        check_aware(since)
        return await self._run(lambda conn: _known_source(conn, user, source, since))

    async def remember_source(
        self, user: str, source: str, at: datetime, *, keep: int, forget_before: datetime
    ) -> None:
        """Record a login of ``user`` from ``source``; keep the ``keep`` latest (one
        transaction; the user's rows are locked by the upsert's row, then trimmed)."""
        check_login_source(user, source, keep)
        check_aware(at)
        check_aware(forget_before)
        await self._run(
            lambda conn: _remember_source(conn, user, source, at, keep=keep, cutoff=forget_before)
        )

    async def audit(self, query: AuditQuery) -> Sequence[AuditEntry]:
        """The audit rows ``query`` selects, newest first (``StateStore.audit``)."""
        check_audit_query(query)
        return await self._run(lambda conn: _audit(conn, query))

    async def trim_audit(self, before: datetime, *, dry_run: bool = False) -> int:
        """Delete audit rows older than ``before``, ``PRUNE_BATCH`` rows a transaction
        (with ``dry_run``, count them)."""
        check_aware(before)
        if dry_run:
            return await self._run(lambda conn: _count_audit(conn, before))
        total = 0
        while True:  # ends: each pass deletes at least one row or stops
            deleted = await self._run(lambda conn: _trim_audit_batch(conn, before))
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
                if self._read_only:
                    check_readable(conn, self._migrations)
                else:
                    migrate(conn, self._migrations)
        except psycopg.Error as exc:
            raise StateError(
                f"cannot open the state store {self._target.describe()}: {first_line(exc)}"
            ) from exc

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
        append_audit(
            conn,
            [
                AuditEntry(
                    at=at,
                    session_id=record.session_id,
                    user=record.user,
                    account=record.account,
                    uid=d.uid,
                    size=sizes[d.uid],
                    rule=d.rule,
                    action=action,
                )
                for action, items in (
                    (AuditAction.HIDE, record.hidden),
                    (AuditAction.DELETE_UPSTREAM, record.deleted_upstream),
                )
                for d in items
            ],
            account_ids={record.account: account_id},
        )


def append_audit(
    conn: psycopg.Connection[Any],
    entries: Sequence[AuditEntry],
    *,
    account_ids: Mapping[AccountKey, int] | None = None,
) -> None:
    """Add ``entries`` to the audit log (table ``disposals``) in the caller's open
    transaction, in their order; creates an account row a row names if missing
    (``account_ids``: ids the caller already holds).

    Every writer of a hide or an upstream deletion calls this in the transaction that
    records it: a session's QUIT (``record``), and a gateway poll's deletions.
    """
    if not entries:
        return
    ids = dict(account_ids or {})
    for account in {e.account for e in entries} - set(ids):
        conn.execute(
            "INSERT INTO accounts (upstream, upstream_user) VALUES (%s, %s)"
            " ON CONFLICT (upstream, upstream_user) DO NOTHING",
            (account.upstream, account.upstream_user),
        )
        row = conn.execute(
            "SELECT id FROM accounts WHERE upstream = %s AND upstream_user = %s",
            (account.upstream, account.upstream_user),
        ).fetchone()
        assert row is not None  # inserted above, and accounts rows are never deleted
        ids[account] = int(row[0])
    conn.execute(
        "INSERT INTO disposals (local_user, at, session_id, account_id, uid, size, action,"
        " rule) SELECT t.local_user, t.at, t.session_id, t.account_id, t.uid, t.size,"
        " t.action, t.rule FROM unnest(%(users)s::text[], %(ats)s::timestamptz[],"
        " %(sessions)s::text[], %(accounts)s::bigint[], %(uids)s::text[],"
        " %(sizes)s::bigint[], %(actions)s::text[], %(rules)s::text[]) WITH ORDINALITY"
        " AS t (local_user, at, session_id, account_id, uid, size, action, rule, n)"
        " ORDER BY t.n",
        {
            "users": [e.user for e in entries],
            "ats": [e.at for e in entries],
            "sessions": [e.session_id for e in entries],
            "accounts": [ids[e.account] for e in entries],
            "uids": [e.uid for e in entries],
            "sizes": [e.size for e in entries],
            "actions": [e.action.value for e in entries],
            "rules": [e.rule for e in entries],
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
        deleted = cursor.rowcount
        # The gateway's rows the same way; a staged row is never forgotten (its file
        # is still to be settled by the next poll).
        cursor = conn.execute(
            "DELETE FROM gateway_messages AS m USING gateway_sources AS s"
            " WHERE (m.source_id, m.uid) IN (SELECT m2.source_id, m2.uid"
            " FROM gateway_messages AS m2 JOIN gateway_sources AS s2 ON s2.id = m2.source_id"
            " WHERE m2.last_seen < %(cutoff)s AND m2.last_seen < s2.last_listed"
            " AND m2.state != 'staged' LIMIT %(batch)s)"
            " AND s.id = m.source_id AND m.last_seen < %(cutoff)s"
            " AND m.last_seen < s.last_listed AND m.state != 'staged'",
            {"cutoff": cutoff, "batch": max(0, PRUNE_BATCH - deleted)},
        )
        return deleted + cursor.rowcount


# -- the gateway's facts ------------------------------------------------------------------

_FACT_COLUMNS = "uid, size, first_seen, state, file_name, deleted_upstream_at"


@dataclass(frozen=True, slots=True)
class _Move:
    """One state change of a gateway message: to ``state`` (with a file name, or None
    to keep it) from ``before``; ``size`` None matches any size."""

    state: str
    file_name: str | None
    uid: str
    size: int | None
    before: str


def _fetch_facts(row: Sequence[Any]) -> FetchFacts:
    uid, size, first, state, name, deleted = row
    return FetchFacts(
        uid=uid,
        size=size,
        first_seen=_utc(first),
        state=FetchState(state),
        file_name=name,
        deleted_upstream_at=_maybe_utc(deleted),
    )


def _source_id(conn: psycopg.Connection[Any], source: SourceKey) -> int | None:
    row = conn.execute(
        "SELECT id FROM gateway_sources"
        " WHERE local_user = %s AND upstream = %s AND upstream_user = %s",
        (source.user, source.upstream, source.upstream_user),
    ).fetchone()
    return None if row is None else int(row[0])


def _upsert_source(conn: psycopg.Connection[Any], source: SourceKey) -> int:
    """The source's id, created if new; holds its row lock until COMMIT, so the writes
    of one source (from any process) apply one after another."""
    row = conn.execute(
        "INSERT INTO gateway_sources (local_user, upstream, upstream_user)"
        " VALUES (%s, %s, %s) ON CONFLICT (local_user, upstream, upstream_user)"
        " DO UPDATE SET local_user = excluded.local_user RETURNING id",
        (source.user, source.upstream, source.upstream_user),
    ).fetchone()
    assert row is not None  # RETURNING of an upsert always has its row
    return int(row[0])


def _gateway_listing(
    conn: psycopg.Connection[Any],
    source: SourceKey,
    listing: Sequence[SeenMessage],
    at: datetime,
) -> dict[str, FetchFacts]:
    sizes = {m.uid: m.size for m in listing}
    uids = list(sizes)
    with conn.transaction():
        source_id = _upsert_source(conn, source)
        conn.execute(
            "UPDATE gateway_sources SET last_listed = greatest(last_listed, %s) WHERE id = %s",
            (at, source_id),
        )
        # Another size under a known UIDL: new content (RFC 1939 §7), history dropped.
        conn.execute(
            "DELETE FROM gateway_messages AS m"
            " USING unnest(%(uids)s::text[], %(sizes)s::bigint[]) AS t (uid, size)"
            " WHERE m.source_id = %(source)s AND m.uid = t.uid AND m.size != t.size"
            " AND m.state != 'staged'",
            {"source": source_id, "uids": uids, "sizes": [sizes[u] for u in uids]},
        )
        conn.execute(
            "INSERT INTO gateway_messages"
            " (source_id, uid, size, first_seen, last_seen, state, state_at)"
            " SELECT %(source)s, t.uid, t.size, %(at)s, %(at)s, 'listed', %(at)s"
            " FROM unnest(%(uids)s::text[], %(sizes)s::bigint[]) AS t (uid, size)"
            " ON CONFLICT (source_id, uid) DO UPDATE SET"
            " last_seen = greatest(gateway_messages.last_seen, excluded.last_seen)",
            {"source": source_id, "at": at, "uids": uids, "sizes": [sizes[u] for u in uids]},
        )
        rows = conn.execute(
            f"SELECT {_FACT_COLUMNS} FROM gateway_messages"
            " WHERE source_id = %s AND uid = ANY(%s::text[])",
            (source_id, uids),
        ).fetchall()
    return {row[0]: _fetch_facts(row) for row in rows}


def _gateway_facts(
    conn: psycopg.Connection[Any], source: SourceKey, uids: list[str]
) -> dict[str, FetchFacts]:
    rows = conn.execute(  # one statement: one snapshot
        "SELECT m.uid, m.size, m.first_seen, m.state, m.file_name, m.deleted_upstream_at"
        " FROM gateway_messages AS m JOIN gateway_sources AS s ON s.id = m.source_id"
        " WHERE s.local_user = %s AND s.upstream = %s AND s.upstream_user = %s"
        " AND m.uid = ANY(%s::text[])",
        (source.user, source.upstream, source.upstream_user, uids),
    ).fetchall()
    return {row[0]: _fetch_facts(row) for row in rows}


def _gateway_staged(conn: psycopg.Connection[Any], source: SourceKey) -> list[FetchFacts]:
    rows = conn.execute(
        f"SELECT {_FACT_COLUMNS} FROM gateway_messages AS m"
        " JOIN gateway_sources AS s ON s.id = m.source_id"
        " WHERE s.local_user = %s AND s.upstream = %s AND s.upstream_user = %s"
        " AND m.state = 'staged' ORDER BY m.uid",
        (source.user, source.upstream, source.upstream_user),
    ).fetchall()
    return [_fetch_facts(row) for row in rows]


def _gateway_transition(
    conn: psycopg.Connection[Any], source: SourceKey, moves: Sequence[_Move], at: datetime
) -> None:
    """Apply ``moves`` in one transaction; a row not in its ``before`` state is a
    caller's bug, and then nothing is changed."""
    with conn.transaction():
        source_id = _upsert_source(conn, source)
        for move in moves:
            cursor = conn.execute(
                "UPDATE gateway_messages SET state = %s, file_name = coalesce(%s, file_name),"
                " state_at = %s WHERE source_id = %s AND uid = %s"
                " AND size = coalesce(%s, size) AND state = %s",
                (move.state, move.file_name, at, source_id, move.uid, move.size, move.before),
            )
            if cursor.rowcount != 1:
                raise StateError(f"gateway message not {move.before}: cannot make it {move.state}")


def _gateway_deleted(
    conn: psycopg.Connection[Any],
    source: SourceKey,
    deleted: Sequence[Disposal],
    at: datetime,
    session_id: str,
) -> None:
    with conn.transaction():
        source_id = _upsert_source(conn, source)
        conn.execute(
            "UPDATE gateway_messages AS m SET deleted_upstream_at = %(at)s,"
            " deleted_by_rule = t.rule"
            " FROM unnest(%(uids)s::text[], %(rules)s::text[]) AS t (uid, rule)"
            " WHERE m.source_id = %(source)s AND m.uid = t.uid",
            {
                "at": at,
                "source": source_id,
                "uids": [d.uid for d in deleted],
                "rules": [d.rule for d in deleted],
            },
        )
        sizes = {
            str(uid): int(size)
            for uid, size in conn.execute(
                "SELECT uid, size FROM gateway_messages"
                " WHERE source_id = %s AND uid = ANY(%s::text[])",
                (source_id, [d.uid for d in deleted]),
            )
        }
        append_audit(conn, gateway_audit(source, deleted, sizes, at, session_id))


def _gateway_poll_finished(
    conn: psycopg.Connection[Any], source: SourceKey, summary: PollSummary
) -> None:
    with conn.transaction():
        source_id = _upsert_source(conn, source)
        conn.execute(
            "UPDATE gateway_sources SET last_poll_at = %(at)s, last_result = %(result)s,"
            " last_fetched = %(fetched)s, last_skipped = %(skipped)s,"
            " last_deleted = %(deleted)s, last_fetched_bytes = %(bytes)s,"
            " last_success_at = CASE WHEN %(ok)s THEN %(at)s ELSE last_success_at END"
            " WHERE id = %(source)s",
            {
                "at": summary.at,
                "result": summary.result,
                "fetched": summary.fetched,
                "skipped": summary.skipped,
                "deleted": summary.deleted,
                "bytes": summary.fetched_bytes,
                "ok": summary.result == "ok",
                "source": source_id,
            },
        )


def _gateway_sources(conn: psycopg.Connection[Any]) -> list[SourceStatus]:
    rows = conn.execute(
        "SELECT s.local_user, s.upstream, s.upstream_user, s.last_poll_at, s.last_result,"
        " s.last_fetched, s.last_skipped, s.last_deleted, s.last_fetched_bytes,"
        " s.last_success_at,"
        " count(m.uid) FILTER (WHERE m.state != 'delivered'),"
        " count(m.uid) FILTER (WHERE m.state = 'delivered'),"
        " count(m.uid) FILTER (WHERE m.deleted_upstream_at IS NOT NULL)"
        " FROM gateway_sources AS s LEFT JOIN gateway_messages AS m ON m.source_id = s.id"
        " GROUP BY s.id ORDER BY s.local_user, s.upstream, s.upstream_user"
    ).fetchall()
    out: list[SourceStatus] = []
    for (
        user, upstream, upstream_user, poll_at, result, fetched, skipped, deleted, nbytes,
        success, listed, delivered, gone,
    ) in rows:  # fmt: skip
        last = None
        if poll_at is not None:
            last = PollSummary(_utc(poll_at), result, fetched, skipped, deleted, nbytes)
        out.append(
            SourceStatus(
                source=SourceKey(user, upstream, upstream_user),
                last_poll=last,
                last_success_at=_maybe_utc(success),
                listed=listed,
                delivered=delivered,
                deleted_upstream=gone,
            )
        )
    return out


def _known_source(
    conn: psycopg.Connection[Any], user: str, source: str, since: datetime
) -> datetime | None:
    row = conn.execute(
        "SELECT last_login FROM known_sources"
        " WHERE local_user = %s AND source = %s AND last_login >= %s",
        (user, source, since),
    ).fetchone()
    return None if row is None else _utc(row[0])


def _remember_source(
    conn: psycopg.Connection[Any],
    user: str,
    source: str,
    at: datetime,
    *,
    keep: int,
    cutoff: datetime,
) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO known_sources (local_user, source, last_login) VALUES (%s, %s, %s)"
            " ON CONFLICT (local_user, source) DO UPDATE"
            " SET last_login = greatest(known_sources.last_login, excluded.last_login)",
            (user, source, at),
        )
        conn.execute(
            "DELETE FROM known_sources WHERE local_user = %(user)s AND (last_login < %(cutoff)s"
            " OR source NOT IN (SELECT source FROM known_sources WHERE local_user = %(user)s"
            " ORDER BY last_login DESC, source LIMIT %(keep)s))",
            {"user": user, "cutoff": cutoff, "keep": keep},
        )


# -- the audit log -------------------------------------------------------------------------


def _audit(conn: psycopg.Connection[Any], query: AuditQuery) -> list[AuditEntry]:
    conditions: list[str] = []
    args: list[object] = []
    for column, value in (
        ("d.local_user = %s", query.user),
        ("a.upstream = %s", query.upstream),
        ("d.rule = %s", query.rule),
        ("d.uid = %s", query.uid),
        ("d.at >= %s", query.since),
    ):
        if value is not None:
            conditions.append(column)
            args.append(value)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        rows = conn.execute(
            "SELECT d.at, d.session_id, d.local_user, a.upstream, a.upstream_user, d.uid,"
            " d.size, d.rule, d.action FROM disposals AS d"
            f" JOIN accounts AS a ON a.id = d.account_id{where}"
            " ORDER BY d.at DESC, d.id DESC LIMIT %s",
            (*args, query.limit),
        ).fetchall()
    return [
        AuditEntry(
            at=_utc(at),
            session_id=session_id,
            user=user,
            account=AccountKey(upstream, upstream_user),
            uid=uid,
            size=size,
            rule=rule,
            action=AuditAction(action),
        )
        for at, session_id, user, upstream, upstream_user, uid, size, rule, action in rows
    ]


def _count_audit(conn: psycopg.Connection[Any], cutoff: datetime) -> int:
    row = conn.execute("SELECT count(*) FROM disposals WHERE at < %s", (cutoff,)).fetchone()
    return 0 if row is None else int(row[0])


def _trim_audit_batch(conn: psycopg.Connection[Any], cutoff: datetime) -> int:
    with conn.transaction():
        cursor = conn.execute(
            "DELETE FROM disposals WHERE id IN (SELECT id FROM disposals WHERE at < %s LIMIT %s)",
            (cutoff, PRUNE_BATCH),
        )
        return cursor.rowcount
