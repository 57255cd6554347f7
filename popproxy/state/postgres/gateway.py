"""The PostgreSQL store's gateway facts (tables ``gateway_sources``, ``gateway_messages``).

Per source (local user, upstream, upstream user) each listed (UIDL, size) with its
first-seen time, how far its delivery got (``FetchState``: LISTED, STAGED,
DELIVERED) and its deletion upstream, and each source's last poll. Another size
under a known UIDL is new content (RFC 1939 §7) and starts over as LISTED; a
STAGED row is never dropped or pruned, its file is still to be settled by the next
poll (docs/gateway.md, the crash table). Each write first upserts the source's row
and holds its lock until COMMIT, so the writes of one source (from any process)
apply one after another. Each deletion upstream is also a row of the audit log.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg

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
from popproxy.state.postgres.audit import append_audit
from popproxy.state.postgres.sql import utc
from popproxy.state.rows import FACT_COLUMNS, fetch_facts, source_statuses


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


def gateway_listing(
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
            f"SELECT {FACT_COLUMNS} FROM gateway_messages"
            " WHERE source_id = %s AND uid = ANY(%s::text[])",
            (source_id, uids),
        ).fetchall()
    return {row[0]: fetch_facts(row, utc) for row in rows}


def gateway_facts(
    conn: psycopg.Connection[Any], source: SourceKey, uids: list[str]
) -> dict[str, FetchFacts]:
    rows = conn.execute(  # one statement: one snapshot
        "SELECT m.uid, m.size, m.first_seen, m.state, m.file_name, m.deleted_upstream_at"
        " FROM gateway_messages AS m JOIN gateway_sources AS s ON s.id = m.source_id"
        " WHERE s.local_user = %s AND s.upstream = %s AND s.upstream_user = %s"
        " AND m.uid = ANY(%s::text[])",
        (source.user, source.upstream, source.upstream_user, uids),
    ).fetchall()
    return {row[0]: fetch_facts(row, utc) for row in rows}


def gateway_staged(conn: psycopg.Connection[Any], source: SourceKey) -> list[FetchFacts]:
    rows = conn.execute(
        f"SELECT {FACT_COLUMNS} FROM gateway_messages AS m"
        " JOIN gateway_sources AS s ON s.id = m.source_id"
        " WHERE s.local_user = %s AND s.upstream = %s AND s.upstream_user = %s"
        " AND m.state = 'staged' ORDER BY m.uid",
        (source.user, source.upstream, source.upstream_user),
    ).fetchall()
    return [fetch_facts(row, utc) for row in rows]


def gateway_transition(
    conn: psycopg.Connection[Any], source: SourceKey, moves: Sequence[Move], at: datetime
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


def gateway_deleted(
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


def gateway_poll_finished(
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


def gateway_sources(conn: psycopg.Connection[Any]) -> list[SourceStatus]:
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
    return source_statuses(rows, utc)
