"""The throttle table: Dovecot-style penalty per address, lockout per user and address, bounds."""

from __future__ import annotations

import dataclasses
import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.auth.authenticator import throttle_policy
from popproxy.auth.throttle import (
    ALLOW,
    MAX_TRACKED_KEYS,
    RECENT_FAILED_CREDENTIALS,
    LockScope,
    ThrottleDecision,
    ThrottlePolicy,
    ThrottleTable,
)
from popproxy.config import LimitsConfig

# The defaults of the config, as the session reads them (Dovecot's penalty numbers).
DEFAULTS = LimitsConfig()
POLICY = throttle_policy(DEFAULTS)
NO_LOCKOUT = dataclasses.replace(POLICY, lockout_failures=0, address_lockout_failures=0)


def credential(n: int) -> bytes:
    """A stand-in for the keyed digest of the n-th distinct (user, password) pair."""
    return hashlib.sha256(n.to_bytes(8, "big")).digest()


def fail_distinct(
    table: ThrottleTable,
    count: int,
    *,
    source: str = "192.0.2.1",
    user: str = "alice",
    start: float = 0.0,
    step: float = 1.0,
    policy: ThrottlePolicy = POLICY,
) -> float:
    """``count`` failures with distinct passwords, ``step`` seconds apart; the last time."""
    now = start
    for n in range(count):
        now = start + n * step
        table.failure(source, user, credential(n), now=now, policy=policy)
    return now


def test_defaults_are_dovecots_penalty() -> None:
    assert (POLICY.penalty_initial_seconds, POLICY.penalty_max_seconds) == (2.0, 15.0)
    delays = [POLICY.penalty_seconds(n) for n in range(7)]
    assert delays == [0.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert POLICY.penalty_timeout_seconds == 2 + 4 + 8 + 15  # Dovecot's AUTH_PENALTY_TIMEOUT


def test_a_fresh_client_is_not_delayed() -> None:
    assert ThrottleTable().decide("192.0.2.1", "alice", now=0.0, policy=POLICY) == ALLOW


def test_penalty_grows_per_failure_from_the_address_whoever_the_user() -> None:
    table = ThrottleTable()
    seen = []
    for n, user in enumerate(("alice", "bob", "nobody", "carol", "dave")):
        table.failure("192.0.2.1", user, credential(n), now=float(n), policy=NO_LOCKOUT)
        seen.append(table.decide("192.0.2.1", "x", now=float(n), policy=NO_LOCKOUT).delay_seconds)
    assert seen == [2.0, 4.0, 8.0, 15.0, 15.0]
    # Another address is not slowed down.
    assert table.decide("192.0.2.2", "alice", now=5.0, policy=NO_LOCKOUT) == ALLOW


def test_success_lifts_the_penalty() -> None:
    table = ThrottleTable()
    fail_distinct(table, 3, policy=NO_LOCKOUT)
    table.success("192.0.2.1", now=3.0, policy=NO_LOCKOUT)
    assert table.decide("192.0.2.1", "alice", now=3.0, policy=NO_LOCKOUT) == ALLOW


def test_penalty_lapses_after_its_timeout_without_failures() -> None:
    table = ThrottleTable()
    last = fail_distinct(table, 3, policy=NO_LOCKOUT)
    timeout = NO_LOCKOUT.penalty_timeout_seconds
    before = table.decide("192.0.2.1", "alice", now=last + timeout - 0.5, policy=NO_LOCKOUT)
    assert before.delay_seconds == 8.0
    assert table.decide("192.0.2.1", "alice", now=last + timeout, policy=NO_LOCKOUT) == ALLOW
    assert len(table) == 0  # forgotten once irrelevant (no lockout to remember)


def test_retrying_the_same_wrong_password_adds_no_penalty_and_no_lockout_count() -> None:
    table = ThrottleTable()
    for n in range(3 * POLICY.lockout_failures):
        table.failure("192.0.2.1", "alice", credential(7), now=float(n), policy=POLICY)
    decision = table.decide("192.0.2.1", "alice", now=30.0, policy=POLICY)
    assert decision == ThrottleDecision(2.0)  # one failure's penalty, never locked


def test_only_the_last_few_credentials_count_as_retries() -> None:
    table = ThrottleTable()
    policy = NO_LOCKOUT
    for n in range(RECENT_FAILED_CREDENTIALS + 1):
        table.failure("192.0.2.1", "a", credential(n), now=0.0, policy=policy)
    before = table.decide("192.0.2.1", "a", now=0.0, policy=policy).delay_seconds
    table.failure("192.0.2.1", "a", credential(0), now=0.0, policy=policy)  # forgotten by now
    table.failure("192.0.2.1", "a", credential(RECENT_FAILED_CREDENTIALS), now=0.0, policy=policy)
    assert before == 15.0
    assert table._sources._entries["192.0.2.1"].penalty == RECENT_FAILED_CREDENTIALS + 2


def test_user_lockout_after_n_failures_within_the_window_from_many_addresses() -> None:
    table = ThrottleTable()
    n = POLICY.lockout_failures
    started = [
        table.failure(f"198.51.100.{i}", "alice", credential(i), now=float(i), policy=POLICY)
        for i in range(n)
    ]
    assert started == [()] * (n - 1) + [(LockScope.USER,)]
    fresh = "203.0.113.9"  # an address that never failed: the user is locked all the same
    locked = table.decide(fresh, "alice", now=float(n), policy=POLICY)
    assert locked == ThrottleDecision(0.0, LockScope.USER)
    assert locked.locked_out
    assert table.decide(fresh, "bob", now=float(n), policy=POLICY) == ALLOW
    end = (n - 1) + POLICY.lockout_seconds
    assert table.decide(fresh, "alice", now=end - 0.001, policy=POLICY).locked_out
    assert not table.decide(fresh, "alice", now=end, policy=POLICY).locked_out


def test_failures_spread_wider_than_the_window_do_not_lock() -> None:
    table = ThrottleTable()
    step = POLICY.lockout_window_seconds / (POLICY.lockout_failures - 1) + 1
    last = fail_distinct(table, 3 * POLICY.lockout_failures, step=step)
    assert not table.decide("192.0.2.1", "alice", now=last, policy=POLICY).locked_out


def test_address_lockout_against_password_spraying() -> None:
    """One address, a different user name each time: the address is locked out."""
    table = ThrottleTable()
    n = POLICY.address_lockout_failures
    assert n > POLICY.lockout_failures  # one address may carry many honest users
    started = [
        table.failure("192.0.2.1", f"user{i}", credential(i), now=float(i), policy=POLICY)
        for i in range(n)
    ]
    assert started[:-1] == [()] * (n - 1)
    assert started[-1] == (LockScope.ADDRESS,)
    decision = table.decide("192.0.2.1", "somebody-else", now=float(n), policy=POLICY)
    assert decision.lockout is LockScope.ADDRESS
    assert decision.delay_seconds == 15.0  # still delayed, as any attempt from there
    assert table.decide("192.0.2.2", "somebody-else", now=float(n), policy=POLICY) == ALLOW


def test_a_success_does_not_reset_the_lockout_count() -> None:
    """Else a guesser with one valid account could clear its address between guesses."""
    table = ThrottleTable()
    n = POLICY.address_lockout_failures
    for i in range(n):
        table.success("192.0.2.1", now=float(i), policy=POLICY)
        table.failure("192.0.2.1", f"user{i}", credential(i), now=float(i), policy=POLICY)
    assert table.decide("192.0.2.1", "mine", now=float(n), policy=POLICY).locked_out


def test_with_equal_counts_one_address_guessing_one_user_locks_both_at_once() -> None:
    policy = dataclasses.replace(POLICY, address_lockout_failures=POLICY.lockout_failures)
    table = ThrottleTable()
    started = [
        table.failure("192.0.2.1", "alice", credential(i), now=float(i), policy=policy)
        for i in range(policy.lockout_failures)
    ]
    assert started[-1] == (LockScope.USER, LockScope.ADDRESS)
    decision = table.decide("192.0.2.1", "alice", now=10.0, policy=policy)
    assert decision.lockout is LockScope.USER  # the user's lockout is named first


def test_lockout_zero_disables_it() -> None:
    table = ThrottleTable()
    fail_distinct(table, 50, policy=NO_LOCKOUT)
    assert not table.decide("192.0.2.1", "alice", now=50.0, policy=NO_LOCKOUT).locked_out


def test_attempts_while_locked_do_not_extend_the_lockout() -> None:
    table = ThrottleTable()
    last = fail_distinct(table, POLICY.lockout_failures)
    for i in range(20):
        table.failure("192.0.2.1", "alice", credential(100 + i), now=last + i, policy=POLICY)
    assert not table.decide(
        "192.0.2.9", "alice", now=last + POLICY.lockout_seconds, policy=POLICY
    ).locked_out


# -- properties -----------------------------------------------------------------------------

policies = st.builds(
    ThrottlePolicy,
    penalty_initial_seconds=st.floats(0, 10),
    penalty_max_seconds=st.floats(10, 60),
    lockout_failures=st.integers(0, 20),
    address_lockout_failures=st.integers(0, 40),
    lockout_window_seconds=st.floats(1, 3600),
    lockout_seconds=st.floats(1, 3600),
)


@given(policy=policies, failures=st.integers(1, 60), gap=st.floats(0, 5))
def test_delays_are_monotone_and_capped(policy: ThrottlePolicy, failures: int, gap: float) -> None:
    table = ThrottleTable()
    delays = []
    for n in range(failures):
        now = n * gap
        table.failure("192.0.2.1", "u", credential(n), now=now, policy=policy)
        delays.append(table.decide("192.0.2.1", "u", now=now, policy=policy).delay_seconds)
    assert all(0 <= d <= policy.penalty_max_seconds for d in delays)
    assert delays == sorted(delays)


@settings(max_examples=30)
@given(names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=400))
def test_the_table_stays_bounded_whatever_names_arrive(names: list[str]) -> None:
    table = ThrottleTable(max_keys=16)
    for n, name in enumerate(names):
        table.failure(
            f"10.0.{n % 256}.{n // 256}", name, credential(n), now=float(n), policy=POLICY
        )
        assert len(table) <= 2 * 16


def test_a_flood_of_random_names_keeps_the_default_bound() -> None:
    table = ThrottleTable()
    for n in range(MAX_TRACKED_KEYS + 500):
        table.failure("192.0.2.1", f"random-{n}", credential(n), now=n / 1000, policy=POLICY)
    assert len(table) == 1 + MAX_TRACKED_KEYS


events = st.lists(
    st.tuples(
        st.sampled_from(["fail", "ok", "decide"]),
        st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::/64"]),
        st.integers(0, 15),  # which password
        st.floats(0, 120),  # seconds since the previous event
    ),
    max_size=60,
)


@given(policy=policies, history=events)
def test_existing_and_unknown_users_are_treated_alike(
    policy: ThrottlePolicy, history: list[tuple[str, str, int, float]]
) -> None:
    """The table never sees the user list: the same history for an existing name and an
    unknown one gives the same decisions, so no delay or lockout tells them apart."""
    outcomes = []
    for user in ("alice", "no-such-user"):
        table = ThrottleTable()
        now = 0.0
        seen: list[object] = []
        for kind, source, password, gap in history:
            now += gap
            if kind == "fail":
                seen.append(
                    table.failure(source, user, credential(password), now=now, policy=policy)
                )
            elif kind == "ok":
                table.success(source, now=now, policy=policy)
            else:
                seen.append(table.decide(source, user, now=now, policy=policy))
        outcomes.append(seen)
    assert outcomes[0] == outcomes[1]


def test_a_user_lockout_says_whether_the_address_is_locked_too() -> None:
    """A known-good source is spared the name's lockout (popproxy/known_sources.py),
    never its address's: the decision carries both."""
    table = ThrottleTable()
    now = fail_distinct(table, DEFAULTS.auth_lockout_failures, source="192.0.2.7")
    decision = table.decide("192.0.2.7", "alice", now=now, policy=POLICY)
    assert (decision.lockout, decision.address_locked) == (LockScope.USER, False)
    spared = decision.sparing_user()
    assert spared == ThrottleDecision(decision.delay_seconds)  # the penalty stays
    assert spared.delay_seconds > 0
    # The same address locked out as well (many names): spared the name, not the address.
    policy = dataclasses.replace(POLICY, address_lockout_failures=DEFAULTS.auth_lockout_failures)
    table = ThrottleTable()
    now = fail_distinct(table, DEFAULTS.auth_lockout_failures, source="192.0.2.8", policy=policy)
    decision = table.decide("192.0.2.8", "alice", now=now, policy=policy)
    assert (decision.lockout, decision.address_locked) == (LockScope.USER, True)
    assert decision.sparing_user().lockout is LockScope.ADDRESS
    # Anything but a user lockout is left as it is.
    address_only = table.decide("192.0.2.8", "bob", now=now, policy=policy)
    assert address_only.lockout is LockScope.ADDRESS
    assert address_only.sparing_user() is address_only
    assert ALLOW.sparing_user() is ALLOW
