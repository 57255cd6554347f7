"""Persistent state: the ``StateStore`` protocol and its backends (DESIGN.md, state/).

``open_store`` picks the backend from the configured URL's scheme and, given a
``Metrics``, reports each operation's latency and failures
(``popproxy_state_operation_duration_seconds``, ``popproxy_state_errors_total``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Collection, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

from popproxy.config import StateConfig
from popproxy.metrics import Metrics, StateOperation
from popproxy.state.base import (
    AccountKey,
    AuditEntry,
    AuditQuery,
    Disposal,
    FetchFacts,
    MessageFacts,
    PollSummary,
    SeenMessage,
    SessionRecord,
    SourceKey,
    SourceStatus,
    StagedMessage,
    StateError,
    StateStore,
    StoreBackend,
    StoredMessage,
)
from popproxy.state.sqlite import open_sqlite

__all__ = ["POSTGRES_SCHEMES", "StateError", "StateStore", "StoreBackend", "open_store"]

# The URL schemes libpq accepts for PostgreSQL.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")

_T = TypeVar("_T")


async def open_store(
    config: StateConfig, *, metrics: Metrics | None = None, read_only: bool = False
) -> StoreBackend:
    """Open the store ``config.url`` names: ``sqlite:///PATH``, ``sqlite:///:memory:`` or
    ``postgresql://USER@HOST:PORT/DB`` (password from ``config.password``).

    Creates and migrates the database as needed; with ``read_only`` it creates,
    migrates and writes nothing, and only the reads work (``popproxy audit``). The
    caller closes it with ``aclose``. Raises ``StateError`` when it cannot be opened
    or used.
    """
    store: StoreBackend
    if config.url.startswith("sqlite:///"):
        store = await open_sqlite(
            config.sqlite_path,
            busy_timeout_seconds=config.busy_timeout_seconds,
            integrity_check=config.integrity_check and not read_only,
            read_only=read_only,
        )
    elif config.url.startswith(POSTGRES_SCHEMES):
        try:
            from popproxy.state.postgres import PostgresTarget, open_postgres
        except ImportError as exc:  # the optional extra is not installed
            raise StateError(
                "the PostgreSQL state store needs psycopg: install popproxy[postgres]"
            ) from exc
        store = await open_postgres(
            PostgresTarget(config.url, config.password),
            lock_timeout_seconds=config.busy_timeout_seconds,
            read_only=read_only,
        )
    else:
        scheme = config.url.partition(":")[0]
        raise StateError(
            f"state URL scheme {scheme!r} is not supported (sqlite:/// or postgresql://)"
        )
    return store if metrics is None else MeasuredStore(store, metrics)


class MeasuredStore:
    """A ``StateStore`` that reports each call to ``Metrics``: facts, messages,
    known_source and the audit log's reads as LOAD, record and remember_source as
    COMMIT, prune and the audit log's trim as PRUNE (time includes waiting for a
    thread)."""

    def __init__(self, inner: StoreBackend, metrics: Metrics) -> None:
        """Wrap ``inner``; it is closed with this store."""
        self._inner = inner
        self._metrics = metrics

    async def facts(
        self, account: AccountKey, user: str, uids: Collection[str]
    ) -> Mapping[str, MessageFacts]:
        """See ``StateStore.facts``."""
        return await self._measure(StateOperation.LOAD, self._inner.facts(account, user, uids))

    async def record(self, record: SessionRecord) -> None:
        """See ``StateStore.record``."""
        await self._measure(StateOperation.COMMIT, self._inner.record(record))

    async def messages(self, account: AccountKey | None = None) -> Sequence[StoredMessage]:
        """See ``StateStore.messages``."""
        return await self._measure(StateOperation.LOAD, self._inner.messages(account))

    async def prune(self, gone_before: datetime) -> int:
        """See ``StateStore.prune``."""
        return await self._measure(StateOperation.PRUNE, self._inner.prune(gone_before))

    async def gateway_listing(
        self, source: SourceKey, listing: Sequence[SeenMessage], at: datetime
    ) -> Mapping[str, FetchFacts]:
        """See ``GatewayStore.gateway_listing``."""
        return await self._measure(
            StateOperation.COMMIT, self._inner.gateway_listing(source, listing, at)
        )

    async def gateway_facts(
        self, source: SourceKey, uids: Collection[str]
    ) -> Mapping[str, FetchFacts]:
        """See ``GatewayStore.gateway_facts``."""
        return await self._measure(StateOperation.LOAD, self._inner.gateway_facts(source, uids))

    async def gateway_staged(self, source: SourceKey) -> Sequence[FetchFacts]:
        """See ``GatewayStore.gateway_staged``."""
        return await self._measure(StateOperation.LOAD, self._inner.gateway_staged(source))

    async def gateway_stage(
        self, source: SourceKey, staged: Sequence[StagedMessage], at: datetime
    ) -> None:
        """See ``GatewayStore.gateway_stage``."""
        await self._measure(StateOperation.COMMIT, self._inner.gateway_stage(source, staged, at))

    async def gateway_settle(
        self,
        source: SourceKey,
        delivered: Collection[str],
        returned: Collection[str],
        at: datetime,
    ) -> None:
        """See ``GatewayStore.gateway_settle``."""
        await self._measure(
            StateOperation.COMMIT, self._inner.gateway_settle(source, delivered, returned, at)
        )

    async def gateway_deleted(
        self, source: SourceKey, deleted: Sequence[Disposal], at: datetime, *, session_id: str
    ) -> None:
        """See ``GatewayStore.gateway_deleted``."""
        await self._measure(
            StateOperation.COMMIT,
            self._inner.gateway_deleted(source, deleted, at, session_id=session_id),
        )

    async def gateway_poll_finished(self, source: SourceKey, summary: PollSummary) -> None:
        """See ``GatewayStore.gateway_poll_finished``."""
        await self._measure(
            StateOperation.COMMIT, self._inner.gateway_poll_finished(source, summary)
        )

    async def gateway_sources(self) -> Sequence[SourceStatus]:
        """See ``GatewayStore.gateway_sources``."""
        return await self._measure(StateOperation.LOAD, self._inner.gateway_sources())

    async def known_source(self, user: str, source: str, since: datetime) -> datetime | None:
        """See ``StateStore.known_source``."""
        return await self._measure(
            StateOperation.LOAD, self._inner.known_source(user, source, since)
        )

    async def remember_source(
        self, user: str, source: str, at: datetime, *, keep: int, forget_before: datetime
    ) -> None:
        """See ``StateStore.remember_source``."""
        await self._measure(
            StateOperation.COMMIT,
            self._inner.remember_source(user, source, at, keep=keep, forget_before=forget_before),
        )

    async def audit(self, query: AuditQuery) -> Sequence[AuditEntry]:
        """See ``StateStore.audit``."""
        return await self._measure(StateOperation.LOAD, self._inner.audit(query))

    async def trim_audit(self, before: datetime, *, dry_run: bool = False) -> int:
        """See ``StateStore.trim_audit``."""
        return await self._measure(
            StateOperation.PRUNE, self._inner.trim_audit(before, dry_run=dry_run)
        )

    async def aclose(self) -> None:
        """See ``StateStore.aclose``."""
        await self._inner.aclose()

    async def _measure(self, operation: StateOperation, call: Awaitable[_T]) -> _T:
        # Wall time, not trio's clock: the work runs in a real thread even under a MockClock.
        started = time.monotonic()
        try:
            return await call
        except StateError:
            self._metrics.state_error(operation)
            raise
        finally:
            self._metrics.state_operation(operation, time.monotonic() - started)
