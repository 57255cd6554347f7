"""The rows both backends read, made the protocol's values (``base.py``).

sqlite and PostgreSQL select the same columns in the same order for ``messages``,
the gateway's facts and sources, and the audit log; only how a stored time comes
back differs (sortable UTC text in sqlite, ``timestamptz`` in PostgreSQL), so each
backend passes its ``time`` conversion and the building is written once here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from popproxy.state.base import (
    AccountKey,
    AuditAction,
    AuditEntry,
    FetchFacts,
    FetchState,
    PollSummary,
    SourceKey,
    SourceStatus,
    StoredMessage,
)

# A backend's stored time (a column value, never NULL) as an aware UTC datetime.
Time = Callable[[Any], datetime]

# The columns each function takes, in this order (the backends' SELECTs name them).
FACT_COLUMNS = "uid, size, first_seen, state, file_name, deleted_upstream_at"


def _maybe(time: Time, value: Any) -> datetime | None:
    return None if value is None else time(value)


def stored_messages(
    rows: Iterable[Sequence[Any]],
    retrievals: Iterable[Sequence[Any]],
    hides: Iterable[Sequence[Any]],
    time: Time,
) -> list[StoredMessage]:
    """``messages``: ``rows`` of (message id, upstream, upstream user, UIDL, size, first
    seen, last seen, deleted upstream at, by rule, account last listed), with the
    (message id, user, at) of ``retrievals`` and (message id, user, rule, at) of
    ``hides``, each in the order they are to be shown."""
    retrieved: dict[int, list[tuple[str, datetime]]] = {}
    hidden: dict[int, list[tuple[str, str, datetime]]] = {}
    for message_id, user, when in retrievals:
        retrieved.setdefault(message_id, []).append((user, time(when)))
    for message_id, user, rule, when in hides:
        hidden.setdefault(message_id, []).append((user, rule, time(when)))
    return [
        StoredMessage(
            account=AccountKey(upstream, upstream_user),
            uid=uid,
            size=size,
            first_seen=time(first),
            last_seen=time(last),
            retrieved_by=tuple(retrieved.get(message_id, ())),
            hidden_for=tuple(hidden.get(message_id, ())),
            deleted_upstream_at=_maybe(time, deleted),
            deleted_by_rule=rule,
            account_last_listed=_maybe(time, listed),
        )
        for message_id, upstream, upstream_user, uid, size, first, last, deleted, rule, listed in (
            rows
        )
    ]


def fetch_facts(row: Sequence[Any], time: Time) -> FetchFacts:
    """One gateway message from a row of ``FACT_COLUMNS``."""
    uid, size, first, state, name, deleted = row
    return FetchFacts(
        uid=uid,
        size=size,
        first_seen=time(first),
        state=FetchState(state),
        file_name=name,
        deleted_upstream_at=_maybe(time, deleted),
    )


def source_statuses(rows: Iterable[Sequence[Any]], time: Time) -> list[SourceStatus]:
    """``gateway_sources``: rows of (user, upstream, upstream user, last poll at, its
    result, fetched, skipped, deleted, fetched bytes, last success at, then the counts
    of messages not delivered, delivered and deleted upstream)."""
    out: list[SourceStatus] = []
    for (
        user, upstream, upstream_user, poll_at, result, fetched, skipped, deleted, nbytes,
        success, listed, delivered, gone,
    ) in rows:  # fmt: skip
        last = None
        if poll_at is not None:
            last = PollSummary(time(poll_at), result, fetched, skipped, deleted, nbytes)
        out.append(
            SourceStatus(
                source=SourceKey(user, upstream, upstream_user),
                last_poll=last,
                last_success_at=_maybe(time, success),
                listed=listed,
                delivered=delivered,
                deleted_upstream=gone,
            )
        )
    return out


def audit_entries(rows: Iterable[Sequence[Any]], time: Time) -> list[AuditEntry]:
    """``audit``: rows of (at, session id, user, upstream, upstream user, UIDL, size,
    rule, action)."""
    return [
        AuditEntry(
            at=time(at),
            session_id=session_id,
            user=user,
            account=AccountKey(upstream, upstream_user),
            uid=uid,
            size=size,
            rule=rule,
            action=AuditAction(action),
        )
        for at, session_id, user, upstream, upstream_user, uid, size, rule, action in rows
    ]
