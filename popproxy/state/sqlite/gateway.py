"""The sqlite store's gateway facts (tables ``gateway_sources``, ``gateway_messages``).

Per source (local user, upstream, upstream user) each listed (UIDL, size) with its
first-seen time, how far its delivery got (``FetchState``: LISTED, STAGED,
DELIVERED) and its deletion upstream, and each source's last poll. Another size
under a known UIDL is new content (RFC 1939 §7) and starts over as LISTED; a
STAGED row is never dropped or pruned, its file is still to be settled by the next
poll (docs/gateway.md, the crash table). Each deletion upstream is also a row of
the audit log.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

from popproxy.state.base import (
    Disposal,
    FetchFacts,
    PollSummary,
    SeenMessage,
    SourceKey,
    SourceStatus,
    StateError,
)
from popproxy.state.checks import gateway_audit
from popproxy.state.frontend import Move
from popproxy.state.rows import FACT_COLUMNS, fetch_facts, source_statuses
from popproxy.state.sqlite.audit import append_audit
from popproxy.state.sqlite.sql import (
    chunks,
    from_utc_text,
    marks,
    transaction,
    utc_text,
)


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


def gateway_listing(
    conn: sqlite3.Connection, source: SourceKey, listing: Sequence[SeenMessage], at: str
) -> dict[str, FetchFacts]:
    sizes = {m.uid: m.size for m in listing}
    with transaction(conn, write=True):
        source_id = _source_id(conn, source, create=True)
        assert source_id is not None  # found or created
        conn.execute(
            "UPDATE gateway_sources SET last_listed = max(coalesce(last_listed, ?), ?)"
            " WHERE id = ?",
            (at, at, source_id),
        )
        stored: dict[str, int] = {}
        for chunk in chunks(list(sizes)):
            rows = conn.execute(
                "SELECT uid, size FROM gateway_messages"
                f" WHERE source_id = ? AND uid IN ({marks(len(chunk))})",
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
        return _facts_of(conn, source_id, list(sizes))


def gateway_facts(
    conn: sqlite3.Connection, source: SourceKey, uids: Sequence[str]
) -> dict[str, FetchFacts]:
    with transaction(conn, write=False):  # one snapshot for every chunk
        source_id = _source_id(conn, source, create=False)
        return {} if source_id is None else _facts_of(conn, source_id, uids)


def _facts_of(
    conn: sqlite3.Connection, source_id: int, uids: Sequence[str]
) -> dict[str, FetchFacts]:
    """The stored facts of those of ``uids`` the source has, in the caller's transaction."""
    out: dict[str, FetchFacts] = {}
    for chunk in chunks(uids):
        for row in conn.execute(
            f"SELECT {FACT_COLUMNS} FROM gateway_messages"
            f" WHERE source_id = ? AND uid IN ({marks(len(chunk))})",
            (source_id, *chunk),
        ):
            out[row[0]] = fetch_facts(row, from_utc_text)
    return out


def gateway_staged(conn: sqlite3.Connection, source: SourceKey) -> list[FetchFacts]:
    with transaction(conn, write=False):
        source_id = _source_id(conn, source, create=False)
        if source_id is None:
            return []
        rows = conn.execute(
            f"SELECT {FACT_COLUMNS} FROM gateway_messages"
            " WHERE source_id = ? AND state = 'staged' ORDER BY uid",
            (source_id,),
        ).fetchall()
    return [fetch_facts(row, from_utc_text) for row in rows]


def gateway_transition(
    conn: sqlite3.Connection, source: SourceKey, moves: Sequence[Move], at: str
) -> None:
    """Apply ``moves`` in one transaction; a row not in its ``before`` state is a
    caller's bug, and then nothing is changed."""
    with transaction(conn, write=True):
        source_id = _source_id(conn, source, create=False)
        for move in moves:
            cursor = conn.execute(
                "UPDATE gateway_messages SET state = ?, file_name = coalesce(?, file_name),"
                " state_at = ? WHERE source_id = ? AND uid = ? AND size = coalesce(?, size)"
                " AND state = ?",
                (move.state, move.file_name, at, source_id, move.uid, move.size, move.before),
            )
            if cursor.rowcount != 1:
                raise StateError(f"gateway message not {move.before}: cannot make it {move.state}")


def gateway_deleted(
    conn: sqlite3.Connection,
    source: SourceKey,
    deleted: Sequence[Disposal],
    at: datetime,
    session_id: str,
) -> None:
    when = utc_text(at)
    with transaction(conn, write=True):
        source_id = _source_id(conn, source, create=False)
        conn.executemany(
            "UPDATE gateway_messages SET deleted_upstream_at = ?, deleted_by_rule = ?"
            " WHERE source_id = ? AND uid = ?",
            [(when, d.rule, source_id, d.uid) for d in deleted],
        )
        sizes: dict[str, int] = {}
        for chunk in chunks([d.uid for d in deleted]):
            rows = conn.execute(
                "SELECT uid, size FROM gateway_messages"
                f" WHERE source_id = ? AND uid IN ({marks(len(chunk))})",
                (source_id, *chunk),
            )
            sizes.update((uid, size) for uid, size in rows)
        append_audit(conn, gateway_audit(source, deleted, sizes, at, session_id))


def gateway_poll_finished(
    conn: sqlite3.Connection, source: SourceKey, summary: PollSummary
) -> None:
    at = utc_text(summary.at)
    with transaction(conn, write=True):
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


def gateway_sources(conn: sqlite3.Connection) -> list[SourceStatus]:
    with transaction(conn, write=False):
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
    return source_statuses(rows, from_utc_text)
