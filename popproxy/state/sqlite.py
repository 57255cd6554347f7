"""The embedded ``StateStore``: one sqlite3 database file per popproxy instance.

Theory of operation. The file is in WAL mode with ``synchronous=FULL``, so a
committed transaction is on disk when ``record`` returns and readers never wait
for the writer. ``record`` calls that arrive while a commit is in flight are
committed together, one transaction and one fsync per group, each record in a
savepoint of its own (group commit); a QUIT whose listing equals the account's
latest one writes no message row (``_record``: lazy last_seen; docs/state.md).
Each call runs in ``trio.to_thread.run_sync`` behind a ``CapacityLimiter`` of
``SQLITE_THREADS``; a worker takes an idle connection from
a pool (at most one per limiter token), so a connection is only ever used by one
thread at a time, as sqlite's threading rules ask. Writers take the database lock
at ``BEGIN IMMEDIATE`` and wait up to ``busy_timeout_seconds`` for another writer
(another task or another process on the same file).

At open, ``PRAGMA user_version`` names the schema version and ``MIGRATIONS``
brings an older file up to date in one transaction; a file from a newer popproxy
or from another program is refused. Times are stored as UTC ISO 8601 text with
microseconds, so they sort as text and read well in the ``sqlite3`` shell.

A UIDL listed with a size other than the stored one is new content under a reused
UIDL (RFC 1939 §7 lets a server reuse a unique-id once the old message is gone):
the store forgets the old content's first-seen time, retrievals, hides and
upstream deletion, so no old history can hide or expire the new message
(DESIGN.md, invariant 3). The audit log (``disposals``) keeps every hide and
upstream deletion with the size it applied to, across reuse and pruning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import queue
import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import trio

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
from popproxy.state.workers import Workers

# Worker threads (and so connections) per store: sqlite runs one writer at a time
# and readers beside it in WAL mode; a few threads keep logins' reads off the
# writer's queue without tying up trio's thread pool on a small machine.
SQLITE_THREADS = 4
# UIDLs per ``IN (...)`` query; far below SQLITE_MAX_VARIABLE_NUMBER (32766 since 3.32).
QUERY_CHUNK = 500
# Lines of ``PRAGMA integrity_check`` quoted in the error when the check fails.
MAX_INTEGRITY_LINES = 5

# From this many UIDLs on, facts and record read all of the account's rows in one scan
# and pick the wanted ones here, instead of one ``IN (...)`` query per QUERY_CHUNK.
WHOLE_ACCOUNT_FROM = 8 * QUERY_CHUNK
# The last_seen of a message row in SQL (lazy last_seen, see ``_record``).
EFFECTIVE_LAST_SEEN = (
    "CASE WHEN m.last_seen >= a.listing_since THEN a.last_listed ELSE m.last_seen END"
)

# Stored times kept parsed: every UIDL a session first saw shares that session's time,
# so a listing of MAX_RECORD_MESSAGES has few distinct times; this bounds the cache.
PARSED_TIMES_CACHED = 4096

# "PoPx" in ASCII: marks a database file as popproxy's state (PRAGMA application_id).
APPLICATION_ID = 0x506F5078

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: the statements that take version ``version - 1`` to ``version``."""

    version: int
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        (
            """CREATE TABLE accounts (
                id INTEGER PRIMARY KEY,
                upstream TEXT NOT NULL,
                upstream_user TEXT NOT NULL,
                UNIQUE (upstream, upstream_user)
            ) STRICT""",
            # One row per UIDL an account listed; deleted_* say this content was
            # deleted upstream by a QUIT (and by which rule and session).
            """CREATE TABLE messages (
                id INTEGER PRIMARY KEY,
                account_id INTEGER NOT NULL REFERENCES accounts (id),
                uid TEXT NOT NULL,
                size INTEGER NOT NULL CHECK (size >= 0),
                first_seen TEXT NOT NULL,
                last_seen TEXT NOT NULL,
                deleted_upstream_at TEXT,
                deleted_by_rule TEXT,
                deleted_session_id TEXT,
                UNIQUE (account_id, uid)
            ) STRICT""",
            "CREATE INDEX messages_last_seen ON messages (last_seen)",
            """CREATE TABLE retrievals (
                message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
                user TEXT NOT NULL,
                at TEXT NOT NULL,
                session_id TEXT NOT NULL,
                PRIMARY KEY (message_id, user)
            ) STRICT, WITHOUT ROWID""",
            """CREATE TABLE hides (
                message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
                user TEXT NOT NULL,
                rule TEXT NOT NULL,
                at TEXT NOT NULL,
                session_id TEXT NOT NULL,
                PRIMARY KEY (message_id, user)
            ) STRICT, WITHOUT ROWID""",
            # The audit log: every hide and upstream deletion, never rewritten.
            """CREATE TABLE disposals (
                id INTEGER PRIMARY KEY,
                account_id INTEGER NOT NULL REFERENCES accounts (id),
                uid TEXT NOT NULL,
                size INTEGER NOT NULL,
                action TEXT NOT NULL CHECK (action IN ('hide', 'delete_upstream')),
                user TEXT NOT NULL,
                rule TEXT NOT NULL,
                at TEXT NOT NULL,
                session_id TEXT NOT NULL
            ) STRICT""",
            "CREATE INDEX disposals_account_uid ON disposals (account_id, uid)",
        ),
    ),
    # When each account was last listed, so prune forgets only UIDLs missing from a
    # later listing, never those of an account nobody logged in to for a while.
    Migration(
        2,
        (
            "ALTER TABLE accounts ADD COLUMN last_listed TEXT",
            "UPDATE accounts SET last_listed ="
            " (SELECT max(last_seen) FROM messages WHERE account_id = accounts.id)",
        ),
    ),
    # The gateway: per source (local user, upstream account) each listed (UIDL, size),
    # how far its delivery got (popproxy.state.base.FetchState) and its deletion
    # upstream; and each source's last poll, for `popproxy state show`.
    Migration(
        3,
        (
            """CREATE TABLE gateway_sources (
                id INTEGER PRIMARY KEY,
                user TEXT NOT NULL,
                upstream TEXT NOT NULL,
                upstream_user TEXT NOT NULL,
                last_listed TEXT,
                last_poll_at TEXT,
                last_result TEXT,
                last_fetched INTEGER,
                last_skipped INTEGER,
                last_deleted INTEGER,
                last_fetched_bytes INTEGER,
                last_success_at TEXT,
                UNIQUE (user, upstream, upstream_user)
            ) STRICT""",
            """CREATE TABLE gateway_messages (
                source_id INTEGER NOT NULL REFERENCES gateway_sources (id),
                uid TEXT NOT NULL,
                size INTEGER NOT NULL CHECK (size >= 0),
                first_seen TEXT NOT NULL,
                last_seen TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('listed', 'staged', 'delivered')),
                file_name TEXT,
                state_at TEXT NOT NULL,
                deleted_upstream_at TEXT,
                deleted_by_rule TEXT,
                PRIMARY KEY (source_id, uid)
            ) STRICT, WITHOUT ROWID""",
            "CREATE INDEX gateway_messages_state ON gateway_messages (source_id, state)",
        ),
    ),
    # The client addresses each local user lately logged in from (known-good sources,
    # spared by the user-name lockout; popproxy/known_sources.py).
    Migration(
        4,
        (
            """CREATE TABLE known_sources (
                user TEXT NOT NULL,
                source TEXT NOT NULL,
                last_login TEXT NOT NULL,
                PRIMARY KEY (user, source)
            ) STRICT, WITHOUT ROWID""",
        ),
    ),
    # A QUIT whose listing equals the account's latest one writes no message row:
    # listing_digest names that listing, and listing_since is when it was last
    # written out. A row with last_seen >= listing_since is in the latest listing and
    # was last seen at accounts.last_listed (see "Lazy last_seen" in the module text).
    Migration(
        5,
        (
            "ALTER TABLE accounts ADD COLUMN listing_digest BLOB",
            "ALTER TABLE accounts ADD COLUMN listing_since TEXT",
            "UPDATE accounts SET listing_since = last_listed",
        ),
    ),
    # The audit log by time: `popproxy audit` reads it newest first, and the trim to
    # state.audit_retention_days deletes its oldest rows.
    Migration(6, ("CREATE INDEX disposals_at ON disposals (at)",)),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def utc_text(when: datetime) -> str:
    """``when`` as stored: UTC ISO 8601 with microseconds and a Z (sorts as text)."""
    check_aware(when)
    naive = when.astimezone(UTC).replace(tzinfo=None)
    return naive.isoformat(timespec="microseconds") + "Z"


@functools.lru_cache(maxsize=PARSED_TIMES_CACHED)
def from_utc_text(text: str) -> datetime:
    """A stored time back as an aware UTC datetime (cached: one session's rows share it)."""
    return datetime.fromisoformat(text)


@dataclass(slots=True, eq=False)
class _Pending:
    """One ``record`` call waiting for a group commit (mutable: filled in by the committer)."""

    record: SessionRecord
    done: bool = False
    error: str | None = None


class SqliteStore:
    """``StateStore`` on one sqlite3 file (or ``:memory:``, one connection, for tests)."""

    def __init__(
        self,
        target: Path | None,
        *,
        busy_timeout_seconds: float,
        migrations: Sequence[Migration] = MIGRATIONS,
        read_only: bool = False,
    ) -> None:
        """Use ``open_sqlite``; this only sets fields."""
        if read_only and target is None:
            raise ValueError("a read-only store needs a file")
        self._read_only = read_only
        self._target = target
        self._busy_timeout = busy_timeout_seconds
        self._migrations = tuple(migrations)
        self._workers = Workers(SQLITE_THREADS if target is not None else 1)
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._queue: list[_Pending] = []  # records waiting for the next group commit
        self._committing: trio.Event | None = None  # set when the commit in flight ends

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
        """Write what one QUIT did in one transaction, durable (WAL, synchronous=FULL).

        Group commit: records that arrive while a commit is in flight wait for it,
        then the first of them commits all of them in one transaction (one fsync).
        Each returns only once its own transaction is committed.
        """
        check_record(record)
        pending = _Pending(record)
        self._queue.append(pending)
        try:
            while not pending.done:  # ends: each pass commits a batch or waits for one
                if self._committing is not None:
                    await self._committing.wait()
                    continue
                batch, self._queue = self._queue, []
                done = self._committing = trio.Event()
                try:
                    await self._commit(batch)
                except BaseException:
                    # Cancelled before its thread started (or a bug): the others wait on.
                    self._queue[:0] = [p for p in batch if p is not pending and not p.done]
                    raise
                finally:
                    self._committing = None
                    done.set()
        except BaseException:
            if pending in self._queue:  # cancelled while waiting: never committed
                self._queue.remove(pending)
            raise
        if pending.error is not None:
            raise StateError(pending.error)

    async def _commit(self, batch: list[_Pending]) -> None:
        """Commit ``batch`` in one transaction; mark each record done with its outcome."""
        records = [p.record for p in batch]
        try:
            outcomes = await self._run(lambda conn: _record_batch(conn, records))
            errors = [
                None if e is None else f"state store {self._describe()}: {e}" for e in outcomes
            ]
        except StateError as exc:  # BEGIN or COMMIT failed: none of them is stored
            errors = [str(exc)] * len(batch)
        for pending, error in zip(batch, errors, strict=True):
            pending.done = True
            pending.error = error

    async def messages(self, account: AccountKey | None = None) -> Sequence[StoredMessage]:
        """Every stored UIDL (of ``account``, or all), at most ``MAX_LISTED_MESSAGES``."""
        if account is not None:
            check_account(account)
        return await self._run(lambda conn: _messages(conn, account))

    async def prune(self, gone_before: datetime) -> int:
        """Forget UIDLs gone from the upstream (``StoredMessage.is_gone``), ``PRUNE_BATCH``
        rows a transaction."""
        cutoff = utc_text(gone_before)
        total = 0
        while True:  # ends: each pass deletes at least one row or stops
            deleted = await self._run(lambda conn: _prune_batch(conn, cutoff))
            total += deleted
            if deleted < PRUNE_BATCH:
                return total

    async def gateway_listing(
        self, source: SourceKey, listing: Sequence[SeenMessage], at: datetime
    ) -> Mapping[str, FetchFacts]:
        """See ``StateStore.gateway_listing``."""
        check_source(source)
        check_listing(listing)
        when = utc_text(at)
        return await self._run(lambda conn: _gateway_listing(conn, source, listing, when))

    async def gateway_facts(
        self, source: SourceKey, uids: Collection[str]
    ) -> Mapping[str, FetchFacts]:
        """See ``GatewayStore.gateway_facts``."""
        check_source(source)
        wanted = list(dict.fromkeys(uids))
        check_uids(wanted)
        return await self._run(lambda conn: _gateway_facts(conn, source, wanted))

    async def gateway_staged(self, source: SourceKey) -> Sequence[FetchFacts]:
        """See ``StateStore.gateway_staged``."""
        check_source(source)
        return await self._run(lambda conn: _gateway_staged(conn, source))

    async def gateway_stage(
        self, source: SourceKey, staged: Sequence[StagedMessage], at: datetime
    ) -> None:
        """See ``StateStore.gateway_stage``."""
        check_source(source)
        when = utc_text(at)
        rows = [("staged", m.file_name, when, m.uid, m.size, "listed") for m in staged]
        await self._run(lambda conn: _gateway_transition(conn, source, rows))

    async def gateway_settle(
        self,
        source: SourceKey,
        delivered: Collection[str],
        returned: Collection[str],
        at: datetime,
    ) -> None:
        """See ``StateStore.gateway_settle``."""
        check_source(source)
        when = utc_text(at)
        rows = [("delivered", None, when, uid, None, "staged") for uid in delivered]
        rows += [("listed", None, when, uid, None, "staged") for uid in returned]
        await self._run(lambda conn: _gateway_transition(conn, source, rows))

    async def gateway_deleted(
        self, source: SourceKey, deleted: Sequence[Disposal], at: datetime, *, session_id: str
    ) -> None:
        """See ``GatewayStore.gateway_deleted``."""
        check_source(source)
        check_disposals(deleted, session_id)
        check_aware(at)
        await self._run(lambda conn: _gateway_deleted(conn, source, deleted, at, session_id))

    async def gateway_poll_finished(self, source: SourceKey, summary: PollSummary) -> None:
        """See ``StateStore.gateway_poll_finished``."""
        check_source(source)
        utc_text(summary.at)
        await self._run(lambda conn: _gateway_poll_finished(conn, source, summary))

    async def gateway_sources(self) -> Sequence[SourceStatus]:
        """See ``StateStore.gateway_sources``."""
        return await self._run(_gateway_sources)

    async def known_source(self, user: str, source: str, since: datetime) -> datetime | None:
        """When ``user`` last logged in from ``source``, if at or after ``since``."""
        check_login_source(user, source)
        cutoff = utc_text(since)
        return await self._run(lambda conn: _known_source(conn, user, source, cutoff))

    async def remember_source(
        self, user: str, source: str, at: datetime, *, keep: int, forget_before: datetime
    ) -> None:
        """Record a login of ``user`` from ``source``; keep the ``keep`` latest (one
        transaction)."""
        check_login_source(user, source, keep)
        when, cutoff = utc_text(at), utc_text(forget_before)
        await self._run(
            lambda conn: _remember_source(conn, user, source, when, keep=keep, cutoff=cutoff)
        )

    async def audit(self, query: AuditQuery) -> Sequence[AuditEntry]:
        """The audit rows ``query`` selects, newest first (``StateStore.audit``)."""
        check_audit_query(query)
        return await self._run(lambda conn: _audit(conn, query))

    async def trim_audit(self, before: datetime, *, dry_run: bool = False) -> int:
        """Delete audit rows older than ``before``, ``PRUNE_BATCH`` rows a transaction
        (with ``dry_run``, count them)."""
        cutoff = utc_text(before)
        if dry_run:
            return await self._run(lambda conn: _count_audit(conn, cutoff))
        total = 0
        while True:  # ends: each pass deletes at least one row or stops
            deleted = await self._run(lambda conn: _trim_audit_batch(conn, cutoff))
            total += deleted
            if deleted < PRUNE_BATCH:
                return total

    async def aclose(self) -> None:
        """Wait for running calls, then close every connection."""
        await self._workers.close(self._close_idle)

    # -- opening -----------------------------------------------------------------------

    async def _open(self, *, integrity_check: bool) -> None:
        if self._read_only:
            await self._run(lambda conn: _check_version(conn, self._migrations))
            return
        await self._run(lambda conn: _prepare(conn, self._migrations, integrity_check))

    # -- threads and connections ---------------------------------------------------------

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._workers.run(functools.partial(self._in_worker, work))

    def _in_worker(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` on an idle connection (a new one if none); a worker thread."""
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            return work(conn)
        except sqlite3.Error as exc:
            raise StateError(f"state store {self._describe()}: {exc}") from exc
        finally:
            if conn.in_transaction:  # the ROLLBACK failed: do not lend it out again
                conn.close()
            else:
                self._idle.put(conn)

    def _connect(self) -> sqlite3.Connection:
        try:
            if self._target is not None and self._read_only:
                conn = sqlite3.connect(
                    self._target.absolute().as_uri() + "?mode=ro",
                    uri=True,
                    timeout=self._busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                return conn
            if self._target is not None:
                _create_private(self._target)
            conn = sqlite3.connect(
                ":memory:" if self._target is None else self._target,
                timeout=self._busy_timeout,
                isolation_level=None,  # transactions are explicit: BEGIN ... COMMIT
                check_same_thread=False,  # the pool hands a connection to one thread at a time
            )
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open the state store {self._describe()}: {exc}") from exc
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            conn.close()
            raise StateError(f"cannot open the state store {self._describe()}: {exc}") from exc
        return conn

    def _close_idle(self) -> None:
        while True:  # ends: at most SQLITE_THREADS connections exist
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            conn.close()

    def _describe(self) -> str:
        return ":memory:" if self._target is None else str(self._target)


async def open_sqlite(
    target: Path | None,
    *,
    busy_timeout_seconds: float,
    integrity_check: bool = False,
    migrations: Sequence[Migration] = MIGRATIONS,
    read_only: bool = False,
) -> SqliteStore:
    """Open (creating if needed) the store at ``target``, None for ``:memory:``.

    Sets WAL mode, applies pending ``migrations`` in one transaction and, with
    ``integrity_check``, runs ``PRAGMA integrity_check``. With ``read_only`` the file
    must exist and is opened read-only (``mode=ro``): nothing is created or migrated,
    and only reads work (``popproxy audit``). Raises ``StateError``.
    """
    store = SqliteStore(
        target,
        busy_timeout_seconds=busy_timeout_seconds,
        migrations=migrations,
        read_only=read_only,
    )
    try:
        await store._open(integrity_check=integrity_check)
    except BaseException:
        await store.aclose()
        raise
    return store


def _create_private(path: Path) -> None:
    """Create ``path`` mode 0600 if missing (it names users and their mail's UIDLs);
    sqlite gives its -wal and -shm files the same mode."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


# -- the work, in a worker thread --------------------------------------------------------


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, *, write: bool) -> Iterator[None]:
    """One transaction: IMMEDIATE takes the write lock at once, so a writer never has
    to upgrade a read lock (which busy_timeout cannot wait for)."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _prepare(conn: sqlite3.Connection, migrations: Sequence[Migration], check: bool) -> None:
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "memory":
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StateError(f"the state store cannot use WAL mode (journal_mode is {mode})")
    with _transaction(conn, write=True):
        _migrate(conn, migrations)
    if check:
        rows = conn.execute("PRAGMA integrity_check").fetchmany(MAX_INTEGRITY_LINES)
        if [tuple(row) for row in rows] != [("ok",)]:
            found = "; ".join(str(row[0]) for row in rows)
            raise StateError(f"the state store failed its integrity check: {found}")


def _check_version(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
    """For a read-only open: the file is popproxy's and its schema is one this code reads
    (any version from 1, whose tables the reads need, to the latest)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id != APPLICATION_ID or version < 1:
        raise StateError("the file is not a popproxy state store")
    latest = migrations[-1].version
    if version > latest:
        raise StateError(
            f"the state store has schema version {version}, written by a newer popproxy;"
            f" this one knows up to {latest}"
        )


def _migrate(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
    """Bring the schema to the last of ``migrations``; inside the open transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    latest = migrations[-1].version
    if app_id not in (0, APPLICATION_ID) or (
        version == 0 and conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
    ):
        raise StateError("the file is not a popproxy state store")
    if version > latest:
        raise StateError(
            f"the state store has schema version {version}, written by a newer popproxy;"
            f" this one knows up to {latest}"
        )
    for migration in migrations:
        if migration.version <= version:
            continue
        for statement in migration.statements:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {migration.version:d}")
    if app_id == 0:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")


def _account_id(conn: sqlite3.Connection, account: AccountKey, *, create: bool) -> int | None:
    row = conn.execute(
        "SELECT id FROM accounts WHERE upstream = ? AND upstream_user = ?",
        (account.upstream, account.upstream_user),
    ).fetchone()
    if row is not None:
        return int(row[0])
    if not create:
        return None
    cursor = conn.execute(
        "INSERT INTO accounts (upstream, upstream_user) VALUES (?, ?)",
        (account.upstream, account.upstream_user),
    )
    return cursor.lastrowid


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), QUERY_CHUNK):
        yield items[start : start + QUERY_CHUNK]


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _account_row(
    conn: sqlite3.Connection, account: AccountKey
) -> tuple[int, str | None, str | None, bytes | None] | None:
    """(id, last_listed, listing_since, listing_digest) of ``account``, None if unknown."""
    row = conn.execute(
        "SELECT id, last_listed, listing_since, listing_digest FROM accounts"
        " WHERE upstream = ? AND upstream_user = ?",
        (account.upstream, account.upstream_user),
    ).fetchone()
    return None if row is None else (int(row[0]), row[1], row[2], row[3])


def _effective_last_seen(last_seen: str, last_listed: str | None, since: str | None) -> str:
    """A row in the account's latest listing was last seen when that listing was."""
    if since is not None and last_listed is not None and last_seen >= since:
        return last_listed
    return last_seen


def listing_digest(seen: Sequence[SeenMessage]) -> bytes:
    """What names one listing (UIDLs, sizes and their order): equal listings, equal digests."""
    text = "".join(f"{m.uid}\0{m.size}\n" for m in seen)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _whole_account(wanted: int) -> bool:
    """Whether one scan of the account's rows beats ``wanted`` UIDLs in chunks."""
    return wanted > WHOLE_ACCOUNT_FROM


def _facts(
    conn: sqlite3.Connection, account: AccountKey, user: str, uids: Sequence[str]
) -> dict[str, MessageFacts]:
    out: dict[str, MessageFacts] = {}
    with _transaction(conn, write=False):  # one snapshot for every chunk
        known = _account_row(conn, account)
        if known is None:
            return out
        account_id, last_listed, since, _ = known
        select = (
            "SELECT m.uid, m.size, m.first_seen, m.last_seen, r.at, h.user IS NOT NULL,"
            " m.deleted_upstream_at FROM messages AS m"
            " LEFT JOIN retrievals AS r ON r.message_id = m.id AND r.user = ?"
            " LEFT JOIN hides AS h ON h.message_id = m.id AND h.user = ?"
            " WHERE m.account_id = ?"
        )
        if _whole_account(len(uids)):  # a big listing: one scan, filtered here
            wanted = set(uids)
            batches: Iterator[Iterable[tuple[Any, ...]]] = iter(
                [conn.execute(select, (user, user, account_id))]
            )
        else:
            wanted = None
            batches = (
                conn.execute(
                    f"{select} AND m.uid IN ({_marks(len(chunk))})",
                    (user, user, account_id, *chunk),
                )
                for chunk in _chunks(uids)
            )
        for rows in batches:
            for uid, size, first, last, retrieved, hidden, deleted in rows:
                if wanted is not None and uid not in wanted:
                    continue
                out[uid] = MessageFacts(
                    uid=uid,
                    size=size,
                    first_seen=from_utc_text(first),
                    last_seen=from_utc_text(_effective_last_seen(last, last_listed, since)),
                    retrieved_at=None if retrieved is None else from_utc_text(retrieved),
                    hidden=bool(hidden),
                    deleted_upstream_at=None if deleted is None else from_utc_text(deleted),
                )
    return out


def _record_batch(conn: sqlite3.Connection, records: Sequence[SessionRecord]) -> list[str | None]:
    """Write ``records`` in one transaction (one fsync), each inside a savepoint so that
    one failing record leaves the others; returns each record's error text or None.
    If the COMMIT fails, sqlite3.Error propagates and none of them is stored."""
    errors: list[str | None] = []
    with _transaction(conn, write=True):
        for record in records:
            conn.execute("SAVEPOINT one_record")
            try:
                _record(conn, record)
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK TO one_record")
                errors.append(str(exc))
            else:
                errors.append(None)
            conn.execute("RELEASE one_record")
    return errors


def _record(conn: sqlite3.Connection, record: SessionRecord) -> None:
    """What one QUIT changes, inside the caller's transaction.

    Lazy last_seen: a listing equal to the account's latest (same digest) writes no
    message row, only accounts.last_listed; a different one is written out whole and
    becomes the latest (listing_since). A record older than the latest listing (a
    late commit from another process) is applied row by row as before and leaves the
    latest listing alone.
    """
    at = utc_text(record.at)
    sizes = {m.uid: m.size for m in record.seen}
    digest = listing_digest(record.seen)
    known = _account_row(conn, record.account)
    if known is None:
        cursor = conn.execute(
            "INSERT INTO accounts (upstream, upstream_user) VALUES (?, ?)",
            (record.account.upstream, record.account.upstream_user),
        )
        assert cursor.lastrowid is not None  # an INSERT always sets it
        known = (cursor.lastrowid, None, None, None)
    account_id, last_listed, since, stored_digest = known
    newest = last_listed is None or at >= last_listed
    if newest and stored_digest == digest:
        stale: set[str] = set()  # the same listing: every row is current, none rewritten
        conn.execute("UPDATE accounts SET last_listed = ? WHERE id = ?", (at, account_id))
    else:
        if since is not None and last_listed is not None and since < last_listed:
            # The latest listing's rows were last seen at last_listed, not at their
            # stored last_seen: write that out first, so that a row this record does
            # not list keeps its true last_seen and one only this (late) record lists
            # is not taken for a row of the latest listing.
            conn.execute(
                "UPDATE messages SET last_seen = ?"
                " WHERE account_id = ? AND last_seen >= ? AND last_seen < ?",
                (last_listed, account_id, since, last_listed),
            )
            conn.execute(
                "UPDATE accounts SET listing_since = last_listed WHERE id = ?", (account_id,)
            )
            since = last_listed
        stale = _apply_listing(conn, account_id, sizes, at, last_listed=last_listed, since=since)
        if newest:
            conn.execute(
                "UPDATE accounts SET last_listed = ?, listing_since = ?, listing_digest = ?"
                " WHERE id = ?",
                (at, at, digest, account_id),
            )
    current = set(sizes) - stale
    who = (record.user, at, record.session_id)
    if record.retrieved:
        conn.executemany(
            "INSERT INTO retrievals (message_id, user, at, session_id)"
            " SELECT id, ?, ?, ? FROM messages WHERE account_id = ? AND uid = ?"
            " ON CONFLICT DO NOTHING",  # the first complete RETR is the one kept
            [(*who, account_id, uid) for uid in sorted(record.retrieved & current)],
        )
    if record.hidden:
        conn.executemany(
            "INSERT INTO hides (message_id, user, at, session_id, rule)"
            " SELECT id, ?, ?, ?, ? FROM messages WHERE account_id = ? AND uid = ?"
            " ON CONFLICT DO NOTHING",  # hidden for good since the first hide
            [(*who, d.rule, account_id, d.uid) for d in record.hidden if d.uid in current],
        )
    if record.deleted_upstream:
        conn.executemany(
            "UPDATE messages SET deleted_upstream_at = ?, deleted_session_id = ?,"
            " deleted_by_rule = ? WHERE account_id = ? AND uid = ?",
            [
                (at, record.session_id, d.rule, account_id, d.uid)
                for d in record.deleted_upstream
                if d.uid in current
            ],
        )
    if record.hidden or record.deleted_upstream:
        append_audit(
            conn,
            [
                AuditEntry(
                    at=record.at,
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
        )


def append_audit(conn: sqlite3.Connection, entries: Sequence[AuditEntry]) -> None:
    """Add ``entries`` to the audit log (table ``disposals``) in the caller's open write
    transaction, in their order; creates an account row a row names if missing.

    Every writer of a hide or an upstream deletion calls this in the transaction that
    records it: a session's QUIT (``record``), and a gateway poll's deletions.
    """
    ids: dict[AccountKey, int | None] = {}
    for e in entries:
        if e.account not in ids:
            ids[e.account] = _account_id(conn, e.account, create=True)
    conn.executemany(
        "INSERT INTO disposals (user, at, session_id, account_id, uid, size, action, rule)"
        " VALUES (:user, :at, :session, :account, :uid, :size, :action, :rule)",
        [
            {
                "user": e.user,
                "at": utc_text(e.at),
                "session": e.session_id,
                "account": ids[e.account],
                "uid": e.uid,
                "size": e.size,
                "action": e.action.value,
                "rule": e.rule,
            }
            for e in entries
        ],
    )


def _apply_listing(
    conn: sqlite3.Connection,
    account_id: int,
    sizes: Mapping[str, int],
    at: str,
    *,
    last_listed: str | None,
    since: str | None,
) -> set[str]:
    """Upsert the session's listing; return the UIDLs whose stored content is newer.

    Same size: ``first_seen`` takes the earlier, ``last_seen`` the later time (so
    commits out of order agree). Other size: new content under a reused UIDL, which
    replaces the stored row (and its history) unless the store saw the other content
    later than ``at``; such stale UIDLs are returned and left alone. A row of the
    latest listing counts as seen at ``last_listed`` (lazy last_seen).
    """
    stored: dict[str, tuple[int, str]] = {}
    if _whole_account(len(sizes)):
        rows: Iterable[tuple[Any, ...]] = conn.execute(
            "SELECT uid, size, last_seen FROM messages WHERE account_id = ?", (account_id,)
        )
        stored.update((uid, (size, last)) for uid, size, last in rows if uid in sizes)
    else:
        for chunk in _chunks(list(sizes)):
            rows = conn.execute(
                "SELECT uid, size, last_seen FROM messages"
                f" WHERE account_id = ? AND uid IN ({_marks(len(chunk))})",
                (account_id, *chunk),
            )
            stored.update((uid, (size, last)) for uid, size, last in rows)
    stale, reused = split_listing(
        sizes,
        {
            uid: (size, _effective_last_seen(last, last_listed, since) > at)
            for uid, (size, last) in stored.items()
        },
    )
    conn.executemany(
        "DELETE FROM messages WHERE account_id = ? AND uid = ?",
        [(account_id, uid) for uid in reused],
    )
    conn.executemany(
        "INSERT INTO messages (account_id, uid, size, first_seen, last_seen)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id, uid) DO UPDATE SET"
        " first_seen = min(first_seen, excluded.first_seen),"
        " last_seen = max(last_seen, excluded.last_seen)",
        [(account_id, uid, size, at, at) for uid, size in sizes.items() if uid not in stale],
    )
    return stale


def _messages(conn: sqlite3.Connection, account: AccountKey | None) -> list[StoredMessage]:
    where = ""
    args: tuple[int, ...] = ()
    with _transaction(conn, write=False):
        if account is not None:
            account_id = _account_id(conn, account, create=False)
            if account_id is None:
                return []
            where, args = " WHERE m.account_id = ?", (account_id,)
        rows = conn.execute(
            "SELECT m.id, a.upstream, a.upstream_user, m.uid, m.size, m.first_seen,"
            f" {EFFECTIVE_LAST_SEEN}, m.deleted_upstream_at, m.deleted_by_rule, a.last_listed"
            " FROM messages AS m JOIN accounts AS a ON a.id = m.account_id"
            f"{where} ORDER BY a.upstream, a.upstream_user, m.first_seen, m.uid LIMIT ?",
            (*args, MAX_LISTED_MESSAGES + 1),
        ).fetchall()
        if len(rows) > MAX_LISTED_MESSAGES:
            raise StateError(
                f"more than {MAX_LISTED_MESSAGES} stored messages; show one account at a time"
            )
        retrieved: dict[int, list[tuple[str, datetime]]] = {}
        hidden: dict[int, list[tuple[str, str, datetime]]] = {}
        join = " JOIN messages AS m ON m.id = x.message_id"
        for message_id, user, when in conn.execute(
            f"SELECT x.message_id, x.user, x.at FROM retrievals AS x{join}{where}"
            " ORDER BY x.at, x.user",
            args,
        ):
            retrieved.setdefault(message_id, []).append((user, from_utc_text(when)))
        for message_id, user, rule, when in conn.execute(
            f"SELECT x.message_id, x.user, x.rule, x.at FROM hides AS x{join}{where}"
            " ORDER BY x.at, x.user",
            args,
        ):
            hidden.setdefault(message_id, []).append((user, rule, from_utc_text(when)))
    return [
        StoredMessage(
            account=AccountKey(upstream, upstream_user),
            uid=uid,
            size=size,
            first_seen=from_utc_text(first),
            last_seen=from_utc_text(last),
            retrieved_by=tuple(retrieved.get(message_id, ())),
            hidden_for=tuple(hidden.get(message_id, ())),
            deleted_upstream_at=None if deleted is None else from_utc_text(deleted),
            deleted_by_rule=rule,
            account_last_listed=from_utc_text(listed),
        )
        for message_id, upstream, upstream_user, uid, size, first, last, deleted, rule, listed in (
            rows
        )
    ]


def _prune_batch(conn: sqlite3.Connection, cutoff: str) -> int:
    with _transaction(conn, write=True):
        cursor = conn.execute(  # the SQL form of StoredMessage.is_gone
            "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages AS m"
            " JOIN accounts AS a ON a.id = m.account_id"
            " WHERE m.last_seen < ? AND m.last_seen < a.listing_since LIMIT ?)",
            (cutoff, PRUNE_BATCH),
        )
        deleted = cursor.rowcount
        # The gateway's rows the same way; a STAGED row is never forgotten (its file
        # is still to be settled by the next poll).
        cursor = conn.execute(
            "DELETE FROM gateway_messages WHERE (source_id, uid) IN"
            " (SELECT m.source_id, m.uid FROM gateway_messages AS m"
            " JOIN gateway_sources AS s ON s.id = m.source_id"
            " WHERE m.last_seen < ? AND m.last_seen < s.last_listed AND m.state != 'staged'"
            " LIMIT ?)",
            (cutoff, max(0, PRUNE_BATCH - deleted)),
        )
        return deleted + cursor.rowcount


# -- the gateway's facts ------------------------------------------------------------------


def _source_id(conn: sqlite3.Connection, source: SourceKey, *, create: bool) -> int | None:
    key = (source.user, source.upstream, source.upstream_user)
    row = conn.execute(
        "SELECT id FROM gateway_sources WHERE user = ? AND upstream = ? AND upstream_user = ?",
        key,
    ).fetchone()
    if row is not None:
        return int(row[0])
    if not create:
        return None
    cursor = conn.execute(
        "INSERT INTO gateway_sources (user, upstream, upstream_user) VALUES (?, ?, ?)", key
    )
    return cursor.lastrowid


def _fetch_facts(row: Sequence[object]) -> FetchFacts:
    uid, size, first, state, name, deleted = row
    assert isinstance(uid, str) and isinstance(size, int) and isinstance(first, str)
    assert isinstance(state, str) and (name is None or isinstance(name, str))
    assert deleted is None or isinstance(deleted, str)
    return FetchFacts(
        uid=uid,
        size=size,
        first_seen=from_utc_text(first),
        state=FetchState(state),
        file_name=name,
        deleted_upstream_at=None if deleted is None else from_utc_text(deleted),
    )


_FACT_COLUMNS = "uid, size, first_seen, state, file_name, deleted_upstream_at"


def _gateway_listing(
    conn: sqlite3.Connection, source: SourceKey, listing: Sequence[SeenMessage], at: str
) -> dict[str, FetchFacts]:
    sizes = {m.uid: m.size for m in listing}
    with _transaction(conn, write=True):
        source_id = _source_id(conn, source, create=True)
        conn.execute(
            "UPDATE gateway_sources SET last_listed = max(coalesce(last_listed, ?), ?)"
            " WHERE id = ?",
            (at, at, source_id),
        )
        stored: dict[str, int] = {}
        for chunk in _chunks(list(sizes)):
            rows = conn.execute(
                "SELECT uid, size FROM gateway_messages"
                f" WHERE source_id = ? AND uid IN ({_marks(len(chunk))})",
                (source_id, *chunk),
            )
            stored.update((uid, size) for uid, size in rows)
        # Another size under a known UIDL: new content (RFC 1939 §7), history dropped.
        conn.executemany(
            "DELETE FROM gateway_messages WHERE source_id = ? AND uid = ? AND state != 'staged'",
            [(source_id, uid) for uid, size in sizes.items() if stored.get(uid, size) != size],
        )
        conn.executemany(
            "INSERT INTO gateway_messages"
            " (source_id, uid, size, first_seen, last_seen, state, state_at)"
            " VALUES (?, ?, ?, ?, ?, 'listed', ?)"
            " ON CONFLICT (source_id, uid) DO UPDATE SET last_seen = excluded.last_seen",
            [(source_id, uid, size, at, at, at) for uid, size in sizes.items()],
        )
        out: dict[str, FetchFacts] = {}
        for chunk in _chunks(list(sizes)):
            for row in conn.execute(
                f"SELECT {_FACT_COLUMNS} FROM gateway_messages"
                f" WHERE source_id = ? AND uid IN ({_marks(len(chunk))})",
                (source_id, *chunk),
            ):
                out[row[0]] = _fetch_facts(row)
    return out


def _gateway_facts(
    conn: sqlite3.Connection, source: SourceKey, uids: Sequence[str]
) -> dict[str, FetchFacts]:
    out: dict[str, FetchFacts] = {}
    with _transaction(conn, write=False):  # one snapshot for every chunk
        source_id = _source_id(conn, source, create=False)
        if source_id is None:
            return out
        for chunk in _chunks(uids):
            for row in conn.execute(
                f"SELECT {_FACT_COLUMNS} FROM gateway_messages"
                f" WHERE source_id = ? AND uid IN ({_marks(len(chunk))})",
                (source_id, *chunk),
            ):
                out[row[0]] = _fetch_facts(row)
    return out


def _gateway_staged(conn: sqlite3.Connection, source: SourceKey) -> list[FetchFacts]:
    with _transaction(conn, write=False):
        source_id = _source_id(conn, source, create=False)
        if source_id is None:
            return []
        rows = conn.execute(
            f"SELECT {_FACT_COLUMNS} FROM gateway_messages"
            " WHERE source_id = ? AND state = 'staged' ORDER BY uid",
            (source_id,),
        ).fetchall()
    return [_fetch_facts(row) for row in rows]


def _gateway_transition(
    conn: sqlite3.Connection,
    source: SourceKey,
    rows: Sequence[tuple[str, str | None, str, str, int | None, str]],
) -> None:
    """Move rows (new state, file name or None to keep it, at, uid, size or None, from
    state) in one transaction; a row not in the from state is a caller's bug."""
    with _transaction(conn, write=True):
        source_id = _source_id(conn, source, create=False)
        for state, name, at, uid, size, before in rows:
            cursor = conn.execute(
                "UPDATE gateway_messages SET state = ?, file_name = coalesce(?, file_name),"
                " state_at = ? WHERE source_id = ? AND uid = ? AND size = coalesce(?, size)"
                " AND state = ?",
                (state, name, at, source_id, uid, size, before),
            )
            if cursor.rowcount != 1:
                raise StateError(f"gateway message not {before}: cannot make it {state}")


def _gateway_deleted(
    conn: sqlite3.Connection,
    source: SourceKey,
    deleted: Sequence[Disposal],
    at: datetime,
    session_id: str,
) -> None:
    when = utc_text(at)
    with _transaction(conn, write=True):
        source_id = _source_id(conn, source, create=False)
        conn.executemany(
            "UPDATE gateway_messages SET deleted_upstream_at = ?, deleted_by_rule = ?"
            " WHERE source_id = ? AND uid = ?",
            [(when, d.rule, source_id, d.uid) for d in deleted],
        )
        sizes: dict[str, int] = {}
        for chunk in _chunks([d.uid for d in deleted]):
            rows = conn.execute(
                "SELECT uid, size FROM gateway_messages"
                f" WHERE source_id = ? AND uid IN ({_marks(len(chunk))})",
                (source_id, *chunk),
            )
            sizes.update((uid, size) for uid, size in rows)
        append_audit(conn, gateway_audit(source, deleted, sizes, at, session_id))


def _gateway_poll_finished(
    conn: sqlite3.Connection, source: SourceKey, summary: PollSummary
) -> None:
    at = utc_text(summary.at)
    with _transaction(conn, write=True):
        source_id = _source_id(conn, source, create=True)
        conn.execute(
            "UPDATE gateway_sources SET last_poll_at = ?, last_result = ?, last_fetched = ?,"
            " last_skipped = ?, last_deleted = ?, last_fetched_bytes = ?,"
            " last_success_at = CASE WHEN ? THEN ? ELSE last_success_at END WHERE id = ?",
            (
                at,
                summary.result,
                summary.fetched,
                summary.skipped,
                summary.deleted,
                summary.fetched_bytes,
                summary.result == "ok",
                at,
                source_id,
            ),
        )


def _gateway_sources(conn: sqlite3.Connection) -> list[SourceStatus]:
    with _transaction(conn, write=False):
        rows = conn.execute(
            "SELECT s.user, s.upstream, s.upstream_user, s.last_poll_at, s.last_result,"
            " s.last_fetched, s.last_skipped, s.last_deleted, s.last_fetched_bytes,"
            " s.last_success_at,"
            " (SELECT count(*) FROM gateway_messages AS m"
            "  WHERE m.source_id = s.id AND m.state != 'delivered'),"
            " (SELECT count(*) FROM gateway_messages AS m"
            "  WHERE m.source_id = s.id AND m.state = 'delivered'),"
            " (SELECT count(*) FROM gateway_messages AS m"
            "  WHERE m.source_id = s.id AND m.deleted_upstream_at IS NOT NULL)"
            " FROM gateway_sources AS s ORDER BY s.user, s.upstream, s.upstream_user"
        ).fetchall()
    out: list[SourceStatus] = []
    for (
        user, upstream, upstream_user, poll_at, result, fetched, skipped, deleted, nbytes,
        success, listed, delivered, gone,
    ) in rows:  # fmt: skip
        last = None
        if poll_at is not None:
            last = PollSummary(from_utc_text(poll_at), result, fetched, skipped, deleted, nbytes)
        out.append(
            SourceStatus(
                source=SourceKey(user, upstream, upstream_user),
                last_poll=last,
                last_success_at=None if success is None else from_utc_text(success),
                listed=listed,
                delivered=delivered,
                deleted_upstream=gone,
            )
        )
    return out


def _known_source(conn: sqlite3.Connection, user: str, source: str, cutoff: str) -> datetime | None:
    row = conn.execute(
        "SELECT last_login FROM known_sources WHERE user = ? AND source = ? AND last_login >= ?",
        (user, source, cutoff),
    ).fetchone()
    return None if row is None else from_utc_text(row[0])


def _remember_source(
    conn: sqlite3.Connection, user: str, source: str, when: str, *, keep: int, cutoff: str
) -> None:
    with _transaction(conn, write=True):
        conn.execute(
            "INSERT INTO known_sources (user, source, last_login) VALUES (?, ?, ?)"
            " ON CONFLICT (user, source) DO UPDATE"
            " SET last_login = max(last_login, excluded.last_login)",
            (user, source, when),
        )
        conn.execute(
            "DELETE FROM known_sources WHERE user = ? AND (last_login < ? OR source NOT IN"
            " (SELECT source FROM known_sources WHERE user = ?"
            " ORDER BY last_login DESC, source LIMIT ?))",
            (user, cutoff, user, keep),
        )


# -- the audit log -------------------------------------------------------------------------


def _audit(conn: sqlite3.Connection, query: AuditQuery) -> list[AuditEntry]:
    conditions: list[str] = []
    args: list[object] = []
    for column, value in (
        ("d.user = ?", query.user),
        ("a.upstream = ?", query.upstream),
        ("d.rule = ?", query.rule),
        ("d.uid = ?", query.uid),
        ("d.at >= ?", None if query.since is None else utc_text(query.since)),
    ):
        if value is not None:
            conditions.append(column)
            args.append(value)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    with _transaction(conn, write=False):
        rows = conn.execute(
            "SELECT d.at, d.session_id, d.user, a.upstream, a.upstream_user, d.uid, d.size,"
            " d.rule, d.action FROM disposals AS d JOIN accounts AS a ON a.id = d.account_id"
            f"{where} ORDER BY d.at DESC, d.id DESC LIMIT ?",
            (*args, query.limit),
        ).fetchall()
    return [
        AuditEntry(
            at=from_utc_text(at),
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


def _count_audit(conn: sqlite3.Connection, cutoff: str) -> int:
    with _transaction(conn, write=False):
        return int(
            conn.execute("SELECT count(*) FROM disposals WHERE at < ?", (cutoff,)).fetchone()[0]
        )


def _trim_audit_batch(conn: sqlite3.Connection, cutoff: str) -> int:
    with _transaction(conn, write=True):
        cursor = conn.execute(
            "DELETE FROM disposals WHERE id IN (SELECT id FROM disposals WHERE at < ? LIMIT ?)",
            (cutoff, PRUNE_BATCH),
        )
        return cursor.rowcount
