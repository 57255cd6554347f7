"""The ``StoreBackend`` methods both backends share: check the input, then run the
backend's query on one connection in a worker thread.

A backend (``sqlite/store.py``, ``postgres/store.py``) subclasses ``StoreFrontend``
and hands it its ``Queries``: the functions that do one call's whole work on one
connection, and ``stored``, which checks a time and turns it into what those
functions take (sqlite's sortable text, PostgreSQL's ``timestamptz``). The backend
keeps connection handling (``_in_worker``, ``_release``), migrations and ``record``
(sqlite commits concurrent records in groups). Input is checked here, on the trio
thread and before any thread or transaction is taken (``checks.py``), so both
backends refuse the same calls with the same ``ValueError``. Each call runs in the
backend's ``Workers``: at most its thread count at once, never on the trio thread.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Protocol, TypeVar

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
    StoredMessage,
)
from popproxy.state.checks import (
    MAX_USER_OCTETS,
    PRUNE_BATCH,
    check_account,
    check_audit_query,
    check_aware,
    check_disposals,
    check_listing,
    check_login_source,
    check_source,
    check_text,
    check_uids,
)
from popproxy.state.workers import Workers

C = TypeVar("C")  # one connection of the backend
W = TypeVar("W")  # a time as the backend's query functions take it
_T = TypeVar("_T")
_C_contra = TypeVar("_C_contra", contravariant=True)
_W_contra = TypeVar("_W_contra", contravariant=True)


@dataclass(frozen=True, slots=True)
class Move:
    """One state change of a gateway message: to ``state`` (with a file name, or None
    to keep it) from ``before``; ``size`` None matches any size."""

    state: str
    file_name: str | None
    uid: str
    size: int | None
    before: str


class RememberSource(Protocol[_C_contra, _W_contra]):
    """A backend's ``remember_source`` query (``StateStore.remember_source``)."""

    def __call__(
        self,
        conn: _C_contra,
        user: str,
        source: str,
        at: _W_contra,
        /,
        *,
        keep: int,
        cutoff: _W_contra,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Queries(Generic[C, W]):
    """One backend's query functions, each the work of one call on connection ``C``
    (its own transaction), and ``stored``: a time checked (``check_aware``) and made
    the ``W`` they take."""

    stored: Callable[[datetime], W]
    facts: Callable[[C, AccountKey, str, list[str]], Mapping[str, MessageFacts]]
    messages: Callable[[C, AccountKey | None], Sequence[StoredMessage]]
    prune_batch: Callable[[C, W], int]
    gateway_listing: Callable[[C, SourceKey, Sequence[SeenMessage], W], Mapping[str, FetchFacts]]
    gateway_facts: Callable[[C, SourceKey, list[str]], Mapping[str, FetchFacts]]
    gateway_staged: Callable[[C, SourceKey], Sequence[FetchFacts]]
    gateway_transition: Callable[[C, SourceKey, Sequence[Move], W], None]
    gateway_deleted: Callable[[C, SourceKey, Sequence[Disposal], datetime, str], None]
    gateway_poll_finished: Callable[[C, SourceKey, PollSummary], None]
    gateway_sources: Callable[[C], Sequence[SourceStatus]]
    known_source: Callable[[C, str, str, W], datetime | None]
    remember_source: RememberSource[C, W]
    audit: Callable[[C, AuditQuery], Sequence[AuditEntry]]
    count_audit: Callable[[C, W], int]
    trim_audit_batch: Callable[[C, W], int]


class StoreFrontend(abc.ABC, Generic[C, W]):
    """The ``StoreBackend`` calls over a backend's ``Queries`` and worker threads."""

    def __init__(self, queries: Queries[C, W], *, threads: int) -> None:
        """Run ``queries`` in at most ``threads`` worker threads at once."""
        self._queries = queries
        self._workers = Workers(threads)

    @abc.abstractmethod
    async def record(self, record: SessionRecord) -> None:
        """See ``StateStore.record``."""

    @abc.abstractmethod
    def _in_worker(self, work: Callable[[C], _T]) -> _T:
        """Run ``work`` on a connection, in a worker thread; the driver's errors become
        ``StateError``."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Close every connection (in a worker thread, once no call runs)."""

    async def _run(self, work: Callable[[C], _T]) -> _T:
        return await self._workers.run(functools.partial(self._in_worker, work))

    async def aclose(self) -> None:
        """Wait for running calls, then close every connection."""
        await self._workers.close(self._release)

    async def _batches(self, batch: Callable[[C], int]) -> int:
        """Run ``batch`` (a delete of at most ``PRUNE_BATCH`` rows, one transaction)
        until it deletes fewer; how many rows in all."""
        total = 0
        while True:  # ends: each pass deletes at least one row or stops
            deleted = await self._run(batch)
            total += deleted
            if deleted < PRUNE_BATCH:
                return total

    # -- the StateStore protocol -------------------------------------------------------

    async def facts(
        self, account: AccountKey, user: str, uids: Collection[str]
    ) -> Mapping[str, MessageFacts]:
        """The facts for those of ``uids`` the store knows, as seen by local ``user``."""
        check_account(account)
        check_text("user", user, MAX_USER_OCTETS)
        wanted = list(dict.fromkeys(uids))
        check_uids(wanted)
        return await self._read_facts(account, user, wanted)

    async def _read_facts(
        self, account: AccountKey, user: str, wanted: list[str]
    ) -> Mapping[str, MessageFacts]:
        """``facts`` once checked: the query in a worker thread (a backend may answer
        some otherwise)."""
        return await self._run(lambda conn: self._queries.facts(conn, account, user, wanted))

    async def messages(self, account: AccountKey | None = None) -> Sequence[StoredMessage]:
        """Every stored UIDL (of ``account``, or all), at most ``MAX_LISTED_MESSAGES``."""
        if account is not None:
            check_account(account)
        return await self._run(lambda conn: self._queries.messages(conn, account))

    async def prune(self, gone_before: datetime) -> int:
        """Forget UIDLs gone from the upstream (``StoredMessage.is_gone``), ``PRUNE_BATCH``
        rows a transaction."""
        cutoff = self._queries.stored(gone_before)
        return await self._batches(lambda conn: self._queries.prune_batch(conn, cutoff))

    async def known_source(self, user: str, source: str, since: datetime) -> datetime | None:
        """When ``user`` last logged in from ``source``, if at or after ``since``."""
        check_login_source(user, source)
        cutoff = self._queries.stored(since)
        return await self._run(lambda conn: self._queries.known_source(conn, user, source, cutoff))

    async def remember_source(
        self, user: str, source: str, at: datetime, *, keep: int, forget_before: datetime
    ) -> None:
        """Record a login of ``user`` from ``source``; keep the ``keep`` latest (one
        transaction)."""
        check_login_source(user, source, keep)
        when, cutoff = self._queries.stored(at), self._queries.stored(forget_before)
        await self._run(
            lambda conn: self._queries.remember_source(
                conn, user, source, when, keep=keep, cutoff=cutoff
            )
        )

    async def audit(self, query: AuditQuery) -> Sequence[AuditEntry]:
        """The audit rows ``query`` selects, newest first (``StateStore.audit``)."""
        check_audit_query(query)
        return await self._run(lambda conn: self._queries.audit(conn, query))

    async def trim_audit(self, before: datetime, *, dry_run: bool = False) -> int:
        """Delete audit rows older than ``before``, ``PRUNE_BATCH`` rows a transaction
        (with ``dry_run``, count them)."""
        cutoff = self._queries.stored(before)
        if dry_run:
            return await self._run(lambda conn: self._queries.count_audit(conn, cutoff))
        return await self._batches(lambda conn: self._queries.trim_audit_batch(conn, cutoff))

    # -- the GatewayStore protocol -----------------------------------------------------

    async def gateway_listing(
        self, source: SourceKey, listing: Sequence[SeenMessage], at: datetime
    ) -> Mapping[str, FetchFacts]:
        """See ``GatewayStore.gateway_listing``."""
        check_source(source)
        check_listing(listing)
        when = self._queries.stored(at)
        return await self._run(
            lambda conn: self._queries.gateway_listing(conn, source, listing, when)
        )

    async def gateway_facts(
        self, source: SourceKey, uids: Collection[str]
    ) -> Mapping[str, FetchFacts]:
        """See ``GatewayStore.gateway_facts``."""
        check_source(source)
        wanted = list(dict.fromkeys(uids))
        check_uids(wanted)
        return await self._run(lambda conn: self._queries.gateway_facts(conn, source, wanted))

    async def gateway_staged(self, source: SourceKey) -> Sequence[FetchFacts]:
        """See ``GatewayStore.gateway_staged``."""
        check_source(source)
        return await self._run(lambda conn: self._queries.gateway_staged(conn, source))

    async def gateway_stage(
        self, source: SourceKey, staged: Sequence[StagedMessage], at: datetime
    ) -> None:
        """See ``GatewayStore.gateway_stage``."""
        check_source(source)
        moves = [Move("staged", m.file_name, m.uid, m.size, "listed") for m in staged]
        await self._transition(source, moves, at)

    async def gateway_settle(
        self,
        source: SourceKey,
        delivered: Collection[str],
        returned: Collection[str],
        at: datetime,
    ) -> None:
        """See ``GatewayStore.gateway_settle``."""
        check_source(source)
        moves = [Move("delivered", None, uid, None, "staged") for uid in delivered]
        moves += [Move("listed", None, uid, None, "staged") for uid in returned]
        await self._transition(source, moves, at)

    async def _transition(self, source: SourceKey, moves: list[Move], at: datetime) -> None:
        when = self._queries.stored(at)
        await self._run(lambda conn: self._queries.gateway_transition(conn, source, moves, when))

    async def gateway_deleted(
        self, source: SourceKey, deleted: Sequence[Disposal], at: datetime, *, session_id: str
    ) -> None:
        """See ``GatewayStore.gateway_deleted``."""
        check_source(source)
        check_disposals(deleted, session_id)
        check_aware(at)
        await self._run(
            lambda conn: self._queries.gateway_deleted(conn, source, deleted, at, session_id)
        )

    async def gateway_poll_finished(self, source: SourceKey, summary: PollSummary) -> None:
        """See ``GatewayStore.gateway_poll_finished``."""
        check_source(source)
        check_aware(summary.at)
        await self._run(lambda conn: self._queries.gateway_poll_finished(conn, source, summary))

    async def gateway_sources(self) -> Sequence[SourceStatus]:
        """See ``GatewayStore.gateway_sources``."""
        return await self._run(self._queries.gateway_sources)
