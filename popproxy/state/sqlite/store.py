"""The sqlite store itself: its connections and worker threads, opening, and group
commit of ``record``; the other calls are ``StoreFrontend``'s over this backend's
``QUERIES``.

Each call runs in ``trio.to_thread.run_sync`` behind a ``CapacityLimiter`` of
``SQLITE_THREADS``; a worker takes an idle connection from a pool (at most one per
limiter token), so a connection is only ever used by one thread at a time, as
sqlite's threading rules ask. Connections use ``synchronous=FULL`` (a committed
transaction is on disk when the call returns) and wait up to
``busy_timeout_seconds`` for another writer (another task or another process on
the same file). ``record`` calls that arrive while a commit is in flight are
committed together, one transaction and one fsync per group, each record in a
savepoint of its own (group commit). A QUIT that changes nothing but the
account's ``last_listed`` is answered without a transaction (``unchanged.py``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from popproxy.state.base import (
    AccountKey,
    MessageFacts,
    SessionRecord,
    StateError,
    StoredMessage,
)
from popproxy.state.checks import check_record
from popproxy.state.frontend import Queries, StoreFrontend
from popproxy.state.sqlite import audit, gateway, known_sources, retention
from popproxy.state.sqlite.retention import record_batch
from popproxy.state.sqlite.schema import MIGRATIONS, Migration, check_version, prepare
from popproxy.state.sqlite.sql import utc_text
from popproxy.state.sqlite.unchanged import ListedAccounts

# Worker threads (and so connections) per store: sqlite runs one writer at a time
# and readers beside it in WAL mode; a few threads keep logins' reads off the
# writer's queue without tying up trio's thread pool on a small machine.
SQLITE_THREADS = 4

_T = TypeVar("_T")

# The work of each call but ``record``, in a worker thread; times as sortable UTC text.
QUERIES: Queries[sqlite3.Connection, str] = Queries(
    stored=utc_text,
    facts=retention.facts,
    messages=retention.messages,
    prune_batch=retention.prune_batch,
    gateway_listing=gateway.gateway_listing,
    gateway_facts=gateway.gateway_facts,
    gateway_staged=gateway.gateway_staged,
    gateway_transition=gateway.gateway_transition,
    gateway_deleted=gateway.gateway_deleted,
    gateway_poll_finished=gateway.gateway_poll_finished,
    gateway_sources=gateway.gateway_sources,
    known_source=known_sources.known_source,
    remember_source=known_sources.remember_source,
    audit=audit.audit,
    count_audit=audit.count_audit,
    trim_audit_batch=audit.trim_audit_batch,
)


@dataclass(slots=True, eq=False)
class _Pending:
    """One ``record`` call waiting for a group commit (mutable: filled in by the committer)."""

    record: SessionRecord
    done: bool = False
    error: str | None = None


class SqliteStore(StoreFrontend[sqlite3.Connection, str]):
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
        super().__init__(QUERIES, threads=SQLITE_THREADS if target is not None else 1)
        self._read_only = read_only
        self._target = target
        self._busy_timeout = busy_timeout_seconds
        self._migrations = tuple(migrations)
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._queue: list[_Pending] = []  # records waiting for the next group commit
        self._committing: trio.Event | None = None  # set when the commit in flight ends
        self._listed = ListedAccounts()  # what QUITs that change nothing need not write

    async def record(self, record: SessionRecord) -> None:
        """Write what one QUIT did in one transaction, durable (WAL, synchronous=FULL).

        A QUIT that changes nothing but the account's ``last_listed`` returns at once
        (``unchanged.py``): that time goes into the account's next transaction.
        Group commit: records that arrive while a commit is in flight wait for it,
        then the first of them commits all of them in one transaction (one fsync).
        Each returns only once its own transaction is committed.
        """
        check_record(record)
        if self._listed.answer_unchanged(record):
            return
        pending = _Pending(record)
        self._queue.append(pending)
        self._listed.started(record.account)
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
            self._listed.forget(record.account)  # stored or not: unknown
            raise
        finally:
            self._listed.finished(record.account)
        if pending.error is not None:
            raise StateError(pending.error)

    async def _commit(self, batch: list[_Pending]) -> None:
        """Commit ``batch`` in one transaction; mark each record done with its outcome."""
        records = [p.record for p in batch]
        catch_ups = self._listed.catch_ups(r.account for r in records)
        try:
            outcomes = await self._run(lambda conn: record_batch(conn, records, catch_ups))
        except StateError as exc:  # BEGIN or COMMIT failed: none of them is stored
            for pending in batch:
                pending.done = True
                pending.error = str(exc)
                self._listed.forget(pending.record.account)
            return
        self._listed.caught_up(catch_ups)
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.done = True
            if outcome.error is None:
                self._listed.committed(pending.record, outcome.latest)
            else:
                pending.error = f"state store {self._describe()}: {outcome.error}"
                self._listed.forget(pending.record.account)

    async def facts(
        self, account: AccountKey, user: str, uids: Collection[str]
    ) -> Mapping[str, MessageFacts]:
        """``StateStore.facts``, with the ``last_listed`` kept for ``account`` applied."""
        read = await super().facts(account, user, uids)
        return self._listed.facts_as_stored(account, read)

    async def messages(self, account: AccountKey | None = None) -> Sequence[StoredMessage]:
        """``StateStore.messages``, with the ``last_listed`` times kept applied."""
        return self._listed.messages_as_stored(await super().messages(account))

    async def aclose(self) -> None:
        """Write the ``last_listed`` times kept (``unchanged.py``), then close."""
        catch_ups = self._listed.all_catch_ups()
        if catch_ups:
            with contextlib.suppress(StateError, trio.ClosedResourceError):
                # Not written, they stay behind by at most LAST_LISTED_REFRESH_SECONDS.
                await self._run(lambda conn: record_batch(conn, (), catch_ups))
                self._listed.caught_up(catch_ups)
        await super().aclose()

    # -- opening -----------------------------------------------------------------------

    async def _open(self, *, integrity_check: bool) -> None:
        if self._read_only:
            await self._run(lambda conn: check_version(conn, self._migrations))
            return
        await self._run(lambda conn: prepare(conn, self._migrations, integrity_check))

    # -- threads and connections ---------------------------------------------------------

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

    def _release(self) -> None:
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
