"""The login orchestrator: throttle first, then the hash, then the record and its log lines.

Hashes run inline (``InlineQueue``: the real verify_password on the trio thread after
a checkpoint), so ``autojump_clock`` jumps over the throttle's delays and the times
below are the mock clock's. The session's side (replies, metrics, failure delay) is
in tests/test_session_throttle.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.auth.authenticator import Authenticator, HashQueue, throttle_policy
from popproxy.auth.credentials import Credentials
from popproxy.auth.login import LoginAttempt, LoginClient, LoginOutcome, log_in
from popproxy.auth.passwords import PasswordHashError, hash_password, verify_password
from popproxy.auth.throttle import ALLOW, LockScope, ThrottleDecision, ThrottlePolicy, ThrottleTable
from popproxy.auth.throttling import LocalThrottle, LoginThrottle, ThrottleUnavailable
from popproxy.config import LimitsConfig, UserConfig
from popproxy.peer import PeerAddress
from popproxy.secret import Secret

# The defaults otherwise: penalties of 2, 4, 8, 15 s, lockouts in a 600 s window.
LIMITS = LimitsConfig(auth_lockout_failures=3, auth_lockout_address_failures=5)
DEMO = UserConfig("demo", hash_password(Secret.from_str("secret"), ln=4), maildir=Path("/m"))
CLIENT = LoginClient("ab12cd34", PeerAddress("192.0.2.1", 50412))


class InlineQueue(HashQueue):
    """The real verify_password, run inline and counted; or a full queue, or a broken hash."""

    def __init__(self) -> None:
        super().__init__(1)
        self.hashes = 0
        self.full = False
        self.broken = False

    async def verify(self, phc: str, password: Secret, *, max_waiting: int) -> bool | None:
        await trio.lowlevel.checkpoint()
        if self.full:
            return None
        if self.broken:
            raise PasswordHashError("no such algorithm")
        self.hashes += 1
        return verify_password(phc, password)


class Attempts:
    """One authenticator, queue and throttle table, and the waits ``before_wait`` saw."""

    def __init__(self, throttle: ThrottleTable | None = None) -> None:
        self.queue = InlineQueue()
        self.authenticator = Authenticator({"demo": DEMO}, LIMITS, queue=self.queue)
        self.throttle = throttle if throttle is not None else ThrottleTable()
        self.login_throttle: LoginThrottle = LocalThrottle(self.throttle)
        self.waits: list[float] = []

    async def _before_wait(self) -> None:
        self.waits.append(trio.current_time())

    async def login(
        self, user: str, password: str, client: LoginClient = CLIENT
    ) -> tuple[LoginAttempt, float]:
        """The attempt and how long (mock time) it took."""
        start = trio.current_time()
        attempt = await log_in(
            self.authenticator,
            self.login_throttle,
            client,
            Credentials(user, Secret.from_str(password)),
            before_wait=self._before_wait,
        )
        return attempt, trio.current_time() - start

    async def fail(self, user: str, times: int) -> None:
        """``times`` distinct wrong guesses as ``user``, each a plain failure."""
        for n in range(times):
            attempt, _ = await self.login(user, f"guess{n}")
            assert attempt.outcome is LoginOutcome.FAILED


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="popproxy")
    return caplog


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, dict[str, object]]]:
    return [(r.name, r.getMessage(), r.__dict__["fields"]) for r in caplog.records]


async def test_the_right_password_logs_in(autojump_clock: trio.testing.MockClock) -> None:
    attempts = Attempts()
    attempt, took = await attempts.login("demo", "secret")
    assert attempt == LoginAttempt(LoginOutcome.OK, DEMO)
    assert took == 0
    assert attempts.waits == []


async def test_a_failure_delays_the_next_attempt_after_before_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = Attempts()
    assert (await attempts.login("demo", "wrong"))[0] == LoginAttempt(LoginOutcome.FAILED)
    waited_from = trio.current_time()
    attempt, took = await attempts.login("demo", "secret")
    assert attempt.outcome is LoginOutcome.OK
    assert took == LIMITS.auth_penalty_initial_seconds
    assert attempts.waits == [waited_from]
    # The success lifted the address's penalty: the next attempt does not wait.
    _, took = await attempts.login("demo", "secret")
    assert took == 0


async def test_a_user_lockout_starts_is_logged_and_refuses_without_hashing(
    autojump_clock: trio.testing.MockClock, logs: pytest.LogCaptureFixture
) -> None:
    attempts = Attempts()
    await attempts.fail("demo", LIMITS.auth_lockout_failures)
    fields = {"session": "ab12cd34", "peer": "192.0.2.1:50412", "user": "demo"}
    assert messages(logs) == [("popproxy.session", "login_lockout", {**fields, "scope": "user"})]
    assert logs.records[0].levelno == logging.WARNING
    hashes = attempts.queue.hashes
    logs.clear()
    attempt, _ = await attempts.login("demo", "secret")
    assert attempt == LoginAttempt(LoginOutcome.LOCKED_OUT)
    assert attempts.queue.hashes == hashes
    assert messages(logs) == [("popproxy.session", "login_refused", {**fields, "scope": "user"})]


async def test_an_address_lockout_is_throttled(autojump_clock: trio.testing.MockClock) -> None:
    attempts = Attempts()
    for n in range(LIMITS.auth_lockout_address_failures):
        await attempts.login(f"user{n}", "guess")
    attempt, _ = await attempts.login("demo", "secret")
    assert attempt == LoginAttempt(LoginOutcome.THROTTLED)
    # Another address (IPv6, keyed by its /64) is not locked out.
    other = LoginClient("ef56", PeerAddress("2001:db8::1", 1))
    assert (await attempts.login("demo", "secret", other))[0].outcome is LoginOutcome.OK


async def test_a_full_hash_queue_is_busy_and_records_nothing(
    autojump_clock: trio.testing.MockClock, logs: pytest.LogCaptureFixture
) -> None:
    attempts = Attempts()
    attempts.queue.full = True
    attempt, _ = await attempts.login("demo", "wrong")
    assert attempt == LoginAttempt(LoginOutcome.BUSY)
    assert len(attempts.throttle) == 0
    assert [m for _, m, _ in messages(logs)] == ["login_busy"]


async def test_an_unusable_hash_is_an_error_not_a_recorded_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = Attempts()
    attempts.queue.broken = True
    assert (await attempts.login("demo", "secret"))[0] == LoginAttempt(LoginOutcome.HASH_UNUSABLE)
    assert len(attempts.throttle) == 0


async def test_malformed_credentials_fail_without_the_throttle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = Attempts()
    attempt = await log_in(
        attempts.authenticator,
        attempts.login_throttle,
        CLIENT,
        None,
        before_wait=attempts._before_wait,
    )
    assert attempt == LoginAttempt(LoginOutcome.FAILED)
    assert attempts.queue.hashes == 0
    assert len(attempts.throttle) == 0


async def test_a_name_outside_the_safe_set_is_checked_as_the_empty_name(
    autojump_clock: trio.testing.MockClock, logs: pytest.LogCaptureFixture
) -> None:
    attempts = Attempts()
    await attempts.fail("de\u202emo", LIMITS.auth_lockout_failures)
    assert attempts.queue.hashes == LIMITS.auth_lockout_failures  # the same work as any name
    ((_, msg, fields),) = messages(logs)
    assert (msg, fields["user"]) == ("login_lockout", "")
    assert (await attempts.login("", "secret"))[0].outcome is LoginOutcome.LOCKED_OUT


async def test_without_a_throttle_table_nothing_waits_or_locks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = Attempts()
    for n in range(LIMITS.auth_lockout_address_failures + 1):
        attempt = await log_in(
            attempts.authenticator,
            None,
            CLIENT,
            Credentials("demo", Secret.from_str(f"guess{n}")),
            before_wait=attempts._before_wait,
        )
        assert attempt.outcome is LoginOutcome.FAILED
    assert trio.current_time() == 0
    assert attempts.waits == []


def test_the_authenticator_builds_its_throttle_policy_once() -> None:
    authenticator = Authenticator({"demo": DEMO}, LIMITS)
    assert authenticator.throttle_policy == throttle_policy(LIMITS)
    assert authenticator.throttle_policy is authenticator.throttle_policy


class DownThrottle:
    """A shared throttle whose store is down (as PostgreSQL stopped would make it)."""

    def __init__(self, *, down_after_decide: bool = False) -> None:
        self.down_after_decide = down_after_decide

    async def decide(self, source: str, user: str, policy: ThrottlePolicy) -> ThrottleDecision:
        if self.down_after_decide:
            return ALLOW
        raise ThrottleUnavailable("state store postgresql://db:5432/pp: connection refused")

    async def failure(
        self, source: str, user: str, credential: bytes, policy: ThrottlePolicy
    ) -> tuple[LockScope, ...]:
        raise ThrottleUnavailable("state store postgresql://db:5432/pp: connection refused")

    async def success(self, source: str, policy: ThrottlePolicy, *, penalized: bool) -> None:
        raise ThrottleUnavailable("state store postgresql://db:5432/pp: connection refused")


async def test_a_shared_throttle_that_cannot_be_asked_refuses_before_any_hash(
    autojump_clock: trio.testing.MockClock, logs: pytest.LogCaptureFixture
) -> None:
    attempts = Attempts()
    attempts.login_throttle = DownThrottle()
    for password in ("secret", "wrong"):
        attempt, _ = await attempts.login("demo", password)
        assert attempt == LoginAttempt(LoginOutcome.UNAVAILABLE)
    assert attempts.queue.hashes == 0
    assert [m for _, m, _ in messages(logs)] == ["login_unavailable"] * 2
    assert all("connection refused" in str(f["reason"]) for _, _, f in messages(logs))


async def test_a_store_lost_after_the_decision_still_answers_the_login(
    autojump_clock: trio.testing.MockClock, logs: pytest.LogCaptureFixture
) -> None:
    """A wrong password is still refused (the guess is logged as not counted); a right
    one still logs in (only a penalty would have been lifted)."""
    attempts = Attempts()
    attempts.login_throttle = DownThrottle(down_after_decide=True)
    assert (await attempts.login("demo", "wrong"))[0].outcome is LoginOutcome.FAILED
    assert (await attempts.login("demo", "secret"))[0].outcome is LoginOutcome.OK
    assert [m for _, m, _ in messages(logs)] == ["login_not_counted"]
