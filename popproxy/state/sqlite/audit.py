"""The sqlite store's audit log (table ``disposals``): written, read, trimmed.

Every hide and upstream deletion is a row, written by ``append_audit`` in the
transaction that records it (a session's QUIT, a gateway poll's deletions) and
never rewritten; the rows keep the size of the content they applied to, across
UIDL reuse and pruning. ``audit`` reads them newest first for ``popproxy audit``;
``trim_audit_batch`` deletes the oldest to ``state.audit_retention_days``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from popproxy.state.base import AccountKey, AuditEntry, AuditQuery
from popproxy.state.checks import PRUNE_BATCH
from popproxy.state.rows import audit_entries
from popproxy.state.sqlite.sql import from_utc_text, lookup_account, transaction, utc_text


def append_audit(conn: sqlite3.Connection, entries: Sequence[AuditEntry]) -> None:
    """Add ``entries`` to the audit log (table ``disposals``) in the caller's open write
    transaction, in their order; creates an account row a row names if missing.

    Every writer of a hide or an upstream deletion calls this in the transaction that
    records it: a session's QUIT (``record``), and a gateway poll's deletions.
    """
    ids: dict[AccountKey, int | None] = {}
    for e in entries:
        if e.account not in ids:
            ids[e.account] = lookup_account(conn, e.account, create=True)
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


def audit(conn: sqlite3.Connection, query: AuditQuery) -> list[AuditEntry]:
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
    with transaction(conn, write=False):
        rows = conn.execute(
            "SELECT d.at, d.session_id, d.user, a.upstream, a.upstream_user, d.uid, d.size,"
            " d.rule, d.action FROM disposals AS d JOIN accounts AS a ON a.id = d.account_id"
            f"{where} ORDER BY d.at DESC, d.id DESC LIMIT ?",
            (*args, query.limit),
        ).fetchall()
    return audit_entries(rows, from_utc_text)


def count_audit(conn: sqlite3.Connection, cutoff: str) -> int:
    with transaction(conn, write=False):
        return int(
            conn.execute("SELECT count(*) FROM disposals WHERE at < ?", (cutoff,)).fetchone()[0]
        )


def trim_audit_batch(conn: sqlite3.Connection, cutoff: str) -> int:
    with transaction(conn, write=True):
        cursor = conn.execute(
            "DELETE FROM disposals WHERE id IN (SELECT id FROM disposals WHERE at < ? LIMIT ?)",
            (cutoff, PRUNE_BATCH),
        )
        return cursor.rowcount
