"""SharedLocks (popproxy/shared_locks.py): one holder per mailbox across processes, on
leases. Here each "process" is a SharedLocks of its own over one lease table kept in
a dict with the database's contract (expiry on the table's clock: trio's, so the
bounds are checked with autojump_clock); tests/state/postgres/test_shared.py runs the
same calls on PostgreSQL, and tests/integration/test_scale_out.py two real
instances."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.locks import MailboxLost, MaildirMailbox, UpstreamMailbox
from popproxy.logfmt import SESSION_ID
from popproxy.maildrop.base import MaildropError, MaildropInUse
from popproxy.pop3.replies import ResponseCode
from popproxy.shared_locks import (
    LEASE_POLL_SECONDS,
    RENEWALS_PER_LEASE,
    SharedHold,
    SharedLocks,
    lease_name,
)
from popproxy.state.base import StateError

ALICE = UpstreamMailbox("pop.example.net", 995, "alice@example.net")
BOB = UpstreamMailbox("pop.example.net", 995, "bob@example.net")
LEASE = 30.0


class TableBackend:
    """Leases in a dict; ``down`` makes every call fail as an unreachable database."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, str, float]] = {}  # name -> holder, token, expiry
        self.down = False
        self.takes = 0

    def _check(self) -> None:
        if self.down:
            raise StateError("state store postgresql://db:5432/popproxy: connection refused")

    async def take_lease(self, name: str, holder: str, token: str, seconds: float) -> bool:
        self._check()
        self.takes += 1
        now = trio.current_time()
        row = self.rows.get(name)
        if row is not None and row[2] > now:
            return False
        self.rows[name] = (holder, token, now + seconds)
        return True

    async def renew_leases(
        self, holder: str, tokens: Sequence[str], seconds: float
    ) -> frozenset[str]:
        self._check()
        now = trio.current_time()
        kept = set()
        for name, (who, token, expiry) in list(self.rows.items()):
            if who == holder and token in tokens and expiry > now:
                self.rows[name] = (who, token, now + seconds)
                kept.add(token)
        return frozenset(kept)

    async def confirm_lease(self, name: str, token: str, seconds: float) -> bool:
        self._check()
        now = trio.current_time()
        row = self.rows.get(name)
        if row is None or row[1] != token or row[2] <= now:
            return False
        self.rows[name] = (row[0], token, now + seconds)
        return True

    async def release_lease(self, name: str, token: str) -> None:
        self._check()
        row = self.rows.get(name)
        if row is not None and row[1] == token:
            del self.rows[name]

    async def prune_leases(self) -> int:
        self._check()
        return 0

    def holder_of(self, name: str) -> str | None:
        row = self.rows.get(name)
        return row[0] if row is not None and row[2] > trio.current_time() else None


def instances(backend: TableBackend, count: int = 2) -> list[SharedLocks]:
    return [SharedLocks(backend, lease_seconds=LEASE, holder=f"instance-{n}") for n in range(count)]


async def test_a_second_instance_waits_then_is_refused_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = TableBackend()
    one, two = instances(backend)
    async with one.hold(ALICE, wait_seconds=10):
        started = trio.current_time()
        with pytest.raises(MaildropInUse) as refused:
            async with two.hold(ALICE, wait_seconds=10):
                pytest.fail("two instances held one mailbox")
        assert trio.current_time() - started == pytest.approx(10)
        assert refused.value.code is ResponseCode.IN_USE
        with pytest.raises(MaildropInUse):  # no wait: refused at once
            async with two.hold(ALICE, wait_seconds=0):
                pass
        async with two.hold(BOB, wait_seconds=0):  # another mailbox is free
            assert backend.holder_of(lease_name(BOB)) == "instance-1"
    assert backend.rows == {}  # both released


async def test_a_waiter_on_another_instance_takes_over_when_the_holder_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = TableBackend()
    one, two = instances(backend)
    order: list[str] = []

    async def second() -> None:
        async with two.hold(ALICE, wait_seconds=10):
            order.append("two")

    async with trio.open_nursery() as nursery, one.hold(ALICE, wait_seconds=10):
        nursery.start_soon(second)
        await trio.sleep(3)
        order.append("one")
    assert order == ["one", "two"]
    # It asked again every LEASE_POLL_SECONDS, not in a busy loop.
    assert backend.takes <= 2 + 3 / LEASE_POLL_SECONDS + 1


async def test_sessions_of_one_instance_queue_locally_and_only_one_asks_the_database(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = TableBackend()
    (one,) = instances(backend, 1)
    active = 0
    most = 0

    async def session() -> None:
        nonlocal active, most
        async with one.hold(ALICE, wait_seconds=60):
            active += 1
            most = max(most, active)
            await trio.sleep(1)
            active -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(session)
    assert most == 1
    assert backend.takes == 1  # the lease passed from session to session here
    assert backend.rows == {}  # and went back when the last one left


async def test_renewal_keeps_a_lease_past_its_time_and_a_dead_holders_lapses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Instance one renews while it lives. Then it dies without releasing anything
    (as under SIGKILL: here its release cannot reach the table): its mailbox is free
    for instance two within lease_seconds of its last renewal."""
    backend = TableBackend()
    one, two = instances(backend)
    name = lease_name(ALICE)
    holding = trio.Event()

    async def session() -> None:
        async with one.hold(ALICE, wait_seconds=0):
            holding.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as process:
        await process.start(one.run)
        process.start_soon(session)
        await holding.wait()
        await trio.sleep(3 * LEASE)
        assert backend.holder_of(name) == "instance-0"  # renewed all along
        with pytest.raises(MaildropInUse):
            async with two.hold(ALICE, wait_seconds=0):
                pass
        backend.down = True  # the dying process reaches the table no more
        process.cancel_scope.cancel()
    backend.down = False
    last_renewal_expiry = backend.rows[name][2]
    assert backend.holder_of(name) == "instance-0"  # not released
    async with two.hold(ALICE, wait_seconds=LEASE + 1):
        assert trio.current_time() <= last_renewal_expiry + LEASE_POLL_SECONDS
        assert backend.holder_of(name) == "instance-1"


async def test_confirm_renews_and_a_taken_over_lease_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = TableBackend()
    one, two = instances(backend)
    async with one.hold(ALICE, wait_seconds=0) as hold:
        assert isinstance(hold, SharedHold)
        await trio.sleep(LEASE * 0.8)
        await hold.confirm()  # still ours, and renewed
        await trio.sleep(LEASE * 0.8)
        assert backend.holder_of(lease_name(ALICE)) == "instance-0"
        await trio.sleep(LEASE)  # no renewer ran: it lapsed
        async with two.hold(ALICE, wait_seconds=0):
            with pytest.raises(MaildropError) as lost:
                await hold.confirm()
            assert lost.value.code is ResponseCode.SYS_TEMP
            assert hold.lost
        assert backend.rows == {}  # two released its own; one had nothing to release


async def test_wait_lost_returns_when_a_renewal_finds_the_lease_taken_over_and_logs_its_session(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The renewal task, not the holder's, finds the lease gone: its lease_lost line
    names the holder's session all the same, and wait_lost returns at once."""
    backend = TableBackend()
    (one,) = instances(backend, 1)
    logging_as = SESSION_ID.set("sess1234")
    try:
        async with one.hold(ALICE, wait_seconds=0) as hold:
            SESSION_ID.reset(logging_as)
            name = lease_name(ALICE)
            backend.rows[name] = ("thief", "other-token", trio.current_time() + LEASE)
            with trio.move_on_after(1) as waiting:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hold.wait_lost)
                    await trio.sleep(0.1)
                    await one.renew()
            assert not waiting.cancelled_caught  # wait_lost returned
            with pytest.raises(MailboxLost):
                await hold.confirm()
    finally:
        if SESSION_ID.get() is not None:
            SESSION_ID.reset(logging_as)
    [line] = [r for r in caplog.records if r.getMessage() == "lease_lost"]
    assert line.fields == {"session": "sess1234", "lease": name}  # type: ignore[attr-defined]
    assert backend.rows[name][0] == "thief"  # one deleted nothing of the thief's


async def test_wait_lost_returns_once_the_validity_passes_unrenewed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = TableBackend()
    (one,) = instances(backend, 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(one.run)
        async with one.hold(ALICE, wait_seconds=0) as hold:
            await trio.sleep(3 * LEASE)  # renewed all along: not lost
            backend.down = True
            started = trio.current_time()
            await hold.wait_lost()
            assert trio.current_time() - started <= LEASE
            backend.down = False
        nursery.cancel_scope.cancel()


async def test_a_lease_not_renewed_for_want_of_the_database_is_lost_here_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The database goes away: the holder cannot renew, and before the database's
    expiry it already counts the lease as lost; confirm then refuses, so nothing is
    deleted, and it refuses too while the database is down."""
    backend = TableBackend()
    (one,) = instances(backend, 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(one.run)
        async with one.hold(ALICE, wait_seconds=0) as hold:
            assert isinstance(hold, SharedHold)
            backend.down = True
            expiry = backend.rows[lease_name(ALICE)][2]
            await trio.sleep(LEASE / RENEWALS_PER_LEASE * 2)
            assert not hold.lost
            await trio.sleep(expiry - trio.current_time() - 0.01)
            assert hold.lost  # before the database's expiry
            with pytest.raises(MaildropError):
                await hold.confirm()
            backend.down = False
        nursery.cancel_scope.cancel()


async def test_an_unreachable_database_refuses_a_hold_with_sys_temp(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = TableBackend()
    (one,) = instances(backend, 1)
    backend.down = True
    with pytest.raises(MaildropError) as refused:
        async with one.hold(ALICE, wait_seconds=10):
            pytest.fail("held without the database")
    assert refused.value.code is ResponseCode.SYS_TEMP
    assert not one._slots  # the local slot was given back
    backend.down = False
    async with one.hold(ALICE, wait_seconds=0):
        backend.down = True  # the release fails: logged, and the lease lapses by itself
    assert lease_name(ALICE) in backend.rows


def test_lease_names_tell_mailboxes_apart() -> None:
    names = {
        lease_name(ALICE),
        lease_name(BOB),
        lease_name(UpstreamMailbox("pop.example.net", 110, "alice@example.net")),
        lease_name(UpstreamMailbox("pop.example.net:995", 995, "alice@example.net")),
        lease_name(MaildirMailbox(Path("/var/mail/alice"))),
    }
    assert len(names) == 5


async def test_a_lease_handed_to_a_waiter_that_gives_up_goes_back_to_the_database(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The holder leaves just as the only waiter here gives up: the lease is not kept
    (and renewed) for nobody."""
    backend = TableBackend()
    (one,) = instances(backend, 1)
    async with trio.open_nursery() as nursery:

        async def waiter() -> None:
            with pytest.raises(MaildropInUse):
                async with one.hold(ALICE, wait_seconds=1):
                    pytest.fail("got the mailbox after its wait")

        async with one.hold(ALICE, wait_seconds=0):
            nursery.start_soon(waiter)
            await trio.sleep(1)  # the waiter's deadline and this release coincide
    assert backend.rows == {}
    assert not one._slots
    assert not one._held
