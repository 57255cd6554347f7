"""Login orchestration: throttle, verify, record (DESIGN.md, auth/; session data flow step 2).

One login attempt, in order: the login name is checked against the safe set
(:mod:`popproxy.pop3.names`); the throttle (:mod:`popproxy.auth.throttle`, pure)
decides before any hashing, so a penalized client waits first and a locked-out
attempt is refused without a hash; the :class:`Authenticator` checks the password
in a worker thread; the throttle records the failure or the success, and a lockout
that starts is logged. What the client hears and what the metrics count is the
session's business: it gets a :class:`LoginAttempt` back.

This module waits (``trio.sleep``) and so is not part of the pure ``auth/``
(tests/pop3/test_imports.py); the decisions it follows are all in ``throttle.py``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from popproxy.auth.authenticator import Authenticator
from popproxy.auth.credentials import Credentials
from popproxy.auth.throttle import LockScope
from popproxy.auth.throttling import LoginThrottle, ThrottleUnavailable
from popproxy.config import UserConfig
from popproxy.peer import PeerAddress
from popproxy.pop3.names import login_name_problem

# The lines below are about one client session and have always carried its logger
# name (docs/operations.md, "Log lines"), so they keep it.
log = logging.getLogger("popproxy.session")

# How much of a login name a log line carries (logfmt escapes the rest of it).
MAX_LOGGED_USER_CHARS = 64


class LoginOutcome(enum.Enum):
    """How one login attempt ended."""

    OK = "ok"
    FAILED = "failed"  # wrong password or unknown user; recorded by the throttle
    HASH_UNUSABLE = "hash_unusable"  # the stored hash could not be checked: nothing decided
    LOCKED_OUT = "locked_out"  # refused before hashing: the user name is locked out
    THROTTLED = "throttled"  # refused before hashing: the client address is locked out
    BUSY = "busy"  # too many logins were waiting for a hash thread: nothing checked
    # The shared failure counts (several instances, docs/scaling.md) cannot be read:
    # refused before hashing, so no instance guesses on counts of its own.
    UNAVAILABLE = "unavailable"


# The outcome of an attempt a lockout refused, by what the lockout is keyed on.
LOCKOUT_OUTCOMES = {
    LockScope.USER: LoginOutcome.LOCKED_OUT,
    LockScope.ADDRESS: LoginOutcome.THROTTLED,
}


class SourceMemory(Protocol):
    """The known-good sources of each user (``popproxy.known_sources.KnownSources``,
    above the state store): a known source is spared its user name's lockout."""

    async def knows(self, user: str, source: str, *, session: str) -> bool:
        """Whether ``user`` lately logged in successfully from ``source``."""
        ...

    async def logged_in(self, user: str, source: str, *, session: str) -> None:
        """``user`` just logged in from ``source``."""
        ...


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """What :func:`log_in` decided; ``user`` is the account, only for ``OK``."""

    outcome: LoginOutcome
    user: UserConfig | None = None


@dataclass(frozen=True, slots=True)
class LoginClient:
    """Who is logging in: the throttle keys on ``peer.limit_key``, log lines carry both."""

    session_id: str
    peer: PeerAddress


async def log_in(
    authenticator: Authenticator,
    throttle: LoginThrottle | None,
    client: LoginClient,
    credentials: Credentials | None,
    *,
    before_wait: Callable[[], Awaitable[None]],
    known: SourceMemory | None = None,
) -> LoginAttempt:
    """Throttle, verify and record one USER/PASS or AUTH PLAIN login (RFC 1939 §7, RFC 5034).

    ``credentials`` None (a malformed SASL PLAIN message) fails at once, with no
    throttle consulted or recorded. ``throttle`` None means no throttling or lockout;
    a shared throttle that cannot be asked refuses the attempt before any hashing
    (``UNAVAILABLE``).
    ``before_wait`` runs before a throttle delay (the session sends what it has
    queued, so earlier replies are not held back by the wait). ``known`` (None: no
    source is known) spares a user's known-good sources its name's lockout, never
    the address penalty or lockout; it is read only when the name is locked out and
    told of each success. Never logs the password.
    """
    if credentials is None:
        return LoginAttempt(LoginOutcome.FAILED)
    user, password = credentials.user, credentials.password
    if login_name_problem(user) is not None:
        # Outside the safe set (pop3/names.py), so no configured user has this name.
        # It goes no further (not to the authenticator, a log or an upstream): the
        # check runs for the empty name, which is never configured, so the login
        # fails as an unknown user's does, after the same hashing work and delay.
        user = ""
    policy = authenticator.throttle_policy
    source = client.peer.limit_key
    penalized = False
    if throttle is not None:
        try:
            decision = await throttle.decide(source, user, policy)
        except ThrottleUnavailable as exc:
            _log_login(client, "login_unavailable", user, reason=str(exc), level=logging.ERROR)
            return LoginAttempt(LoginOutcome.UNAVAILABLE)
        if (
            decision.lockout is LockScope.USER
            and known is not None
            and await known.knows(user, source, session=client.session_id)
        ):
            # Someone else locked this name out; its owner's own address stays in
            # (DESIGN.md invariant 8), with the same penalty and address lockout.
            _log_login(client, "login_spared", user, LockScope.USER)
            decision = decision.sparing_user()
        if decision.delay_seconds > 0:
            penalized = True
            await before_wait()
            await trio.sleep(decision.delay_seconds)
        if decision.lockout is not None:
            _log_login(client, "login_refused", user, decision.lockout)
            return LoginAttempt(LOCKOUT_OUTCOMES[decision.lockout])
    verdict = await authenticator.check(user, password)
    if verdict.busy:
        # Nothing was decided, so nothing is recorded against the client.
        _log_login(client, "login_busy", user)
        return LoginAttempt(LoginOutcome.BUSY)
    if verdict.hash_unusable:
        return LoginAttempt(LoginOutcome.HASH_UNUSABLE)
    if verdict.user is None:
        if throttle is not None:
            try:
                started = await throttle.failure(source, user, verdict.credential, policy)
            except ThrottleUnavailable as exc:
                # The answer stands (the password was wrong); this guess is not counted,
                # and the next attempt's decision fails closed while the store is down.
                _log_login(client, "login_not_counted", user, reason=str(exc), level=logging.ERROR)
                started = ()
            for scope in started:
                _log_login(client, "login_lockout", user, scope, logging.WARNING)
        return LoginAttempt(LoginOutcome.FAILED)
    if throttle is not None:
        # Only a penalty would have been lifted; it lapses by itself.
        with contextlib.suppress(ThrottleUnavailable):
            await throttle.success(source, policy, penalized=penalized)
    if known is not None:
        await known.logged_in(verdict.user.name, source, session=client.session_id)
    return LoginAttempt(LoginOutcome.OK, verdict.user)


def _log_login(
    client: LoginClient,
    msg: str,
    user: str,
    scope: LockScope | None = None,
    level: int = logging.INFO,
    *,
    reason: str | None = None,
) -> None:
    """A line about a lockout starting, or a login the throttle or the hash queue
    refused: session, peer, the start of the name; never the password."""
    fields: dict[str, object] = {
        "session": client.session_id,
        "peer": str(client.peer),
        "user": user[:MAX_LOGGED_USER_CHARS],
    }
    if scope is not None:
        fields["scope"] = scope.value
    if reason is not None:
        fields["reason"] = reason
    log.log(level, msg, extra={"fields": fields})
