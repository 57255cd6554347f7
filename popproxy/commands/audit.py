"""What ``popproxy audit`` reads and prints: the audit log of hides and upstream
deletions (docs/operations.md, "Why did this message disappear?").

The store is opened read-only (``open_store(read_only=True)``): nothing is created,
migrated or written, so the command is safe beside a running popproxy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from popproxy.config import StateConfig
from popproxy.state import open_store
from popproxy.state.base import AuditEntry, AuditQuery

# `--since Nd`: as far back as any retention reaches (state.audit_retention_days).
MAX_SINCE_DAYS = 36_500

_DAYS_AGO = re.compile(r"(\d{1,5})d")
_SINCE_FORMS = "a date (2024-05-01), a time (2024-05-01T12:00:00Z) or days ago (7d)"


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: a date (its start, UTC), an ISO 8601 time (UTC unless it names an
    offset) or ``Nd`` (N days before ``now``); ``ValueError`` says what was expected."""
    days = _DAYS_AGO.fullmatch(text)
    if days is not None:
        count = int(days.group(1))
        if count > MAX_SINCE_DAYS:
            raise ValueError(f"at most {MAX_SINCE_DAYS} days ago, got {text!r}")
        return now - timedelta(days=count)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expected {_SINCE_FORMS}, got {text!r}") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


async def audit_entries(state: StateConfig, query: AuditQuery) -> Sequence[AuditEntry]:
    """The audit rows ``query`` selects, newest first, from the store opened read-only."""
    store = await open_store(state, read_only=True)
    try:
        return await store.audit(query)
    finally:
        await store.aclose()


_COLUMNS = ("TIME", "SESSION", "USER", "UPSTREAM", "UPSTREAM USER", "UIDL", "SIZE", "RULE")
_ACTION = "ACTION"


def format_table(rows: Sequence[AuditEntry]) -> str:
    """The plain output: one aligned line per decision under a header line."""
    if not rows:
        return "no audit rows match"
    table = [(*_COLUMNS, _ACTION), *(_cells(row) for row in rows)]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    size_column = _COLUMNS.index("SIZE")
    return "\n".join(
        "  ".join(
            cell.rjust(width) if column == size_column else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()
        for cells in table
    )


def format_json_lines(rows: Sequence[AuditEntry]) -> str:
    """The ``--json`` output: one JSON object per line (JSON Lines), newest first."""
    return "".join(json.dumps(as_json(row), ensure_ascii=False) + "\n" for row in rows)


def as_json(row: AuditEntry) -> dict[str, object]:
    """One row as ``--json`` prints it; ``at`` is UTC ISO 8601 with microseconds."""
    return {
        "at": row.at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "session": row.session_id,
        "user": row.user,
        "upstream": row.account.upstream,
        "upstream_user": row.account.upstream_user,
        "uid": row.uid,
        "size": row.size,
        "rule": row.rule,
        "action": row.action.value,
    }


def _cells(row: AuditEntry) -> tuple[str, ...]:
    return (
        row.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
        row.session_id,
        row.user,
        row.account.upstream,
        row.account.upstream_user,
        row.uid,
        str(row.size),
        row.rule,
        row.action.value,
    )
