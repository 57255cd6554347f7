"""One session (or poll) per mailbox across processes: ``MailboxLocks`` on leases.

Theory of operation. A mailbox held across instances is a *lease*: a row in the
shared store (``popproxy/state/postgres/shared.py``) naming the mailbox, its holder (this
process) and an expiry on the database's clock. Taking it is one statement; giving
it back is one statement; in between, one task per process (``SharedLocks.run``)
renews every lease the process holds with one statement every ``lease_seconds / 3``.
So holding a mailbox costs a row, not a connection: 10,000 idle sessions hold
10,000 rows and the process still uses its few pooled connections.

Inside one process, sessions on one mailbox queue in turn (as ``InProcessLocks``),
and only the one at the head asks the database; when a session leaves and another
of the process waits, the lease passes to it without a round trip. Across processes
a waiter asks again every ``LEASE_POLL_SECONDS`` until its wait
(``limits.account_wait_seconds``) ends, then gets ``[IN-USE]``.

An instance that dies (``SIGKILL``, a lost machine) stops renewing: its leases
lapse at most ``lease_seconds`` after their last renewal, and any other instance
may take them then. The bound is the database's clock, so the instances' clocks
need not agree.

A holder that cannot renew in time (the database unreachable) counts its lease as
lost once ``lease_seconds`` minus a margin have passed since the start of its last
successful renewal (its own clock, so no later than the database's expiry).
``Hold.confirm``, called before any upstream deletion, asks the database whether
the lease is still this holder's and renews it; when it is not, or the database
cannot say, the deletion is not made (``[SYS/TEMP]``). A session whose lease is
lost so deletes nothing, whatever its client does next. ``Hold.wait_lost`` returns
once the holder knows its lease lost (a renewal found it taken, or its validity
passed unrenewed): a gateway poll stops there.

Each lease remembers the session (or gateway poll) that took it, from the log
context (``logfmt.SESSION_ID``), so that its ``lease_*`` lines logged by the renewal
task name it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from popproxy.locks import (
    WAITED_TEXT,
    Hold,
    MailboxKey,
    MailboxLost,
    MaildirMailbox,
    UpstreamMailbox,
)
from popproxy.logfmt import SESSION_ID
from popproxy.maildrop.base import MaildropError, MaildropInUse
from popproxy.pop3.replies import ResponseCode
from popproxy.state.base import StateError

log = logging.getLogger("popproxy.locks")

# How often a waiter asks the database again for a mailbox another instance holds.
LEASE_POLL_SECONDS = 0.5
# Leases are renewed this many times per lease_seconds (two renewals may fail in a
# row before a lease is at risk).
RENEWALS_PER_LEASE = 3
# A holder counts its lease as lost this share of lease_seconds early: its clock and
# the database's may run at slightly different rates.
LEASE_MARGIN_SHARE = 0.1
# Lapsed leases are deleted (postgres.shared.STALE_LEASE_SECONDS old) this often.
PRUNE_INTERVAL_SECONDS = 600


class LeaseBackend(Protocol):
    """Where leases live (``popproxy.state.postgres.shared.PostgresShared``); each call raises
    ``StateError`` when the store cannot be used."""

    async def take_lease(self, name: str, holder: str, token: str, seconds: float) -> bool: ...

    async def renew_leases(
        self, holder: str, tokens: Sequence[str], seconds: float
    ) -> frozenset[str]: ...

    async def confirm_lease(self, name: str, token: str, seconds: float) -> bool: ...

    async def release_lease(self, name: str, token: str) -> None: ...

    async def prune_leases(self) -> int: ...


def lease_name(key: MailboxKey) -> str:
    """The lease's name for a mailbox: readable in the ``leases`` table, and one name
    for one mailbox whichever instance asks."""
    match key:
        case UpstreamMailbox(host, port, user):
            return json.dumps(["upstream", host, port, user])
        case MaildirMailbox(path):
            return json.dumps(["maildir", str(path)])


def holder_name() -> str:
    """This process, as the ``holder`` column shows it: host, process id and a random
    part (a restarted process with a reused pid is another holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(slots=True)
class _Slot:
    """One mailbox in use in this process: its local queue, and the lease while held."""

    semaphore: trio.Semaphore
    users: int = 0  # sessions holding or waiting for it here
    lease: _Lease | None = None


@dataclass(slots=True)
class _Lease:
    """A lease this process holds (mutable; touched only from the trio thread)."""

    name: str
    token: str
    valid_until: float  # trio time; past it the lease counts as lost here
    session: str | None = None  # the session or poll holding it now (log lines)
    lost: bool = False
    gone: trio.Event = field(default_factory=trio.Event)  # set when a renewal found it lost

    def fields(self, **more: object) -> dict[str, object]:
        """The fields of a ``lease_*`` line about this lease."""
        return {"session": self.session or "-", "lease": self.name, **more}


class SharedHold:
    """``Hold`` of a lease: ``confirm`` asks the database (see the module doc)."""

    def __init__(self, locks: SharedLocks, lease: _Lease) -> None:
        self._locks = locks
        self._lease = lease

    @property
    def lost(self) -> bool:
        """Whether this holder knows its lease to be lost (diagnostics, tests)."""
        return self._lease.lost or trio.current_time() >= self._lease.valid_until

    async def confirm(self) -> None:
        """See ``Hold.confirm``."""
        await self._locks.confirm(self._lease)

    async def wait_lost(self) -> None:
        """See ``Hold.wait_lost``: a renewal found the lease lost, or its validity
        passed without one (the database may then let another holder in). A loss that
        the holder's own ``confirm`` found is told by its ``MailboxLost`` instead."""
        lease = self._lease
        while not self.lost:  # ends: lost, or valid_until passes unmoved
            with trio.move_on_at(lease.valid_until):
                await lease.gone.wait()


class SharedLocks:
    """``MailboxLocks`` across processes, on leases in a shared store (module doc)."""

    def __init__(
        self, backend: LeaseBackend, *, lease_seconds: float, holder: str | None = None
    ) -> None:
        self._backend = backend
        self._lease_seconds = lease_seconds
        self.holder = holder if holder is not None else holder_name()
        self._slots: dict[str, _Slot] = {}  # by lease name, while used here
        self._held: dict[str, _Lease] = {}  # by token
        self._renew_failing = False

    @property
    def lease_seconds(self) -> float:
        """How long a lease outlives its last renewal."""
        return self._lease_seconds

    @contextlib.asynccontextmanager
    async def hold(self, key: MailboxKey, *, wait_seconds: float) -> AsyncIterator[Hold]:
        """See ``MailboxLocks.hold``."""
        deadline = trio.current_time() + wait_seconds
        name = lease_name(key)
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = _Slot(trio.Semaphore(1, max_value=1))
        slot.users += 1
        try:
            await self._wait_here(slot, deadline, wait_seconds)
            try:
                lease = slot.lease
                if lease is None or lease.lost:
                    if lease is not None:  # lost while it was being handed over
                        slot.lease = None
                        self._held.pop(lease.token, None)
                    lease = await self._take(name, deadline, waited=wait_seconds > 0)
                    slot.lease = lease
                    self._held[lease.token] = lease
                lease.session = SESSION_ID.get()  # handed over here: the new holder's
            except BaseException:
                slot.semaphore.release()
                raise
            try:
                yield SharedHold(self, lease)
            finally:
                await self._leave(slot, lease)
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[name]
                if slot.lease is not None:  # handed to a waiter that gave up meanwhile
                    self._held.pop(slot.lease.token, None)
                    with trio.CancelScope(shield=True):
                        await self._release(slot.lease)

    async def _wait_here(self, slot: _Slot, deadline: float, wait_seconds: float) -> None:
        """Wait in this process's queue for the mailbox (trio's parking lot is FIFO)."""
        if slot.semaphore.value:
            slot.semaphore.acquire_nowait()  # the usual case: nobody else here
            return
        if wait_seconds <= 0:
            raise MaildropInUse()
        with trio.move_on_at(deadline):
            await slot.semaphore.acquire()
            return
        raise MaildropInUse(WAITED_TEXT)

    async def _leave(self, slot: _Slot, lease: _Lease) -> None:
        """Hand the lease to the next session of this process waiting for the mailbox
        (no round trip), or give it back to the database."""
        if slot.users > 1 and not lease.lost:
            slot.semaphore.release()  # the next one here holds the lease now
            return
        slot.lease = None
        self._held.pop(lease.token, None)
        slot.semaphore.release()  # first: a database that is down must not hold this up
        with trio.CancelScope(shield=True):
            await self._release(lease)

    async def _take(self, name: str, deadline: float, *, waited: bool) -> _Lease:
        token = secrets.token_hex(8)
        while True:  # ends: taken, or the deadline passes
            started = trio.current_time()
            try:
                taken = await self._backend.take_lease(
                    name, self.holder, token, self._lease_seconds
                )
            except StateError as exc:
                log.error(  # noqa: TRY400 (the reason is in the line)
                    "lease_unavailable", extra={"fields": {"reason": str(exc)}}
                )
                raise MaildropError(
                    ResponseCode.SYS_TEMP, "Mailbox locks are unavailable; try again later."
                ) from None
            if taken:
                return _Lease(name, token, self._valid_until(started))
            now = trio.current_time()
            if now >= deadline:
                raise MaildropInUse(WAITED_TEXT) if waited else MaildropInUse()
            await trio.sleep(min(LEASE_POLL_SECONDS, deadline - now))

    async def _release(self, lease: _Lease) -> None:
        if lease.lost:
            return  # nothing of ours to delete
        try:
            await self._backend.release_lease(lease.name, lease.token)
        except StateError as exc:
            # It lapses by itself within lease_seconds (nobody renews it now).
            log.warning("lease_not_released", extra={"fields": lease.fields(reason=str(exc))})

    async def confirm(self, lease: _Lease) -> None:
        """Ask the database whether ``lease`` is still held (and renew it); raise
        ``MailboxLost`` ``[SYS/TEMP]`` if it is not or the database cannot say."""
        started = trio.current_time()
        if not lease.lost:
            try:
                held = await self._backend.confirm_lease(
                    lease.name, lease.token, self._lease_seconds
                )
            except StateError as exc:
                log.error(  # noqa: TRY400 (the reason is in the line)
                    "lease_unconfirmed", extra={"fields": lease.fields(reason=str(exc))}
                )
                held = None
            if held:
                lease.valid_until = max(lease.valid_until, self._valid_until(started))
                return
            if held is False:
                self._lose(lease)
        raise MailboxLost("The mailbox lock was lost; nothing was deleted.")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew this process's leases every ``lease_seconds / RENEWALS_PER_LEASE`` and
        delete long-lapsed ones now and then, until cancelled."""
        task_status.started()
        interval = self._lease_seconds / RENEWALS_PER_LEASE
        next_prune = trio.current_time() + PRUNE_INTERVAL_SECONDS
        while True:  # ends: cancelled with the server
            await trio.sleep(interval)
            await self.renew()
            if trio.current_time() >= next_prune:
                next_prune = trio.current_time() + PRUNE_INTERVAL_SECONDS
                with contextlib.suppress(StateError):
                    await self._backend.prune_leases()

    async def renew(self) -> None:
        """Renew every lease held now, in one statement; a lease the database no longer
        gives this holder is lost."""
        leases = [lease for lease in self._held.values() if not lease.lost]
        if not leases:
            return
        started = trio.current_time()
        try:
            renewed = await self._backend.renew_leases(
                self.holder, [lease.token for lease in leases], self._lease_seconds
            )
        except StateError as exc:
            if not self._renew_failing:
                log.error(  # noqa: TRY400 (the reason is in the line)
                    "lease_renewal_failed",
                    extra={"fields": {"leases": len(leases), "reason": str(exc)}},
                )
            self._renew_failing = True
            return
        if self._renew_failing:
            log.info("lease_renewal_recovered", extra={"fields": {"leases": len(leases)}})
            self._renew_failing = False
        valid_until = self._valid_until(started)
        for lease in leases:
            if lease.token in renewed:
                lease.valid_until = max(lease.valid_until, valid_until)
            else:
                self._lose(lease)
                lease.gone.set()  # its holder learns it from wait_lost

    def _lose(self, lease: _Lease) -> None:
        if not lease.lost:
            lease.lost = True
            log.warning("lease_lost", extra={"fields": lease.fields()})

    def _valid_until(self, started: float) -> float:
        """Until when a lease (re)newed by a call that started at ``started`` is surely
        still held: the database set its expiry after that moment."""
        return started + self._lease_seconds * (1 - LEASE_MARGIN_SHARE)
