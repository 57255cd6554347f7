"""The sqlite store's known sources (table ``known_sources``): the client addresses
each local user lately logged in from, which the user-name lockout spares
(popproxy/known_sources.py). A user keeps at most ``keep`` of them, the latest,
each forgotten once unused since the cutoff.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime

from popproxy.state.sqlite.sql import from_utc_text, transaction


def known_source(conn: sqlite3.Connection, user: str, source: str, cutoff: str) -> datetime | None:
    """When ``user`` last logged in from ``source``, if at or after ``cutoff``."""
    row = conn.execute(
        "SELECT last_login FROM known_sources WHERE user = ? AND source = ? AND last_login >= ?",
        (user, source, cutoff),
    ).fetchone()
    return None if row is None else from_utc_text(row[0])


def remember_source(
    conn: sqlite3.Connection, user: str, source: str, when: str, *, keep: int, cutoff: str
) -> None:
    """Record a login of ``user`` from ``source`` at ``when``, then forget the user's
    sources unused since ``cutoff`` and all but the ``keep`` latest (one transaction)."""
    with transaction(conn, write=True):
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
