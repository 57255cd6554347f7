"""AccountLocks: one session per upstream account, a bounded wait, then [IN-USE] (RFC 1939 §4)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from popproxy.maildrop.base import MaildropInUse
from popproxy.maildrop.retention import AccountLocks
from popproxy.pop3.replies import ResponseCode
from popproxy.state.base import AccountKey

ALICE = AccountKey("provider", "alice@example.net")
BOB = AccountKey("provider", "bob@example.net")
WAIT_SECONDS = 5.0


async def test_a_second_session_waits_for_the_first_to_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = AccountLocks()
    release_first = await locks.acquire(ALICE, wait_seconds=WAIT_SECONDS)
    got_it_at: list[float] = []

    async def second() -> None:
        release = await locks.acquire(ALICE, wait_seconds=WAIT_SECONDS)
        got_it_at.append(trio.current_time())
        release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.sleep(2)
        assert got_it_at == []  # still waiting
        started = trio.current_time()
        release_first()
    assert got_it_at == [started]
    assert not locks.held(ALICE)


async def test_the_wait_ends_in_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = AccountLocks()
    release = await locks.acquire(ALICE, wait_seconds=WAIT_SECONDS)
    refusals: list[tuple[float, MaildropInUse]] = []

    async def second() -> None:  # another session: another task
        start = trio.current_time()
        with pytest.raises(MaildropInUse) as refused:
            await locks.acquire(ALICE, wait_seconds=WAIT_SECONDS)
        refusals.append((trio.current_time() - start, refused.value))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
    [(waited, error)] = refusals
    assert waited == pytest.approx(WAIT_SECONDS)
    assert error.code is ResponseCode.IN_USE
    release()
    assert not locks.held(ALICE)  # the refused waiter left nothing behind


async def test_accounts_are_independent() -> None:
    locks = AccountLocks()
    release_alice = await locks.acquire(ALICE, wait_seconds=0)
    release_bob = await locks.acquire(BOB, wait_seconds=0)  # no wait: a different account
    release_alice()
    release_bob()
    assert not locks.held(ALICE) and not locks.held(BOB)


async def test_release_twice_is_harmless() -> None:
    locks = AccountLocks()
    release = await locks.acquire(ALICE, wait_seconds=0)
    release()
    release()
    again = await locks.acquire(ALICE, wait_seconds=0)
    again()


async def test_a_cancelled_waiter_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = AccountLocks()
    release = await locks.acquire(ALICE, wait_seconds=WAIT_SECONDS)

    async def impatient() -> None:
        with trio.move_on_after(1):
            await locks.acquire(ALICE, wait_seconds=WAIT_SECONDS)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(impatient)
    release()
    assert not locks.held(ALICE)


async def test_waiters_are_served_in_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = AccountLocks()
    order: list[int] = []
    first = await locks.acquire(ALICE, wait_seconds=WAIT_SECONDS)

    async def waiter(n: int) -> None:
        release = await locks.acquire(ALICE, wait_seconds=WAIT_SECONDS)
        order.append(n)
        await trio.sleep(0.1)
        release()

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(waiter, n)
            await trio.sleep(0.01)  # queue them in this order
        first()
    assert order == [0, 1, 2]  # trio.Lock is fair (FIFO)
    assert not locks.held(ALICE)
