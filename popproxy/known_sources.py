"""Known-good sources: the client addresses each user lately logged in from.

The user-name lockout (popproxy/auth/throttle.py) stops guessing at one account from
many addresses, but on its own it lets anyone who knows a user name lock its owner
out (DESIGN.md, invariant 8). Following OWASP's advice on lockouts, popproxy
remembers per user the client addresses (``PeerAddress.limit_key``: IPv4, or the
IPv6 /64) of successful logins in the last ``limits.auth_known_source_days``, at
most ``limits.auth_known_sources_per_user`` of them, and a login from one of those
is spared that user name's lockout. It still waits out its address's penalty and
is still stopped by its address's lockout; a login from any other address stays
locked out (docs/security.md, "Known sources").

The memory lives in the state store (``StateStore.known_source`` and
``remember_source``), so it survives restarts and is shared by every instance on
one PostgreSQL store. The store stays off the common path: a login reads it only
when its user name is locked out, and a successful login writes only for a source
that is new (or whose last recorded login is more than ``REFRESH`` old, so a source
in daily use never ages out); each process remembers what it read or wrote for
``MAX_REMEMBERED_PAIRS`` (user, source) pairs. A store that cannot be used makes
every source unknown (a lockout stays a lockout) and is logged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from popproxy.config import LimitsConfig
from popproxy.state.base import StateError, StateStore

log = logging.getLogger("popproxy.known_sources")

# A pair in use is written again at most this often (at most half the window, so a
# source used every day is never forgotten).
REFRESH = timedelta(days=1)
# (user, source) pairs a process remembers it read or wrote; each about 300 octets
# with a long user name, so 3 MB at most. Beyond it the least recently used goes.
MAX_REMEMBERED_PAIRS = 10_000


class StoreSource(Protocol):
    """Where the store comes from (``popproxy.state.opener.StoreOpener``)."""

    async def get(self) -> StateStore:
        """The open store; ``StateError`` if it cannot be opened."""
        ...


@dataclass(frozen=True, slots=True)
class KnownSourcePolicy:
    """The two knobs, from ``limits.auth_known_source*``."""

    days: int  # 0: no source is ever known
    per_user: int

    @classmethod
    def of(cls, limits: LimitsConfig) -> KnownSourcePolicy:
        """The policy ``limits`` asks for."""
        return cls(limits.auth_known_source_days, limits.auth_known_sources_per_user)

    @property
    def window(self) -> timedelta:
        """How long after a successful login its source stays known."""
        return timedelta(days=self.days)

    @property
    def refresh(self) -> timedelta:
        """How old a pair's recorded login may get before a success writes it again."""
        return min(REFRESH, self.window / 2)


class KnownSources:
    """The known-good sources of every user, one per process (it outlives reloads).

    ``knows`` when a user name is locked out; ``logged_in`` after a right password.
    Both are what ``popproxy.auth.login.SourceMemory`` asks for.
    """

    def __init__(
        self,
        store: StoreSource,
        policy: KnownSourcePolicy,
        clock: Callable[[], datetime],
        *,
        max_pairs: int = MAX_REMEMBERED_PAIRS,
    ) -> None:
        self._store = store
        self.policy = policy
        self._clock = clock
        self._max_pairs = max_pairs
        # (user, source) -> the latest successful login this process knows of.
        self._pairs: OrderedDict[tuple[str, str], datetime] = OrderedDict()

    def adopt(self, limits: LimitsConfig) -> None:
        """Apply the limits of a config just swapped in (a reload)."""
        self.policy = KnownSourcePolicy.of(limits)

    async def knows(self, user: str, source: str, *, session: str) -> bool:
        """Whether ``user`` logged in successfully from ``source`` within the window:
        this process's memory first, else one read of the store. ``session`` names
        the session in a log line if the store cannot be read."""
        if self.policy.days <= 0 or not user:  # "": a name outside the safe set
            return False
        since = self._clock() - self.policy.window
        if self._recalled(user, source, since):
            return True
        last = await self._read(user, source, since, session)
        return last is not None

    async def logged_in(self, user: str, source: str, *, session: str) -> None:
        """``user`` just logged in from ``source``: remember it, writing to the store
        only if the store does not already know it from the last ``refresh``."""
        if self.policy.days <= 0 or not user:
            return
        now = self._clock()
        fresh = now - self.policy.refresh
        if self._recalled(user, source, fresh):
            return
        try:
            store = await self._store.get()
            last = await store.known_source(user, source, fresh)
            if last is None:  # new, or not used for a while: the one write
                await store.remember_source(
                    user,
                    source,
                    now,
                    keep=self.policy.per_user,
                    forget_before=now - self.policy.window,
                )
                last = now
        except StateError as exc:
            # The login goes on; this source is just not remembered this time.
            log.warning(
                "known_source_unrecorded",
                extra={"fields": {"session": session, "reason": str(exc)}},
            )
            return
        self._note(user, source, last)

    def _recalled(self, user: str, source: str, since: datetime) -> bool:
        last = self._pairs.get((user, source))
        if last is None or last < since:
            return False
        self._pairs.move_to_end((user, source))
        return True

    async def _read(self, user: str, source: str, since: datetime, session: str) -> datetime | None:
        try:
            store = await self._store.get()
            last = await store.known_source(user, source, since)
        except StateError as exc:
            # Unknown, then: a lockout stays a lockout while the store is away.
            log.warning(
                "known_source_unavailable",
                extra={"fields": {"session": session, "reason": str(exc)}},
            )
            return None
        if last is not None:
            self._note(user, source, last)
        return last

    def _note(self, user: str, source: str, at: datetime) -> None:
        key = (user, source)
        known = self._pairs.get(key)
        self._pairs[key] = at if known is None else max(known, at)
        self._pairs.move_to_end(key)
        while len(self._pairs) > self._max_pairs:
            self._pairs.popitem(last=False)
