"""The ``StateStore`` protocol: what popproxy remembers about upstream messages.

Per upstream account and UIDL the store keeps when popproxy first saw the message
and its size, when each local user retrieved it, for which local users it is
hidden, and when (and by which rule) it was deleted upstream. Retention policy
(``popproxy/policy``) reads these facts at login; a session writes what its QUIT
did in one transaction, after the upstream has answered its QUIT with ``+OK``
(DESIGN.md, "Session data flow", step 6). A session that ends any other way
writes nothing (DESIGN.md, invariant 2).

Backends: sqlite (``sqlite.py``, the embedded default). A shared PostgreSQL
backend follows later; nothing here is specific to sqlite, and the store's test
suite (``tests/state``) runs against every backend it is given.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


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


@dataclass(frozen=True, slots=True)
class SeenMessage:
    """One entry of the upstream listing a session saw at login (RFC 1939 §7 UIDL, §5 LIST)."""

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

    async def aclose(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
        ...
