"""What every PostgreSQL query module uses: times checked on the way in and made
aware UTC on the way out.

Columns are ``timestamptz`` (microseconds, as Python's ``datetime``); psycopg
returns them in the session's time zone, which ``store.py`` sets to UTC, and
``utc`` makes sure of it. Names and UIDLs are ``text COLLATE "C"`` (schema.py).
"""

from __future__ import annotations

from datetime import UTC, datetime

from popproxy.state.checks import check_aware


def stored(when: datetime) -> datetime:
    """``when`` as the queries take it: checked aware (``timestamptz`` keeps the instant)."""
    check_aware(when)
    return when


def utc(when: datetime) -> datetime:
    """A stored time as an aware UTC datetime."""
    return when.astimezone(UTC)


def maybe_utc(when: datetime | None) -> datetime | None:
    """``utc`` of a column that may be NULL."""
    return None if when is None else when.astimezone(UTC)
