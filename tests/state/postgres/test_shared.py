"""Leases and login failures in PostgreSQL (popproxy/state/postgres/shared.py): what several
instances share beside the store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import pytest
import trio

from popproxy.auth.throttle import Failures, LockScope, ThrottlePolicy
from popproxy.auth.throttling import FailureKey, SharedThrottle
from popproxy.state.postgres import PostgresTarget
from popproxy.state.postgres.shared import PostgresShared, open_shared
from state.state_backends import PostgresBackend, admin_connection

POLICY = ThrottlePolicy(
    penalty_initial_seconds=0,
    penalty_max_seconds=0,
    lockout_failures=3,
    address_lockout_failures=5,
    lockout_window_seconds=600,
    lockout_seconds=900,
)


@pytest.fixture
async def shared(pg_backend: PostgresBackend) -> AsyncIterator[PostgresShared]:
    opened = await open_shared(PostgresTarget(pg_backend.url))
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_a_lease_has_one_holder_until_released(shared: PostgresShared) -> None:
    assert await shared.take_lease("box", "a", "t1", 30)
    assert not await shared.take_lease("box", "b", "t2", 30)
    assert not await shared.take_lease("box", "a", "t3", 30)  # not even its own holder
    assert await shared.take_lease("other", "b", "t4", 30)
    await shared.release_lease("box", "t2")  # not t2's: nothing happens
    assert not await shared.take_lease("box", "b", "t5", 30)
    await shared.release_lease("box", "t1")
    assert await shared.take_lease("box", "b", "t6", 30)


async def test_a_take_run_again_with_its_token_still_holds_the_lease(
    shared: PostgresShared,
) -> None:
    """A take whose connection the server ended after its commit runs once more
    (target.run_pooled): the same token takes its own lease again, no other does."""
    assert await shared.take_lease("box", "a", "t1", 30)
    assert await shared.take_lease("box", "a", "t1", 30)
    assert not await shared.take_lease("box", "b", "t2", 30)
    await shared.release_lease("box", "t1")
    assert await shared.take_lease("box", "b", "t2", 30)


async def test_a_lapsed_lease_is_taken_over_and_lost_to_its_old_holder(
    shared: PostgresShared,
) -> None:
    assert await shared.take_lease("box", "a", "t1", 0.2)
    await trio.sleep(0.3)  # real time: the database's clock decides
    assert await shared.take_lease("box", "b", "t2", 30)
    assert await shared.renew_leases("a", ["t1"], 30) == frozenset()
    assert not await shared.confirm_lease("box", "t1", 30)
    await shared.release_lease("box", "t1")  # the old holder's release frees nothing
    assert not await shared.take_lease("box", "c", "t3", 30)
    assert await shared.confirm_lease("box", "t2", 30)


async def test_renewal_keeps_only_the_named_live_leases(
    shared: PostgresShared, pg_backend: PostgresBackend
) -> None:
    for name, token in (("m1", "t1"), ("m2", "t2"), ("m3", "t3")):
        assert await shared.take_lease(name, "a", token, 0.5)
    assert await shared.take_lease("m4", "b", "t4", 0.5)
    assert await shared.renew_leases("a", ["t1", "t2", "t4"], 60) == {"t1", "t2"}
    await trio.sleep(0.6)
    live = pg_backend.query("SELECT name FROM leases WHERE expires_at > now() ORDER BY name")
    assert live == [("m1",), ("m2",)]


async def test_concurrent_takes_of_one_name_have_one_winner(shared: PostgresShared) -> None:
    won: list[str] = []

    async def take(n: int) -> None:
        if await shared.take_lease("box", f"h{n}", f"t{n}", 30):
            won.append(f"t{n}")

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(take, n)
    assert len(won) == 1


async def test_stale_leases_are_pruned(shared: PostgresShared, pg_backend: PostgresBackend) -> None:
    assert await shared.take_lease("old", "a", "t1", 30)
    assert await shared.take_lease("live", "a", "t2", 30)
    with admin_connection(pg_backend.url) as conn:
        conn.execute("UPDATE leases SET expires_at = now() - interval '2 hours' WHERE name = 'old'")
    assert await shared.prune_leases() == 1
    assert pg_backend.query("SELECT name FROM leases") == [("live",)]


async def test_failures_counted_by_two_instances_add_up(pg_backend: PostgresBackend) -> None:
    """Two instances (two pools, two throttles) each see one guess of three: the third
    locks the user out for both."""
    first = await open_shared(PostgresTarget(pg_backend.url))
    second = await open_shared(PostgresTarget(pg_backend.url))
    try:
        one, two = SharedThrottle(first), SharedThrottle(second)
        assert await one.failure("192.0.2.1", "alice", b"guess-1", POLICY) == ()
        assert await two.failure("192.0.2.2", "alice", b"guess-2", POLICY) == ()
        assert await one.failure("192.0.2.3", "alice", b"guess-3", POLICY) == (LockScope.USER,)
        for throttle in (one, two):
            decision = await throttle.decide("198.51.100.9", "alice", POLICY)
            assert decision.lockout is LockScope.USER
            assert (await throttle.decide("198.51.100.9", "bob", POLICY)).lockout is None
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_retry_of_one_wrong_password_counts_once_per_instance(
    shared: PostgresShared,
) -> None:
    throttle = SharedThrottle(shared)
    for _ in range(5):
        assert await throttle.failure("192.0.2.1", "alice", b"old-password", POLICY) == ()
    assert (await throttle.decide("192.0.2.1", "alice", POLICY)).lockout is None


async def test_concurrent_failures_of_new_keys_all_count(shared: PostgresShared) -> None:
    """Twenty failures at once for one user never seen before: none is lost (the rows
    are made before they are locked)."""
    policy = ThrottlePolicy(0, 0, 20, 0, 600, 900)
    throttles = [SharedThrottle(shared) for _ in range(20)]
    started: list[tuple[LockScope, ...]] = []

    async def fail(n: int) -> None:
        started.append(
            await throttles[n].failure(f"192.0.2.{n}", "carol", f"g{n}".encode(), policy)
        )

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(fail, n)
    assert sorted(started) == [()] * 19 + [(LockScope.USER,)]


async def test_a_success_lifts_the_shared_penalty_and_writes_nothing_without_one(
    shared: PostgresShared, pg_backend: PostgresBackend
) -> None:
    policy = ThrottlePolicy(2, 15, 0, 0, 600, 900)
    throttle = SharedThrottle(shared)
    await throttle.success("203.0.113.5", policy, penalized=False)  # nothing asked
    assert pg_backend.query("SELECT count(*) FROM login_failures") == [(0,)]
    await throttle.failure("192.0.2.1", "alice", b"wrong", policy)
    assert (await throttle.decide("192.0.2.1", "bob", policy)).delay_seconds == 2
    await SharedThrottle(shared).success("192.0.2.1", policy, penalized=True)  # another one
    assert (await throttle.decide("192.0.2.1", "bob", policy)).delay_seconds == 0


async def test_rows_that_no_longer_matter_are_pruned(
    shared: PostgresShared, pg_backend: PostgresBackend
) -> None:
    throttle = SharedThrottle(shared)
    for n in range(3):
        await throttle.failure("192.0.2.1", f"user{n}", b"x", POLICY)
    with admin_connection(pg_backend.url) as conn:
        conn.execute("UPDATE login_failures SET last_failure = last_failure - 3600")
        conn.execute(
            "UPDATE login_failures SET locked_until = 'infinity' WHERE key = 'user0'"
        )  # locked: kept
    assert await throttle.prune(POLICY) == 3
    assert pg_backend.query("SELECT key FROM login_failures") == [("user0",)]


async def test_a_read_may_not_write(shared: PostgresShared) -> None:
    key: FailureKey = (LockScope.USER, "alice")

    def sneaky(
        now: float, rows: Mapping[FailureKey, Failures]
    ) -> tuple[None, Mapping[FailureKey, Failures | None]]:
        return None, {key: Failures(penalty=1, last_failure=now)}

    with pytest.raises(ValueError, match="may not write"):
        await shared.change_failures([key], sneaky, writes=False)
