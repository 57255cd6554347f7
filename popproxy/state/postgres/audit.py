"""The PostgreSQL store's audit log (table ``disposals``): written, read, trimmed.

Every hide and upstream deletion is a row, written by ``append_audit`` in the
transaction that records it (a session's QUIT, a gateway poll's deletions) and
never rewritten; the rows keep the size of the content they applied to, across
UIDL reuse and pruning. ``audit`` reads them newest first for ``popproxy audit``;
``trim_audit_batch`` deletes the oldest to ``state.audit_retention_days``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg

from popproxy.state.base import AccountKey, AuditEntry, AuditQuery
from popproxy.state.checks import PRUNE_BATCH
from popproxy.state.postgres.sql import utc
from popproxy.state.rows import audit_entries


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


def audit(conn: psycopg.Connection[Any], query: AuditQuery) -> list[AuditEntry]:
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
    return audit_entries(rows, utc)


def count_audit(conn: psycopg.Connection[Any], cutoff: datetime) -> int:
    row = conn.execute("SELECT count(*) FROM disposals WHERE at < %s", (cutoff,)).fetchone()
    return 0 if row is None else int(row[0])


def trim_audit_batch(conn: psycopg.Connection[Any], cutoff: datetime) -> int:
    with conn.transaction():
        cursor = conn.execute(
            "DELETE FROM disposals WHERE id IN (SELECT id FROM disposals WHERE at < %s LIMIT %s)",
            (cutoff, PRUNE_BATCH),
        )
        return cursor.rowcount
