"""The PostgreSQL store's known sources (table ``known_sources``): the client
addresses each local user lately logged in from, which the user-name lockout spares
(popproxy/known_sources.py). A user keeps at most ``keep`` of them, the latest,
each forgotten once unused since the cutoff; the upsert's row lock orders the
writes of one user from any process.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from popproxy.state.postgres.sql import utc


def known_source(
    conn: psycopg.Connection[Any], user: str, source: str, since: datetime
) -> datetime | None:
    row = conn.execute(
        "SELECT last_login FROM known_sources"
        " WHERE local_user = %s AND source = %s AND last_login >= %s",
        (user, source, since),
    ).fetchone()
    return None if row is None else utc(row[0])


def remember_source(
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
