"""The login throttle as a login sees it: one per process, or shared by every instance.

``LoginThrottle`` is what the login orchestration (:mod:`popproxy.auth.login`) asks
before it hashes and tells afterwards. ``LocalThrottle`` keeps the counts in this
process (:class:`popproxy.auth.throttle.ThrottleTable`, trio's clock): right for one
process, the embedded default. ``SharedThrottle`` keeps the failure counts and
lockouts of every user name and client address in a shared store (PostgreSQL,
``popproxy/state/postgres/shared.py``) with the store's clock, so N instances behind a
load balancer allow an attacker the guesses of one, not N times as many
(docs/scaling.md). The decisions are the same pure rules (``throttle.py``) either way.

What stays per process in ``SharedThrottle``: the last few failed credentials of
each key (keyed digests from :mod:`popproxy.auth.cache`, whose key never leaves the
process and is never stored), used only to recognise a retry of the same wrong
password. A client retrying an old password through N instances is so counted at
most N times for it, instead of once.

When the shared store cannot be reached, a ``SharedThrottle`` raises
``ThrottleUnavailable`` and the login is refused with ``-ERR [SYS/TEMP]`` before any
hashing: no instance guesses on its own while the counts cannot be shared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

import trio

from popproxy.auth.throttle import (
    Failures,
    LockScope,
    ThrottleDecision,
    ThrottlePolicy,
    ThrottleTable,
    decide,
    remembered_seconds,
)

# How often an instance deletes the shared rows that no longer matter (every instance
# does; a prune is one bounded statement, cheap when there is nothing to delete).
PRUNE_INTERVAL_SECONDS = 300

# One row of the shared counts: what it is keyed by, and the user name or address.
FailureKey = tuple[LockScope, str]

_T = TypeVar("_T")
_R_co = TypeVar("_R_co", covariant=True)


class ThrottleUnavailable(Exception):
    """The shared failure counts cannot be read or written; the message says why."""


class LoginThrottle(Protocol):
    """Decide before hashing; record the failure or the success after."""

    async def decide(self, source: str, user: str, policy: ThrottlePolicy) -> ThrottleDecision:
        """The delay and lockout for an attempt by ``source`` (``PeerAddress.limit_key``)
        as ``user``; ``ThrottleUnavailable`` when a shared store cannot be asked."""
        ...

    async def failure(
        self, source: str, user: str, credential: bytes, policy: ThrottlePolicy
    ) -> tuple[LockScope, ...]:
        """Record a failed password check; return the lockouts it just started."""
        ...

    async def success(self, source: str, policy: ThrottlePolicy, *, penalized: bool) -> None:
        """A password was right: lift the address's penalty (not its lockout count).
        ``penalized``: the attempt's decision carried a delay (without one there is no
        penalty to lift, and a shared store is not asked)."""
        ...


class LocalThrottle:
    """``LoginThrottle`` over this process's ``ThrottleTable`` (trio's clock)."""

    def __init__(self, table: ThrottleTable | None = None) -> None:
        self.table = table if table is not None else ThrottleTable()

    async def decide(self, source: str, user: str, policy: ThrottlePolicy) -> ThrottleDecision:
        """See ``LoginThrottle.decide``."""
        return self.table.decide(source, user, now=trio.current_time(), policy=policy)

    async def failure(
        self, source: str, user: str, credential: bytes, policy: ThrottlePolicy
    ) -> tuple[LockScope, ...]:
        """See ``LoginThrottle.failure``."""
        return self.table.failure(source, user, credential, now=trio.current_time(), policy=policy)

    async def success(self, source: str, policy: ThrottlePolicy, *, penalized: bool) -> None:
        """See ``LoginThrottle.success`` (the table forgets the recent failed passwords
        of the address too, penalized or not)."""
        self.table.success(source, now=trio.current_time(), policy=policy)


class FailureChange(Protocol[_R_co]):
    """A change of shared counts: (now, the rows read) -> (result, rows to write; None
    deletes the row)."""

    def __call__(
        self, now: float, rows: Mapping[FailureKey, Failures]
    ) -> tuple[_R_co, Mapping[FailureKey, Failures | None]]: ...


class FailureBackend(Protocol):
    """Where shared counts live (``popproxy.state.postgres.shared.PostgresShared``)."""

    async def change_failures(
        self, keys: Sequence[FailureKey], change: FailureChange[_T], *, writes: bool
    ) -> _T:
        """Run ``change`` on the rows of ``keys`` in one transaction, with the store's
        clock as ``now``; ``ThrottleUnavailable`` when the store cannot be used."""
        ...

    async def prune_failures(self, remembered_seconds: float) -> int:
        """Forget rows that no longer matter; return how many."""
        ...


class SharedThrottle:
    """``LoginThrottle`` whose counts live in a shared store (see the module doc)."""

    def __init__(self, backend: FailureBackend, local: ThrottleTable | None = None) -> None:
        self._backend = backend
        # Only for the recent failed credentials (a retry is not a new guess).
        self._local = local if local is not None else ThrottleTable()

    async def decide(self, source: str, user: str, policy: ThrottlePolicy) -> ThrottleDecision:
        """See ``LoginThrottle.decide``."""
        keys = ((LockScope.ADDRESS, source), (LockScope.USER, user))

        def read(
            now: float, rows: Mapping[FailureKey, Failures]
        ) -> tuple[ThrottleDecision, Mapping[FailureKey, Failures | None]]:
            by_source, by_user = (rows.get(key) for key in keys)
            return decide(by_source, by_user, now=now, policy=policy), {}

        return await self._backend.change_failures(keys, read, writes=False)

    async def failure(
        self, source: str, user: str, credential: bytes, policy: ThrottlePolicy
    ) -> tuple[LockScope, ...]:
        """See ``LoginThrottle.failure``."""
        local_now = trio.current_time()
        user_repeats, source_repeats = self._local.repeats(
            source, user, credential, now=local_now, policy=policy
        )
        self._local.failure(source, user, credential, now=local_now, policy=policy)
        counted = (
            ((LockScope.USER, user), user_repeats, policy.lockout_failures),
            ((LockScope.ADDRESS, source), source_repeats, policy.address_lockout_failures),
        )

        def count(
            now: float, rows: Mapping[FailureKey, Failures]
        ) -> tuple[tuple[LockScope, ...], Mapping[FailureKey, Failures | None]]:
            started: list[LockScope] = []
            writes: dict[FailureKey, Failures | None] = {}
            for key, repeated, threshold in counted:
                value, locks = rows.get(key, Failures()).failed(
                    repeated=repeated, now=now, policy=policy, threshold=threshold
                )
                writes[key] = value
                if locks:
                    started.append(key[0])
            return tuple(started), writes

        return await self._backend.change_failures([k for k, _, _ in counted], count, writes=True)

    async def success(self, source: str, policy: ThrottlePolicy, *, penalized: bool) -> None:
        """See ``LoginThrottle.success``: the store is written only for an address that
        had a penalty (most logins write nothing and make no row)."""
        self._local.success(source, now=trio.current_time(), policy=policy)
        if not penalized:
            return
        key = (LockScope.ADDRESS, source)

        def lift(
            now: float, rows: Mapping[FailureKey, Failures]
        ) -> tuple[None, Mapping[FailureKey, Failures | None]]:
            known = rows.get(key)
            return None, {} if known is None else {key: known.succeeded()}

        await self._backend.change_failures([key], lift, writes=True)

    async def prune(self, policy: ThrottlePolicy) -> int:
        """Forget shared rows that no longer matter (run now and then; see postgres/shared.py)."""
        return await self._backend.prune_failures(remembered_seconds(policy))

    async def run(
        self,
        policy: Callable[[], ThrottlePolicy],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Prune every ``PRUNE_INTERVAL_SECONDS`` with the knobs ``policy()`` gives then
        (a reload may change them), until cancelled; a store that is down is tried
        again at the next turn."""
        task_status.started()
        while True:  # ends: cancelled with the server
            await trio.sleep(PRUNE_INTERVAL_SECONDS)
            with contextlib.suppress(ThrottleUnavailable):
                await self.prune(policy())
