"""The running server's trim of the audit log to ``state.audit_retention_days``.

``popproxy run`` starts ``trim_audit_periodically`` beside its accept loops when it
uses the state store: it trims once at start and then every
``AUDIT_TRIM_INTERVAL_SECONDS``. The deletes run in the store's worker threads
(``StateStore.trim_audit``, in batches), never on the trio thread. A trim that
fails (the database is away, the file is locked for longer than the busy timeout)
logs ``audit_trim_failed`` and is tried again at the next interval; sessions are
not disturbed. Several processes sharing one PostgreSQL store each trim it: the
deletes are idempotent and batched, so they only ever share the work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import NoReturn, Protocol

import trio

from popproxy.state.base import StateError

# How often a running server trims the audit log. Retention is counted in days, so a
# few trims a day keep the table within hours of its bound; each is one indexed
# range delete (disposals_at), cheap when there is nothing to delete.
AUDIT_TRIM_INTERVAL_SECONDS = 6 * 3600

log = logging.getLogger("popproxy.state.audit_trim")


class AuditTrimmer(Protocol):
    """The part of ``StateStore`` the trim uses."""

    async def trim_audit(self, before: datetime, *, dry_run: bool = False) -> int: ...


class StoreSource(Protocol):
    """Where the trim gets the open store (``popproxy.state.opener.StoreOpener``)."""

    async def get(self) -> AuditTrimmer: ...


async def trim_audit_once(
    source: StoreSource, retention_days: int, clock: Callable[[], datetime]
) -> int | None:
    """Delete the audit rows older than ``retention_days`` before ``clock()``; how many,
    or None when the store failed (logged as ``audit_trim_failed``)."""
    cutoff = clock() - timedelta(days=retention_days)
    try:
        store = await source.get()
        deleted = await store.trim_audit(cutoff)
    except StateError as exc:
        log.warning(
            "audit_trim_failed",
            extra={
                "fields": {
                    "reason": str(exc),
                    "retry_in_seconds": AUDIT_TRIM_INTERVAL_SECONDS,
                }
            },
        )
        return None
    if deleted:
        log.info(
            "audit_trimmed",
            extra={
                "fields": {
                    "rows": deleted,
                    "before": cutoff.isoformat(timespec="seconds"),
                    "retention_days": retention_days,
                }
            },
        )
    return deleted


async def trim_audit_periodically(
    source: StoreSource,
    retention_days: int,
    clock: Callable[[], datetime],
    *,
    interval_seconds: float = AUDIT_TRIM_INTERVAL_SECONDS,
) -> NoReturn:
    """Trim now, then every ``interval_seconds`` (trio's clock), until cancelled."""
    while True:  # ends: cancelled with the server's acceptor nursery at shutdown
        await trim_audit_once(source, retention_days, clock)
        await trio.sleep(interval_seconds)
