"""``popproxy state show`` and ``state prune``: their options, and what they read,
change and print (docs/state.md).

The store is opened from the config's ``state`` section and closed again by each call.
"""

from __future__ import annotations

import argparse
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
    from popproxy.state.base import AccountKey, SourceStatus, StoreBackend, StoredMessage

# `state prune --gone-days`: a century is more than any retention; the bound keeps the
# cutoff a valid datetime.
MAX_GONE_DAYS = 36_500


def add_parser(commands: Subcommands) -> None:
    """Declare ``popproxy state`` and its actions, ``show`` and ``prune``."""
    state = commands.add_parser(
        "state",
        help="inspect or prune the state store (docs/state.md)",
        description="Inspect or prune the state store named by state.url in the config.",
    )
    actions = state.add_subparsers(dest="state_command", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show", help="print the stored UIDLs: sizes, first and last seen, retrievals, hides"
    )
    show.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    show.add_argument("--upstream", metavar="NAME", help="only accounts of this upstream")
    show.add_argument("--upstream-user", metavar="USER", help="only accounts of this user name")
    prune = actions.add_parser(
        "prune", help="forget UIDLs gone from their upstream's listing for N days"
    )
    prune.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    prune.add_argument(
        "--gone-days",
        type=int,
        required=True,
        metavar="N",
        help=f"forget UIDLs last listed more than N days ago (0-{MAX_GONE_DAYS})",
    )
    prune.add_argument("--dry-run", action="store_true", help="only count what would be forgotten")


def run(args: argparse.Namespace) -> int:
    """``state show`` prints the stored UIDLs and gateway sources; ``state prune`` says
    what it forgot (with ``--dry-run``, what it would)."""
    config = load(Path(args.config))
    if config is None:
        return EXIT_USAGE
    if state_missing(config):
        return EXIT_FAILURE
    # The state store is imported only when it is needed, as for run.
    from popproxy.state.base import StateError

    try:
        match args.state_command:
            case "show":
                rows = trio.run(stored_messages, config.state, args.upstream, args.upstream_user)
                print(format_stored(rows))
                sources = trio.run(gateway_sources, config.state, args.upstream, args.upstream_user)
                if sources:
                    print()
                    print(format_sources(sources))
            case "prune":
                if not 0 <= args.gone_days <= MAX_GONE_DAYS:
                    print(f"popproxy: --gone-days must be 0-{MAX_GONE_DAYS}", file=sys.stderr)
                    return EXIT_USAGE
                now = datetime.now(UTC)
                cutoff = now - timedelta(days=args.gone_days)
                retention = config.state.audit_retention_days
                audit_cutoff = now - timedelta(days=retention)
                count, trimmed = trio.run(prune, config.state, cutoff, audit_cutoff, args.dry_run)
                verb = "would forget" if args.dry_run else "forgot"
                print(
                    f"{verb} {count} UIDL(s) gone from their upstream and last listed"
                    f" before {utc(cutoff)}"
                )
                verb = "would delete" if args.dry_run else "deleted"
                print(
                    f"{verb} {trimmed} audit row(s) from before {utc(audit_cutoff)}"
                    f" (state.audit_retention_days: {retention})"
                )
    except StateError as exc:
        print(f"popproxy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def stored_messages(
    state: StateConfig, upstream: str | None, upstream_user: str | None
) -> Sequence[StoredMessage]:
    """The stored UIDLs, of the accounts of ``upstream`` and ``upstream_user`` (None: any)."""
    from popproxy.state.base import AccountKey

    store = await _open(state)
    try:
        if upstream is not None and upstream_user is not None:
            return await store.messages(AccountKey(upstream, upstream_user))
        rows = await store.messages()
    finally:
        await store.aclose()
    return [
        row
        for row in rows
        if upstream in (None, row.account.upstream)
        and upstream_user in (None, row.account.upstream_user)
    ]


async def gateway_sources(
    state: StateConfig, upstream: str | None, upstream_user: str | None
) -> Sequence[SourceStatus]:
    """The gateway's sources the store knows, of ``upstream`` and ``upstream_user`` (None: any)."""
    store = await _open(state)
    try:
        rows = await store.gateway_sources()
    finally:
        await store.aclose()
    return [
        row
        for row in rows
        if upstream in (None, row.source.upstream)
        and upstream_user in (None, row.source.upstream_user)
    ]


def format_sources(rows: Sequence[SourceStatus]) -> str:
    """What ``state show`` prints for the gateway: one line per source, its last poll."""
    lines = ["gateway sources:"]
    for row in rows:
        source = row.source
        line = f"  {source.user} <- {source.upstream}/{source.upstream_user}:"
        last = row.last_poll
        if last is None:
            line += " never polled"
        else:
            line += (
                f" last poll {utc(last.at)} {last.result} fetched={last.fetched}"
                f" skipped={last.skipped} deleted={last.deleted} bytes={last.fetched_bytes}"
            )
        success = "never" if row.last_success_at is None else utc(row.last_success_at)
        line += (
            f"; last success {success}; known UIDLs: {row.delivered} delivered,"
            f" {row.listed} not, {row.deleted_upstream} deleted upstream"
        )
        lines.append(line)
    return "\n".join(lines)


async def prune(
    state: StateConfig, cutoff: datetime, audit_cutoff: datetime, dry_run: bool
) -> tuple[int, int]:
    """Forget the UIDLs gone from their upstream's listing since before ``cutoff`` and
    delete the audit rows from before ``audit_cutoff``; how many of each (with
    ``dry_run``, only count them)."""
    store = await _open(state)
    try:
        if dry_run:
            gone = sum(row.is_gone(cutoff) for row in await store.messages())
        else:
            gone = await store.prune(cutoff)
        return gone, await store.trim_audit(audit_cutoff, dry_run=dry_run)
    finally:
        await store.aclose()


_STORED_COLUMNS = (
    "UIDL",
    "SIZE",
    "FIRST SEEN",
    "LAST SEEN",
    "RETRIEVED BY",
    "HIDDEN FOR",
    "DELETED UPSTREAM",
)


def format_stored(rows: Sequence[StoredMessage]) -> str:
    """What ``state show`` prints: per account a header line and a table of its UIDLs."""
    if not rows:
        return "no UIDLs stored"
    accounts: dict[AccountKey, list[StoredMessage]] = {}
    for row in rows:
        accounts.setdefault(row.account, []).append(row)
    blocks = []
    for account, messages in accounts.items():
        listed = messages[0].account_last_listed
        header = f"{account.upstream} {account.upstream_user}: {len(messages)} UIDL(s)" + (
            f", last listed {utc(listed)}" if listed is not None else ""
        )
        table = [_STORED_COLUMNS, *(_stored_cells(m) for m in messages)]
        widths = [max(len(cells[i]) for cells in table) for i in range(len(_STORED_COLUMNS))]
        lines = [
            "  "
            + "  ".join(
                cell.rjust(width) if column == 1 else cell.ljust(width)
                for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
            for cells in table
        ]
        blocks.append("\n".join([header, *lines]))
    return "\n\n".join(blocks)


def _stored_cells(row: StoredMessage) -> tuple[str, ...]:
    retrieved = ", ".join(f"{user} {utc(at)}" for user, at in row.retrieved_by)
    hidden = ", ".join(f"{user} by {rule} {utc(at)}" for user, rule, at in row.hidden_for)
    deleted = (
        f"{utc(row.deleted_upstream_at)} by {row.deleted_by_rule}"
        if row.deleted_upstream_at is not None
        else ""
    )
    return (
        row.uid,
        str(row.size),
        utc(row.first_seen),
        utc(row.last_seen),
        retrieved or "-",
        hidden or "-",
        deleted or "-",
    )


def utc(when: datetime) -> str:
    """``when`` in UTC, to the second, as ``state`` prints times."""
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def _open(state: StateConfig) -> StoreBackend:
    from popproxy.state import open_store

    return await open_store(state)
