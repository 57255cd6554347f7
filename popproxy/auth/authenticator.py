"""Local user verification: password hashes checked in worker threads.

Hashing is slow on purpose and blocks, so it runs in ``trio.to_thread.run_sync``
behind a :class:`trio.CapacityLimiter`: a burst of logins queues for a few hash
threads instead of starving the trio thread or the machine. An unknown user name
is checked against a dummy hash with the same cost as the configured users', so
the time an answer takes does not tell a client whether the user exists. The
delay after a failure is the session's job (``limits.auth_failure_delay_seconds``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import trio

from popproxy.auth.passwords import (
    HashParams,
    PasswordHashError,
    dummy_hash,
    parse_hash,
    verify_password,
)
from popproxy.config import UserConfig
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


class Authenticator:
    """Verify local users' passwords from config (DESIGN.md, auth/).

    ``users`` maps a login name to its :class:`UserConfig`. ``limiter`` bounds the
    hash threads (``DEFAULT_HASH_THREADS`` by default); pass one to share it with
    other blocking work.
    """

    def __init__(
        self,
        users: Mapping[str, UserConfig],
        *,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self._users = dict(users)
        self._limiter = (
            limiter if limiter is not None else trio.CapacityLimiter(DEFAULT_HASH_THREADS)
        )
        self._dummy = _dummy_for(self._users.values())

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
        try:
            ok = await trio.to_thread.run_sync(
                verify_password, phc, password, limiter=self._limiter
            )
        except PasswordHashError as exc:
            # Config validation rejects bad hashes; this is reached only if an optional
            # library went missing after load. The reason is safe to log, the hash is not.
            log.warning("password_hash_unusable", extra={"fields": {"reason": str(exc)}})
            return Verification(None, hash_unusable=True)
        return Verification(user if ok and user is not None else None)


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
