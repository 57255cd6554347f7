"""What every sqlite query module uses: the stored time format, transactions, UIDLs
in ``IN (...)`` chunks, and an account's row id.

Times are stored as UTC ISO 8601 text with microseconds and a Z, so they sort as
text and read well in the ``sqlite3`` shell. A transaction that writes starts with
``BEGIN IMMEDIATE``: it takes the write lock at once and waits up to the busy
timeout for another writer, instead of failing when it would upgrade a read lock.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from popproxy.state.base import AccountKey
from popproxy.state.checks import check_aware

# UIDLs per ``IN (...)`` query; far below SQLITE_MAX_VARIABLE_NUMBER (32766 since 3.32).
QUERY_CHUNK = 500
# Stored times kept parsed: every UIDL a session first saw shares that session's time,
# so a listing of MAX_RECORD_MESSAGES has few distinct times; this bounds the cache.
PARSED_TIMES_CACHED = 4096


def utc_text(when: datetime) -> str:
    """``when`` as stored: UTC ISO 8601 with microseconds and a Z (sorts as text)."""
    check_aware(when)
    naive = when.astimezone(UTC).replace(tzinfo=None)
    return naive.isoformat(timespec="microseconds") + "Z"


@functools.lru_cache(maxsize=PARSED_TIMES_CACHED)
def from_utc_text(text: str) -> datetime:
    """A stored time back as an aware UTC datetime (cached: one session's rows share it)."""
    return datetime.fromisoformat(text)


def maybe_from_utc_text(text: str | None) -> datetime | None:
    """``from_utc_text`` of a column that may be NULL."""
    return None if text is None else from_utc_text(text)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, write: bool) -> Iterator[None]:
    """One transaction: IMMEDIATE takes the write lock at once, so a writer never has
    to upgrade a read lock (which busy_timeout cannot wait for)."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    """``items`` in slices of at most ``QUERY_CHUNK``, one ``IN (...)`` query each."""
    for start in range(0, len(items), QUERY_CHUNK):
        yield items[start : start + QUERY_CHUNK]


def marks(count: int) -> str:
    """``count`` parameter marks for an ``IN (...)`` list."""
    return ", ".join("?" * count)


def lookup_account(conn: sqlite3.Connection, account: AccountKey, *, create: bool) -> int | None:
    """The row id of ``account`` (created if missing and ``create``), None if unknown."""
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
