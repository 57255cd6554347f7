"""Mailbox locks: one session per mailbox, a bounded wait, then [IN-USE] (RFC 1939 §4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.locks import (
    WAITED_TEXT,
    InProcessLocks,
    MailboxLocks,
    MaildirMailbox,
    UpstreamMailbox,
    default_locks,
)
from popproxy.maildrop.base import MaildropInUse
from popproxy.pop3.replies import ResponseCode

ALICE = UpstreamMailbox("pop.example.net", 995, "alice@example.net")
BOB = UpstreamMailbox("pop.example.net", 995, "bob@example.net")
WAIT_SECONDS = 5.0


async def test_a_second_session_waits_for_the_first_to_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = InProcessLocks()
    got_it_at: list[float] = []

    async def second() -> None:
        async with locks.hold(ALICE, wait_seconds=WAIT_SECONDS):
            got_it_at.append(trio.current_time())

    async with trio.open_nursery() as nursery, locks.hold(ALICE, wait_seconds=WAIT_SECONDS):
        nursery.start_soon(second)
        await trio.sleep(2)
        assert got_it_at == []  # still waiting
        started = trio.current_time()
    assert got_it_at == [started]
    assert not locks.held(ALICE)


async def test_the_wait_ends_in_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = InProcessLocks()
    refusals: list[tuple[float, MaildropInUse]] = []

    async def second() -> None:  # another session: another task
        start = trio.current_time()
        with pytest.raises(MaildropInUse) as refused:
            async with locks.hold(ALICE, wait_seconds=WAIT_SECONDS):
                pytest.fail("the mailbox is held")
        refusals.append((trio.current_time() - start, refused.value))

    async with locks.hold(ALICE, wait_seconds=WAIT_SECONDS), trio.open_nursery() as nursery:
        nursery.start_soon(second)
    [(waited, error)] = refusals
    assert waited == pytest.approx(WAIT_SECONDS)
    assert error.code is ResponseCode.IN_USE
    assert error.text == WAITED_TEXT
    assert not locks.held(ALICE)  # the refused waiter left nothing behind


async def test_no_wait_refuses_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """A Maildir's lock: a second session is refused without waiting (RFC 2449 §8.1.1)."""
    locks = InProcessLocks()
    mailbox = MaildirMailbox(Path("/var/mail/demo"))
    async with locks.hold(mailbox, wait_seconds=0):
        start = trio.current_time()
        with pytest.raises(MaildropInUse) as refused:
            async with locks.hold(mailbox, wait_seconds=0):
                pytest.fail("the mailbox is held")
        assert trio.current_time() == start
        assert str(refused.value) == "[IN-USE] mailbox is locked by another session"
        assert locks.held(mailbox)
    assert not locks.held(mailbox)


async def test_mailboxes_are_independent() -> None:
    locks = InProcessLocks()
    maildir = MaildirMailbox(Path("/var/mail/alice"))
    async with (  # no wait: each is a different mailbox
        locks.hold(ALICE, wait_seconds=0),
        locks.hold(BOB, wait_seconds=0),
        locks.hold(maildir, wait_seconds=0),
    ):
        assert locks.held(ALICE) and locks.held(BOB) and locks.held(maildir)
    assert not locks.held(ALICE) and not locks.held(BOB) and not locks.held(maildir)


async def test_keys_are_values() -> None:
    """Two keys built alike name one mailbox (the router builds a new key per login)."""
    locks: MailboxLocks = InProcessLocks()
    async with locks.hold(
        UpstreamMailbox("pop.example.net", 995, "alice@example.net"), wait_seconds=0
    ):
        with pytest.raises(MaildropInUse):
            async with locks.hold(ALICE, wait_seconds=0):
                pass


async def test_the_body_failing_releases_the_mailbox() -> None:
    locks = InProcessLocks()
    with pytest.raises(ValueError, match="boom"):
        async with locks.hold(ALICE, wait_seconds=0):
            raise ValueError("boom")
    assert not locks.held(ALICE)
    async with locks.hold(ALICE, wait_seconds=0):
        pass


async def test_a_cancelled_waiter_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = InProcessLocks()

    async def impatient() -> None:
        with trio.move_on_after(1):
            async with locks.hold(ALICE, wait_seconds=WAIT_SECONDS):
                pytest.fail("the mailbox is held")

    async with locks.hold(ALICE, wait_seconds=WAIT_SECONDS), trio.open_nursery() as nursery:
        nursery.start_soon(impatient)
    assert not locks.held(ALICE)


async def test_waiters_are_served_in_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = InProcessLocks()
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with locks.hold(ALICE, wait_seconds=WAIT_SECONDS):
            order.append(n)
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery, locks.hold(ALICE, wait_seconds=WAIT_SECONDS):
        for n in range(3):
            nursery.start_soon(waiter, n)
            await trio.sleep(0.01)  # queue them in this order
    assert order == [0, 1, 2]  # trio's parking lot is FIFO
    assert not locks.held(ALICE)


async def test_default_locks_are_one_table_per_run() -> None:
    assert default_locks() is default_locks()
