"""Local user verification: password hashes checked in worker threads.

Hashing is slow on purpose and blocks, so it runs in ``trio.to_thread.run_sync``
behind a :class:`trio.CapacityLimiter` (a :class:`HashQueue`): a burst of logins
queues for a few hash threads instead of starving the trio thread or the machine,
and at most ``limits.auth_max_pending_verifications`` logins wait in that queue;
the next one is told to come back later without any hashing, so a flood queues a
bounded amount of work. An unknown user name is checked against a dummy hash with
the same cost as the configured users', so the time an answer takes does not tell
a client whether the user exists.

A right password is remembered in the verified-credential cache
(:mod:`popproxy.auth.cache`), so the same client's next login costs an HMAC instead
of a hash. Throttling comes before this module is asked anything; the login
orchestrator (:mod:`popproxy.auth.login`) asks the throttle first, then this module.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import trio

from popproxy.auth.cache import CredentialCache
from popproxy.auth.passwords import (
    HashParams,
    PasswordHashError,
    dummy_hash,
    parse_hash,
    verify_password,
)
from popproxy.auth.throttle import ThrottlePolicy
from popproxy.config import LimitsConfig, UserConfig
from popproxy.secret import Secret

log = logging.getLogger(__name__)

# Each scrypt check at the default cost takes ~32 MiB and tens of milliseconds of a
# core; two at a time keeps a login burst from taking the whole machine (Dovecot's
# auth worker pool defaults to a small fixed number of processes for the same reason).
DEFAULT_HASH_THREADS = 2


@dataclass(frozen=True, slots=True)
class Verification:
    """What one password check decided (:meth:`Authenticator.check`)."""

    user: UserConfig | None  # the account, only when the password is right
    # The stored hash could not be checked at all (nothing was decided): a login
    # "error" in the metrics rather than a "failed" one. The client sees a failure.
    hash_unusable: bool = False
    # Too many logins were already waiting for a hash thread: nothing was checked.
    busy: bool = False
    # The password matched a fresh entry of the verified-credential cache: no hash ran.
    cached: bool = False
    # The keyed digest of user name and password (popproxy.auth.cache), so that the
    # throttle can tell a retry of the same wrong password from a new guess.
    credential: bytes = field(default=b"", repr=False)


class HashQueue:
    """The hash threads and the logins waiting for them; one per process, shared by
    every generation of the :class:`Authenticator` so a reload adds no threads."""

    def __init__(self, threads: int = DEFAULT_HASH_THREADS) -> None:
        self.limiter = trio.CapacityLimiter(threads)
        self.in_flight = 0  # logins hashing or waiting for a thread

    @property
    def waiting(self) -> int:
        """Logins waiting for a hash thread (not yet hashing)."""
        return max(self.in_flight - int(self.limiter.borrowed_tokens), 0)

    async def verify(self, phc: str, password: Secret, *, max_waiting: int) -> bool | None:
        """Run :func:`verify_password` in a worker thread; None, at once, if
        ``max_waiting`` logins are already waiting for one."""
        if self.in_flight >= int(self.limiter.total_tokens) + max_waiting:
            return None
        self.in_flight += 1
        try:
            return await trio.to_thread.run_sync(
                verify_password, phc, password, limiter=self.limiter
            )
        finally:
            self.in_flight -= 1


class Authenticator:
    """Verify local users' passwords from config (DESIGN.md, auth/).

    ``users`` maps a login name to its :class:`UserConfig`; ``limits`` gives the
    bound on waiting logins, the cache's TTL and the throttle's knobs
    (:attr:`throttle_policy`, built once here). ``queue`` holds the hash threads
    (``DEFAULT_HASH_THREADS`` of its own by default) and ``cache`` the verified
    credentials (one of ``limits.auth_cache_size`` of its own by default); the server
    passes its own, which outlive a reload.
    """

    def __init__(
        self,
        users: Mapping[str, UserConfig],
        limits: LimitsConfig | None = None,
        *,
        queue: HashQueue | None = None,
        cache: CredentialCache | None = None,
    ) -> None:
        self._users = dict(users)
        self._limits = limits if limits is not None else LimitsConfig()
        self._queue = queue if queue is not None else HashQueue()
        self._cache = cache if cache is not None else CredentialCache(self._limits.auth_cache_size)
        self._dummy = _dummy_for(self._users.values())
        self._policy = throttle_policy(self._limits)

    @property
    def throttle_policy(self) -> ThrottlePolicy:
        """The throttle's knobs from ``limits.auth_*``, the same value for every login."""
        return self._policy

    @property
    def dummy_hash(self) -> str:
        """The hash an unknown user is checked against (no password matches it)."""
        return self._dummy

    async def verify(self, username: str, password: Secret) -> UserConfig | None:
        """Return the user if ``password`` is theirs, else None (RFC 1939 §7 USER/PASS, RFC 5034).

        A wrong password, an unknown user and an unusable stored hash all give None,
        after the same amount of hashing work. Never logs the password.
        """
        return (await self.check(username, password)).user

    async def check(self, username: str, password: Secret) -> Verification:
        """As :meth:`verify`, but also says whether the stored hash could not be used.

        The session counts that case as a login ``error`` (popproxy_logins_total);
        what the client hears is the same as for a wrong password.
        """
        user = self._users.get(username)
        phc = user.password_hash if user is not None else self._dummy
        credential = self._cache.digest(username, password)
        now = trio.current_time()
        if user is not None and self._cache.hit(username, credential, phc, now=now):
            return Verification(user, cached=True, credential=credential)
        try:
            ok = await self._queue.verify(
                phc, password, max_waiting=self._limits.auth_max_pending_verifications
            )
        except PasswordHashError as exc:
            # Config validation rejects bad hashes; this is reached only if an optional
            # library went missing after load. The reason is safe to log, the hash is not.
            log.warning("password_hash_unusable", extra={"fields": {"reason": str(exc)}})
            return Verification(None, hash_unusable=True, credential=credential)
        if ok is None:
            return Verification(None, busy=True, credential=credential)
        if not ok or user is None:
            return Verification(None, credential=credential)
        self._cache.store(
            username,
            credential,
            phc,
            now=trio.current_time(),
            ttl=self._limits.auth_cache_ttl_seconds,
        )
        return Verification(user, credential=credential)


def _dummy_for(users: Iterable[UserConfig]) -> str:
    """A dummy hash with the parameters most of ``users`` use (the defaults if none parse)."""
    counts: Counter[HashParams] = Counter()
    sample: dict[HashParams, str] = {}
    for user in users:
        try:
            params = parse_hash(user.password_hash)
        except PasswordHashError:
            continue
        counts[params] += 1
        sample.setdefault(params, user.password_hash)
    if not counts:
        return dummy_hash()
    most_common, _ = counts.most_common(1)[0]
    return dummy_hash(sample[most_common])


def throttle_policy(limits: LimitsConfig) -> ThrottlePolicy:
    """The throttle's knobs from ``limits.auth_*`` (popproxy.auth.throttle is pure and
    does not read the config)."""
    return ThrottlePolicy(
        penalty_initial_seconds=limits.auth_penalty_initial_seconds,
        penalty_max_seconds=limits.auth_penalty_max_seconds,
        lockout_failures=limits.auth_lockout_failures,
        address_lockout_failures=limits.auth_lockout_address_failures,
        lockout_window_seconds=limits.auth_lockout_window_seconds,
        lockout_seconds=limits.auth_lockout_seconds,
    )
