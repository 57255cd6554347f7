"""LocalThrottle and SharedThrottle (popproxy/auth/throttling.py): one instance with
shared counts decides exactly as one process with its own table; N instances share
their counts. The shared store here is a dict with the store's contract (one
change at a time, its own clock); tests/state/postgres/test_shared.py runs PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.auth.throttle import Failures, LockScope, ThrottlePolicy, ThrottleTable
from popproxy.auth.throttling import (
    FailureChange,
    FailureKey,
    LocalThrottle,
    LoginThrottle,
    SharedThrottle,
)

_T = TypeVar("_T")

POLICY = ThrottlePolicy(
    penalty_initial_seconds=2,
    penalty_max_seconds=15,
    lockout_failures=4,
    address_lockout_failures=6,
    lockout_window_seconds=300,
    lockout_seconds=900,
)


class DictBackend:
    """Shared counts in a dict, ``now`` from trio's clock (as the database's clock)."""

    def __init__(self) -> None:
        self.rows: dict[FailureKey, Failures] = {}
        self.writes = 0

    async def change_failures(
        self, keys: Sequence[FailureKey], change: FailureChange[_T], *, writes: bool
    ) -> _T:
        known = {key: self.rows[key] for key in keys if key in self.rows}
        result, changed = change(trio.current_time(), known)
        assert writes or not changed
        for key, value in changed.items():
            self.writes += 1
            if value is None:
                self.rows.pop(key, None)
            else:
                self.rows[key] = value
        return result

    async def prune_failures(self, remembered_seconds: float) -> int:
        now = trio.current_time()
        gone = [
            key
            for key, value in self.rows.items()
            if value.last_failure < now - remembered_seconds and value.locked_until < now
        ]
        for key in gone:
            del self.rows[key]
        return len(gone)


# One attempt: (address number, user number, password number, right password?, wait).
ATTEMPTS = st.lists(
    st.tuples(
        st.integers(0, 2), st.integers(0, 2), st.integers(0, 12), st.booleans(), st.floats(0, 400)
    ),
    max_size=40,
)


async def replay(
    throttle: LoginThrottle, attempts: list[tuple[int, int, int, bool, float]]
) -> list[object]:
    seen: list[object] = []
    for address, user, password, right, wait in attempts:
        await trio.sleep(wait)
        source, name = f"192.0.2.{address}", f"user{user}"
        decision = await throttle.decide(source, name, POLICY)
        seen.append(decision)
        if decision.locked_out:
            continue
        if right:
            await throttle.success(source, POLICY, penalized=decision.delay_seconds > 0)
        else:
            seen.append(await throttle.failure(source, name, bytes([password]), POLICY))
    return seen


@settings(max_examples=60, deadline=None)
@given(ATTEMPTS)
def test_one_instance_with_shared_counts_decides_as_a_local_table(
    attempts: list[tuple[int, int, int, bool, float]],
) -> None:
    async def both() -> tuple[list[object], list[object]]:
        return (
            await replay(LocalThrottle(ThrottleTable()), attempts),
            await replay(SharedThrottle(DictBackend()), attempts),
        )

    local, shared = trio.run(both, clock=trio.testing.MockClock(autojump_threshold=0))
    assert local == shared


async def test_guesses_through_three_instances_count_as_through_one() -> None:
    backend = DictBackend()
    instances = [SharedThrottle(backend) for _ in range(3)]
    for n in range(3):
        started = await instances[n].failure(f"192.0.2.{n}", "alice", bytes([n]), POLICY)
        assert started == ()
    assert await instances[0].failure("192.0.2.9", "alice", b"x", POLICY) == (LockScope.USER,)
    for throttle in instances:
        assert (await throttle.decide("198.51.100.1", "alice", POLICY)).lockout is LockScope.USER


async def test_a_retry_counts_once_per_instance_that_sees_it() -> None:
    backend = DictBackend()
    one, two = SharedThrottle(backend), SharedThrottle(backend)
    for _ in range(3):
        await one.failure("192.0.2.1", "alice", b"old", POLICY)
        await two.failure("192.0.2.1", "alice", b"old", POLICY)
    assert len(backend.rows[(LockScope.USER, "alice")].failures) == 2  # not 6
    assert (await one.decide("192.0.2.1", "alice", POLICY)).lockout is None


async def test_a_success_without_a_penalty_asks_nothing() -> None:
    backend = DictBackend()
    await SharedThrottle(backend).success("192.0.2.1", POLICY, penalized=False)
    assert backend.writes == 0 and backend.rows == {}


async def test_prune_forgets_what_no_longer_matters(autojump_clock: trio.testing.MockClock) -> None:
    backend = DictBackend()
    throttle = SharedThrottle(backend)
    await throttle.failure("192.0.2.1", "alice", b"x", POLICY)
    assert await throttle.prune(POLICY) == 0
    await trio.sleep(POLICY.lockout_window_seconds + 1)
    assert await throttle.prune(POLICY) == 2
    assert backend.rows == {}
