"""The ``StateStore`` protocol: what popproxy remembers about upstream messages.

Per upstream account and UIDL the store keeps when popproxy first saw the message
and its size, when each local user retrieved it, for which local users it is
hidden, and when (and by which rule) it was deleted upstream. Per local user it
also keeps the client addresses the user lately logged in from (the known-good
sources that the user-name lockout spares, popproxy/auth/known_sources.py). Retention policy
(``popproxy/policy``) reads these facts at login; a session writes what its QUIT
did in one transaction, after the upstream has answered its QUIT with ``+OK``
(DESIGN.md, "Session data flow", step 6). A session that ends any other way
writes nothing (DESIGN.md, invariant 2).

The gateway (``popproxy/gateway/``) keeps its own facts per source (local user,
upstream, upstream user): each listed (UIDL, size) with its first-seen time and how
far its delivery into the user's Maildir got (``FetchState``), the deletions its
polls made upstream, and each source's last poll. docs/gateway.md has the crash
table these states serve.

Every hide and upstream deletion is also a row of the audit log (``AuditEntry``),
which ``audit`` reads for ``popproxy audit`` and ``trim_audit`` bounds to
``state.audit_retention_days`` (docs/state.md, "What is kept for how long").

Backends: sqlite (``sqlite/``, the embedded default) and PostgreSQL (``postgres/``,
shared by several processes), each split by the same jobs and sharing the calls'
checks (``frontend.py``, ``checks.py``). Nothing here is specific to a backend, and
the store's test suite (``tests/state``) runs against every backend it is given.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol


@dataclass(frozen=True, slots=True)
class AccountKey:
    """One upstream account: the upstream's name in config and the upstream user.

    Several local users may share one account (DESIGN.md, "Config"); facts about a
    message belong to the account, retrievals and hides to a local user.
    """

    upstream: str
    upstream_user: str


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What the store knows about one UIDL of one account, as seen by one local user.

    Times are timezone-aware UTC. ``retrieved_at`` and ``hidden`` are this local
    user's; ``deleted_upstream_at`` is the account's (a UIDL still listed after
    that means the upstream did not apply the deletion).
    """

    uid: str
    size: int
    first_seen: datetime
    last_seen: datetime
    retrieved_at: datetime | None = None
    hidden: bool = False
    deleted_upstream_at: datetime | None = None


class SeenMessage(NamedTuple):
    """One entry of the upstream listing a session saw at login (RFC 1939 §7 UIDL, §5 LIST).

    A named tuple, not a frozen dataclass: a QUIT records up to 100,000 of them.
    """

    uid: str
    size: int


@dataclass(frozen=True, slots=True)
class Disposal:
    """A message a QUIT hid for its user or deleted upstream, and the rule that said so."""

    uid: str
    rule: str


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """Everything one QUIT changes, written in one transaction.

    ``seen`` is the whole upstream listing of the session: new UIDLs get
    ``first_seen = at`` and their size, known ones ``last_seen = at``.
    ``retrieved`` holds the UIDLs the local user retrieved completely (RETR).
    ``hidden`` are hidden for ``user`` for good; ``deleted_upstream`` were deleted
    upstream by this QUIT. ``session_id`` ties each row to the session's log line.
    """

    account: AccountKey
    user: str
    session_id: str
    at: datetime
    seen: tuple[SeenMessage, ...] = ()
    retrieved: frozenset[str] = frozenset()
    hidden: tuple[Disposal, ...] = ()
    deleted_upstream: tuple[Disposal, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One row of ``popproxy state show``: a UIDL of an account with its history."""

    account: AccountKey
    uid: str
    size: int
    first_seen: datetime
    last_seen: datetime
    retrieved_by: tuple[tuple[str, datetime], ...] = ()
    hidden_for: tuple[tuple[str, str, datetime], ...] = ()  # (user, rule, at)
    deleted_upstream_at: datetime | None = None
    deleted_by_rule: str | None = None
    # When the account's latest listing was recorded (a UIDL seen before that is
    # missing from it); None where a backend does not know.
    account_last_listed: datetime | None = None

    def is_gone(self, before: datetime) -> bool:
        """Whether ``prune(before)`` forgets this UIDL: last listed before ``before`` and
        missing from its account's latest listing (so an account nobody logged in to
        for a while keeps its hides)."""
        return (
            self.account_last_listed is not None
            and self.last_seen < before
            and self.last_seen < self.account_last_listed
        )


@dataclass(frozen=True, slots=True)
class SourceKey:
    """One gateway source: the local user whose Maildir it fills, and the upstream account."""

    user: str
    upstream: str
    upstream_user: str

    @property
    def label(self) -> str:
        """How logs name it (never a metric label: it holds a user name)."""
        return f"{self.upstream}/{self.upstream_user}"


class FetchState(enum.Enum):
    """How far the gateway got with one (UIDL, size) of a source (docs/gateway.md, crash table)."""

    LISTED = "listed"  # seen in a listing, not in the Maildir (new, or skipped by policy)
    STAGED = "staged"  # its file is in the Maildir's tmp/, fsync'ed; being moved to new/
    DELIVERED = "delivered"  # in new/ (a client may have moved or deleted it since), fsync'ed


@dataclass(frozen=True, slots=True)
class FetchFacts:
    """What the store knows about one UIDL of a gateway source.

    ``file_name`` is the Maildir file name it is (being) delivered under, set from
    STAGED on; ``deleted_upstream_at`` is when a poll's QUIT deleted it upstream.
    """

    uid: str
    size: int
    first_seen: datetime
    state: FetchState
    file_name: str | None = None
    deleted_upstream_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StagedMessage:
    """A message whose file is durable in ``tmp/`` under ``file_name``, about to be published."""

    uid: str
    size: int
    file_name: str


@dataclass(frozen=True, slots=True)
class PollSummary:
    """One finished poll of a source, for ``popproxy state show`` (``result``: a PollResult)."""

    at: datetime
    result: str
    fetched: int = 0
    skipped: int = 0
    deleted: int = 0
    fetched_bytes: int = 0


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """A gateway source as the store knows it: its last poll and its messages by state."""

    source: SourceKey
    last_poll: PollSummary | None
    last_success_at: datetime | None
    listed: int
    delivered: int
    deleted_upstream: int


class AuditAction(enum.Enum):
    """What a row of the audit log (table ``disposals``) says was done to a message."""

    HIDE = "hide"  # hidden for good for the row's local user
    DELETE_UPSTREAM = "delete_upstream"  # deleted on the upstream account


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the audit log: a hide or an upstream deletion and the rule that said so.

    ``session_id`` is the ``session=`` of the log lines of the session (or gateway
    poll) that did it; ``size`` is the size of the content it applied to (a reused
    UIDL keeps the old content's rows).
    """

    at: datetime
    session_id: str
    user: str
    account: AccountKey
    uid: str
    size: int
    rule: str
    action: AuditAction


# Rows one ``audit`` call returns at most (``popproxy audit --limit`` is bounded by it).
MAX_AUDIT_ROWS = 100_000


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which audit rows ``StateStore.audit`` returns: each field given narrows it
    (exact matches; ``since`` is inclusive), newest first, at most ``limit``."""

    user: str | None = None
    upstream: str | None = None
    rule: str | None = None
    uid: str | None = None
    since: datetime | None = None
    limit: int = 100


class StateError(Exception):
    """The store could not be read or written; the text is safe for logs, no secrets."""


class StateStore(Protocol):
    """Facts about upstream messages that outlive sessions and restarts."""

    async def facts(
        self, account: AccountKey, user: str, uids: Collection[str]
    ) -> Mapping[str, MessageFacts]:
        """The facts for those of ``uids`` the store knows, as seen by local ``user``.

        Unknown UIDLs are simply absent (never seen by a session that QUIT).
        Raises ``StateError``.
        """
        ...

    async def record(self, record: SessionRecord) -> None:
        """Write what one QUIT did, all of it or nothing, durably before returning.

        Raises ``StateError``; then nothing of ``record`` is stored.
        """
        ...

    async def messages(self, account: AccountKey | None = None) -> Sequence[StoredMessage]:
        """Every stored UIDL, of one account or of all, for ``popproxy state show``."""
        ...

    async def prune(self, gone_before: datetime) -> int:
        """Forget UIDLs last seen upstream before ``gone_before`` and missing from their
        account's latest listing (``StoredMessage.is_gone``); returns how many."""
        ...

    async def known_source(self, user: str, source: str, since: datetime) -> datetime | None:
        """When local ``user`` last logged in successfully from ``source`` (a client
        address key, ``PeerAddress.limit_key``), if that was at or after ``since``;
        None otherwise. Raises ``StateError``."""
        ...

    async def remember_source(
        self, user: str, source: str, at: datetime, *, keep: int, forget_before: datetime
    ) -> None:
        """Record, in one transaction, that ``user`` logged in from ``source`` at ``at``
        (a later time already stored stays), then forget the user's sources last used
        before ``forget_before`` and all but the ``keep`` most recent. Raises ``StateError``."""
        ...

    async def audit(self, query: AuditQuery) -> Sequence[AuditEntry]:
        """The audit log's rows that ``query`` selects, newest first (by time, then by
        the order they were written), at most ``query.limit``. Reads only."""
        ...

    async def trim_audit(self, before: datetime, *, dry_run: bool = False) -> int:
        """Delete the audit rows older than ``before`` (``state.audit_retention_days``);
        returns how many (with ``dry_run``, only counts them)."""
        ...

    async def aclose(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
        ...


class GatewayStore(Protocol):
    """The gateway's facts per source (docs/gateway.md, docs/state.md): what is new,
    what a poll left STAGED, what is DELIVERED, what was deleted upstream."""

    async def gateway_listing(
        self, source: SourceKey, listing: Sequence[SeenMessage], at: datetime
    ) -> Mapping[str, FetchFacts]:
        """Record a poll's listing and return the facts of every listed UIDL.

        A new (UIDL, size) is LISTED with ``first_seen = at``; a UIDL listed with
        another size than stored is new content (RFC 1939 §7 lets a server reuse a
        UIDL) and starts over as LISTED. The source's STAGED rows must have been
        settled before (``gateway_staged``). Raises ``StateError``.
        """
        ...

    async def gateway_facts(
        self, source: SourceKey, uids: Collection[str]
    ) -> Mapping[str, FetchFacts]:
        """The facts of those of ``uids`` the store knows for ``source``, without
        writing anything (``popproxy explain``). Unknown UIDLs are absent."""
        ...

    async def gateway_staged(self, source: SourceKey) -> Sequence[FetchFacts]:
        """The source's STAGED messages: what a poll that died left to settle."""
        ...

    async def gateway_stage(
        self, source: SourceKey, staged: Sequence[StagedMessage], at: datetime
    ) -> None:
        """Mark these LISTED messages STAGED under their file names, durably, in one
        transaction (the intent written before their files are moved to ``new/``)."""
        ...

    async def gateway_settle(
        self,
        source: SourceKey,
        delivered: Collection[str],
        returned: Collection[str],
        at: datetime,
    ) -> None:
        """STAGED -> DELIVERED for ``delivered``, STAGED -> LISTED for ``returned``
        (their file is nowhere: fetch again), in one durable transaction."""
        ...

    async def gateway_deleted(
        self, source: SourceKey, deleted: Sequence[Disposal], at: datetime, *, session_id: str
    ) -> None:
        """Record the deletions a poll's QUIT made upstream (after its ``+OK``), and each
        in the audit log (``StateStore.audit``) under the poll's ``session_id``."""
        ...

    async def gateway_poll_finished(self, source: SourceKey, summary: PollSummary) -> None:
        """Record the source's last poll (and, if it succeeded, its last success)."""
        ...

    async def gateway_sources(self) -> Sequence[SourceStatus]:
        """Every gateway source the store knows, for ``popproxy state show``."""
        ...


class StoreBackend(StateStore, GatewayStore, Protocol):
    """A backend of the state store: the facts of proxy-mode sessions and of the gateway."""
