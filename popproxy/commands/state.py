"""What ``popproxy state show`` and ``state prune`` read, change and print (docs/state.md).

The store is opened from the config's ``state`` section and closed again by each call.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from popproxy.config import StateConfig
from popproxy.state import open_store
from popproxy.state.base import AccountKey, SourceStatus, StoredMessage


async def stored_messages(
    state: StateConfig, upstream: str | None, upstream_user: str | None
) -> Sequence[StoredMessage]:
    """The stored UIDLs, of the accounts of ``upstream`` and ``upstream_user`` (None: any)."""
    store = await open_store(state)
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
    store = await open_store(state)
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
    store = await open_store(state)
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
