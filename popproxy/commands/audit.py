"""``popproxy audit``: its options, and what it reads and prints: the audit log of hides
and upstream deletions (docs/operations.md, "Why did this message disappear?").

The store is opened read-only (``open_store(read_only=True)``): nothing is created,
migrated or written, so the command is safe beside a running popproxy.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from popproxy.commands.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Subcommands,
    load,
    state_missing,
)
from popproxy.config import StateConfig

if TYPE_CHECKING:
    from popproxy.state.base import AuditEntry, AuditQuery

# `--since Nd`: as far back as any retention reaches (state.audit_retention_days).
MAX_SINCE_DAYS = 36_500
# `--limit`: a screenful of the newest decisions by default; at most one row less
# than a store call returns (popproxy.state.base.MAX_AUDIT_ROWS; tests/commands keeps
# them so), as one more row is read to tell whether the limit cut the list.
DEFAULT_AUDIT_LIMIT = 100
MAX_AUDIT_LIMIT = 99_999

_DAYS_AGO = re.compile(r"(\d{1,5})d")
_SINCE_FORMS = "a date (2024-05-01), a time (2024-05-01T12:00:00Z) or days ago (7d)"


def add_parser(commands: Subcommands) -> None:
    """Declare ``popproxy audit`` and its options."""
    audit = commands.add_parser(
        "audit",
        help="list the hides and upstream deletions and the rules behind them",
        description=(
            "List the audit log of the state store named by state.url: every message a"
            " QUIT hid for its user or deleted upstream, with the time, session, user,"
            " upstream account, UIDL, size, rule and action, newest first. Reads only."
        ),
    )
    audit.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    audit.add_argument("--user", metavar="U", help="only this local user's rows")
    audit.add_argument("--upstream", metavar="NAME", help="only rows of this upstream")
    audit.add_argument("--rule", metavar="R", help="only rows of this rule")
    audit.add_argument("--uid", metavar="UIDL", help="only rows of this UIDL")
    audit.add_argument(
        "--since",
        type=_since,
        metavar="DATE",
        help="only rows at or after DATE: 2024-05-01 (UTC), 2024-05-01T12:00:00Z, or 7d (days ago)",
    )
    audit.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_AUDIT_LIMIT,
        metavar="N",
        help=f"at most N rows, the newest (default: {DEFAULT_AUDIT_LIMIT}, at most"
        f" {MAX_AUDIT_LIMIT})",
    )
    audit.add_argument("--json", action="store_true", help="one JSON object per line (JSON Lines)")


def run(args: argparse.Namespace) -> int:
    """List the rows the options select, newest first, as a table or JSON Lines."""
    if not 1 <= args.limit <= MAX_AUDIT_LIMIT:
        print(f"popproxy audit: --limit must be 1-{MAX_AUDIT_LIMIT}", file=sys.stderr)
        return EXIT_USAGE
    config = load(Path(args.config))
    if config is None:
        return EXIT_USAGE
    if state_missing(config):
        return EXIT_FAILURE
    # The state store is imported only when it is needed, as for run.
    from popproxy.state.base import AuditQuery, StateError

    query = AuditQuery(
        user=args.user,
        upstream=args.upstream,
        rule=args.rule,
        uid=args.uid,
        since=args.since,
        limit=args.limit + 1,  # one more tells whether the limit cut the list
    )
    try:
        rows = trio.run(audit_entries, config.state, query)
    except ValueError as exc:  # a filter no config could name (empty, too long, NUL)
        print(f"popproxy audit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StateError as exc:
        print(f"popproxy audit: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    shown = rows[: args.limit]
    if args.json:
        sys.stdout.write(format_json_lines(shown))
    else:
        print(format_table(shown))
    if len(rows) > args.limit:
        print(
            f"popproxy audit: showing the newest {args.limit} rows; narrow with --user,"
            " --upstream, --rule, --uid or --since, or raise --limit",
            file=sys.stderr,
        )
    return EXIT_OK


def _since(text: str) -> datetime:
    """``--since`` for argparse: a bad value is a usage error (exit 2) saying what fits."""
    try:
        return parse_since(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    from popproxy.state import open_store

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
