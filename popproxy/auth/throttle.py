"""Login throttling and lockout: pure decisions over a bounded table, the clock injected.

The model is Dovecot's authentication penalty (doc.dovecot.org, "Authentication
Penalty"): failures from one client address make its next attempts wait before the
password is even looked at, 2 s after the first failure, doubling per failure, capped
at 15 s, back to nothing after a success or once the penalty has run its course
(initial + 4 + 8 + ... + max seconds without a failure, Dovecot's
``AUTH_PENALTY_TIMEOUT``). Retrying one of the last few failed credentials adds no
penalty, so a client configured with an old password is not slowed further and
further (Dovecot's ``CHECKSUM_VALUE_PTR_COUNT``).

On top of that, a lockout that Dovecot leaves to fail2ban: ``lockout_failures``
distinct failures within ``lockout_window_seconds`` lock the *user name* (whether or
not such a user exists, so a lockout says nothing about which users do), and,
counted separately, ``address_lockout_failures`` lock the *client address*, both for
``lockout_seconds``. The address count is higher by default: one address may carry
many honest users (a NAT, a webmail front end), each of whom may mistype. A locked
attempt is refused without hashing. A success does not clear the lockout counts
(they age out of the window): otherwise a guesser holding one valid account could
reset its address between guesses.

Memory is bounded: each table tracks at most ``MAX_TRACKED_KEYS`` keys, evicting the
one whose last failure is oldest, and forgets a key once nothing about it matters
any more. A flood of random user names costs a fixed amount of memory; to evict a
locked-out entry it would need that many distinct failing keys, which the address
lockout stops after ``address_lockout_failures`` per address.

The rules work on ``Failures`` values (``decide``, ``Failures.failed``,
``Failures.succeeded``); ``ThrottleTable`` keeps one process's, and a shared store
keeps every instance's (``popproxy/auth/throttling.py``, docs/scaling.md) with the
same rules.

No I/O and no clock here: callers pass ``now`` (trio.current_time() in one process,
the database's clock for shared counts).
"""

from __future__ import annotations

import enum
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field, replace

# Keys (addresses, or user names) each table tracks. A tracked key costs about 1 KiB
# with a long user name and the default lockout counts, 8 octets more per failure
# counted (at most 100 for a name, 500 for an address), so both tables together stay
# near 29 MB (66 MB at the largest counts) whatever a flood sends (docs/security.md).
MAX_TRACKED_KEYS = 10_000
# Retrying one of the last 10 failed credentials adds no penalty and no lockout count
# (Dovecot's CHECKSUM_VALUE_PTR_COUNT in src/anvil/penalty.c).
RECENT_FAILED_CREDENTIALS = 10
# Only this much of a credential digest is kept to recognise a retry: 128 bits make a
# collision between two of the last 10 passwords of one key out of the question.
CREDENTIAL_TAG_BYTES = 16
# The penalty doubles per failure; past this many doublings it is far above any
# sensible cap, and counting further would only overflow a float.
MAX_PENALTY_DOUBLINGS = 32


class LockScope(enum.Enum):
    """What a lockout is keyed by."""

    USER = "user"  # the login name, whether or not such a user exists
    ADDRESS = "address"  # the client's address (IPv6: its /64)


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """The knobs of throttling and lockout; the defaults are in config.LimitsConfig
    (``limits.auth_penalty_*``, ``limits.auth_lockout_*``)."""

    penalty_initial_seconds: float
    penalty_max_seconds: float
    lockout_failures: int  # per user name; 0: no lockout
    address_lockout_failures: int  # per client address; 0: no lockout
    lockout_window_seconds: float
    lockout_seconds: float

    def penalty_seconds(self, failures: int) -> float:
        """The wait before the next attempt after ``failures`` recent distinct failures."""
        if failures <= 0 or self.penalty_initial_seconds <= 0:
            return 0.0
        doublings = min(failures - 1, MAX_PENALTY_DOUBLINGS)
        return min(self.penalty_initial_seconds * 2.0**doublings, self.penalty_max_seconds)

    @property
    def penalty_timeout_seconds(self) -> float:
        """How long after its last failure a penalty stops mattering: the sum of the
        whole delay chain, initial + 2 initial + ... + max (Dovecot: 2 + 4 + 8 + 15)."""
        total = 0.0
        for failures in range(1, MAX_PENALTY_DOUBLINGS + 2):
            delay = self.penalty_seconds(failures)
            total += delay
            if delay >= self.penalty_max_seconds or delay <= 0:
                break
        return total


@dataclass(frozen=True, slots=True)
class ThrottleDecision:
    """What to do with a login attempt, decided before any password is hashed.

    Wait ``delay_seconds`` first; then, if ``lockout`` is set, refuse without hashing.
    ``address_locked``: the client address is locked out too (a user-name lockout is
    reported first; a source exempt from it is still refused for its address).
    """

    delay_seconds: float
    lockout: LockScope | None = None
    address_locked: bool = False

    @property
    def locked_out(self) -> bool:
        """The attempt is refused without checking the password."""
        return self.lockout is not None

    def sparing_user(self) -> ThrottleDecision:
        """The decision for a source exempt from the user-name lockout (a known-good
        source of the user, popproxy/known_sources.py): the same delay, and the
        address lockout if there is one."""
        if self.lockout is not LockScope.USER:
            return self
        return ThrottleDecision(
            self.delay_seconds, LockScope.ADDRESS if self.address_locked else None
        )


ALLOW = ThrottleDecision(0.0)


@dataclass(frozen=True, slots=True)
class Failures:
    """What is known about one key's failed logins, as a value (a shared store keeps
    one per row; ``ThrottleTable`` keeps the same fields in a mutable entry).

    Times are seconds on whatever clock ``now`` comes from (trio's clock in one
    process, the database's in a shared store); ``-inf``: never.
    """

    penalty: int = 0  # distinct failures since the last success (addresses only)
    last_failure: float = -math.inf
    # Times of distinct failures in the lockout window, fewer than the lockout threshold.
    failures: tuple[float, ...] = ()
    locked_until: float = -math.inf

    def penalty_now(self, now: float, policy: ThrottlePolicy) -> int:
        """The penalty count that still applies at ``now``."""
        lapsed = now - self.last_failure >= policy.penalty_timeout_seconds
        return 0 if lapsed else self.penalty

    def matters(self, now: float, policy: ThrottlePolicy) -> bool:
        """Whether anything about this key still changes a decision at ``now``."""
        if now < self.locked_until:
            return True
        remembered = remembered_seconds(policy)
        return now - self.last_failure < remembered

    def failed(
        self, *, repeated: bool, now: float, policy: ThrottlePolicy, threshold: int
    ) -> tuple[Failures, bool]:
        """One more failure at ``now`` (``repeated``: a retry of one of the last few failed
        credentials, which adds no penalty and no lockout count); the new value, and
        whether it reaches ``threshold`` (0: never) and so starts a lockout."""
        penalty = self.penalty_now(now, policy)
        if repeated:
            return replace(self, penalty=penalty, last_failure=now), False
        penalty = min(penalty + 1, MAX_PENALTY_DOUBLINGS + 1)
        if threshold <= 0 or now < self.locked_until:
            return replace(self, penalty=penalty, last_failure=now), False
        horizon = now - policy.lockout_window_seconds
        kept = tuple(t for t in self.failures if t > horizon)[-(threshold - 1) :]
        if len(kept) + 1 < threshold:
            return Failures(penalty, now, (*kept, now), self.locked_until), False
        return Failures(penalty, now, (), now + policy.lockout_seconds), True

    def succeeded(self) -> Failures:
        """A right password from this key: its penalty is lifted (not its lockout count)."""
        return replace(self, penalty=0)


def remembered_seconds(policy: ThrottlePolicy) -> float:
    """How long after its last failure a key stops mattering (unless locked out)."""
    remembered = policy.penalty_timeout_seconds
    if policy.lockout_failures > 0 or policy.address_lockout_failures > 0:
        remembered = max(remembered, policy.lockout_window_seconds)
    return remembered


def decide(
    by_source: Failures | None, by_user: Failures | None, *, now: float, policy: ThrottlePolicy
) -> ThrottleDecision:
    """The delay and lockout for an attempt, from what is known about its client address
    and its user name."""
    delay = policy.penalty_seconds(by_source.penalty_now(now, policy)) if by_source else 0.0
    address_locked = by_source is not None and now < by_source.locked_until
    if by_user is not None and now < by_user.locked_until:
        return ThrottleDecision(delay, LockScope.USER, address_locked)
    if address_locked:
        return ThrottleDecision(delay, LockScope.ADDRESS, True)
    return ThrottleDecision(delay) if delay > 0 else ALLOW


@dataclass(slots=True)
class _Entry:
    """What one table remembers about one key (mutable, private to the table): the
    fields of ``Failures``, the failure times packed as 8-octet doubles (a tuple of
    floats would take four times the memory), and the recent failed credentials."""

    penalty: int = 0
    last_failure: float = -math.inf
    failures: array[float] = field(default_factory=lambda: array("d"))
    locked_until: float = -math.inf
    recent: tuple[bytes, ...] = ()  # the last failed credentials' digests, shortened

    def value(self) -> Failures:
        return Failures(self.penalty, self.last_failure, tuple(self.failures), self.locked_until)

    def set(self, value: Failures) -> None:
        self.penalty = value.penalty
        self.last_failure = value.last_failure
        self.failures = array("d", value.failures)
        self.locked_until = value.locked_until

    def matters(self, now: float, policy: ThrottlePolicy) -> bool:
        if now < self.locked_until:
            return True
        return now - self.last_failure < remembered_seconds(policy)


class _Table:
    """Entries by key, oldest failure first, at most ``max_keys`` of them."""

    def __init__(self, max_keys: int) -> None:
        self._max_keys = max_keys
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float, policy: ThrottlePolicy) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and not entry.matters(now, policy):
            del self._entries[key]
            return None
        return entry

    def touch(self, key: str, now: float, policy: ThrottlePolicy) -> _Entry:
        """The entry for ``key``, created if needed, moved to the newest end."""
        self._expire_oldest(now, policy)
        entry = self.get(key, now, policy)
        if entry is None:
            entry = self._entries[key] = _Entry()
            while len(self._entries) > self._max_keys:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry

    def _expire_oldest(self, now: float, policy: ThrottlePolicy) -> None:
        # Each key is dropped at most once per insertion, so this is amortized O(1).
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.matters(now, policy):
                return
            del self._entries[key]


class ThrottleTable:
    """Failures per client address and per user name; one per process (DESIGN.md, auth/).

    ``decide`` before hashing; ``failure`` or ``success`` after. ``source`` is the
    client's ``PeerAddress.limit_key`` (popproxy/peer.py: an IPv4 address, or the
    IPv6 /64 it is in); ``credential`` is a keyed digest of user and password (never
    the password), used only to recognise a retry of the same wrong one.
    """

    def __init__(self, *, max_keys: int = MAX_TRACKED_KEYS) -> None:
        self._sources = _Table(max_keys)
        self._users = _Table(max_keys)

    def __len__(self) -> int:
        """Keys tracked in both tables together (for tests and bounds)."""
        return len(self._sources) + len(self._users)

    def decide(
        self, source: str, user: str, *, now: float, policy: ThrottlePolicy
    ) -> ThrottleDecision:
        """The delay and lockout for an attempt by ``source`` as ``user`` at ``now``."""
        by_source = self._sources.get(source, now, policy)
        by_user = self._users.get(user, now, policy)
        return decide(
            by_source.value() if by_source is not None else None,
            by_user.value() if by_user is not None else None,
            now=now,
            policy=policy,
        )

    def failure(
        self, source: str, user: str, credential: bytes, *, now: float, policy: ThrottlePolicy
    ) -> tuple[LockScope, ...]:
        """Record a failed password check; return the lockouts it just started."""
        started: list[LockScope] = []
        for table, key, scope, threshold in (
            (self._users, user, LockScope.USER, policy.lockout_failures),
            (self._sources, source, LockScope.ADDRESS, policy.address_lockout_failures),
        ):
            entry = table.touch(key, now, policy)
            if _count_failure(entry, credential, now, policy, threshold):
                started.append(scope)
        return tuple(started)

    def repeats(
        self, source: str, user: str, credential: bytes, *, now: float, policy: ThrottlePolicy
    ) -> tuple[bool, bool]:
        """Whether ``credential`` is one of the last few failed ones of ``user`` and of
        ``source`` (a retry: no penalty and no lockout count; for a shared count)."""
        tag = credential[:CREDENTIAL_TAG_BYTES]
        by_user = self._users.get(user, now, policy)
        by_source = self._sources.get(source, now, policy)
        return (
            by_user is not None and tag in by_user.recent,
            by_source is not None and tag in by_source.recent,
        )

    def success(self, source: str, *, now: float, policy: ThrottlePolicy) -> None:
        """A password was right: the address's penalty is lifted (not its lockout count)."""
        entry = self._sources.get(source, now, policy)
        if entry is not None:
            entry.penalty = 0
            entry.recent = ()


def _count_failure(
    entry: _Entry, credential: bytes, now: float, policy: ThrottlePolicy, threshold: int
) -> bool:
    """Add one failure to ``entry``; say whether it reaches ``threshold`` (0: never) and
    so starts a lockout."""
    tag = credential[:CREDENTIAL_TAG_BYTES]
    repeated = tag in entry.recent
    value, started = entry.value().failed(
        repeated=repeated, now=now, policy=policy, threshold=threshold
    )
    entry.set(value)
    if not repeated:
        entry.recent = (*entry.recent, tag)[-RECENT_FAILED_CREDENTIALS:]
    return started
