"""One session per mailbox: the mailbox-lock interface and its in-process implementation.

RFC 1939 §4: "the POP3 server acquires an exclusive-access lock on the maildrop".
``MailboxLocks`` is that lock, keyed by a ``MailboxKey`` value: a local Maildir by
its resolved path, an upstream mailbox by host, port and upstream user (so two
upstream entries for one server share it, and a reload that points an upstream
name elsewhere does not make the new mailbox wait for the old).

``hold`` is an async context manager: it waits at most ``wait_seconds`` for the
mailbox, then refuses with ``MaildropInUse`` (``-ERR [IN-USE]``, RFC 2449 §8.1.1).
A Maildir is opened with no wait (a second session is refused at once); an upstream
account waits ``limits.account_wait_seconds``. ``InProcessLocks`` serves one process;
``popproxy.shared_locks.SharedLocks`` (leases in the PostgreSQL store) implements the
same interface across processes, and its ``Hold.confirm`` says whether the mailbox is
still held before an upstream deletion; ``Hold.wait_lost`` returns once the holder
knows it lost the mailbox (a gateway poll then stops at once).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from popproxy.maildrop.base import MaildropError, MaildropInUse
from popproxy.pop3.replies import ResponseCode


@dataclass(frozen=True, slots=True)
class MaildirMailbox:
    """A local Maildir, by its resolved path (two paths to one directory are one mailbox)."""

    path: Path


@dataclass(frozen=True, slots=True)
class UpstreamMailbox:
    """An account on an upstream server: host (lower case), port and upstream user."""

    host: str
    port: int
    user: str


MailboxKey = MaildirMailbox | UpstreamMailbox


def upstream_mailbox(host: str, port: int, user: str) -> UpstreamMailbox:
    """The key of an upstream account, whoever uses it (a proxy session, a gateway poll)."""
    return UpstreamMailbox(host.lower(), port, user)


class MailboxLost(MaildropError):
    """``Hold.confirm`` found the mailbox no longer held (or could not ask): the
    irreversible step must not be taken (``[SYS/TEMP]``, RFC 3206 §4)."""

    def __init__(self, text: str) -> None:
        super().__init__(ResponseCode.SYS_TEMP, text)


# The refusal after a wait ran out; one refused at once has MaildropInUse's own text.
WAITED_TEXT = "Another session is using this mailbox; try again later."


class Hold(Protocol):
    """A mailbox held: what the holder may ask of its lock while it holds it."""

    async def confirm(self) -> None:
        """Before an irreversible step (an upstream ``DELE``): make sure the mailbox is
        still this holder's. A lock shared across processes may lose a mailbox whose
        lease it could not renew in time; then this raises ``MailboxLost``
        (``[SYS/TEMP]``) and the step must not be taken."""
        ...

    async def wait_lost(self) -> None:
        """Return once the mailbox is known lost (its lease lapsed or was taken over)
        other than through ``confirm`` (which raises); a lock that cannot lose a held
        mailbox never returns."""
        ...


class MailboxLocks(Protocol):
    """One holder per mailbox at a time (RFC 1939 §4 exclusive access)."""

    def hold(self, key: MailboxKey, *, wait_seconds: float) -> AbstractAsyncContextManager[Hold]:
        """Hold ``key`` for the body of the ``async with``, waiting up to ``wait_seconds``
        (0: not at all) for its holder to leave; ``MaildropInUse`` when the wait ends.
        ``MaildropError`` (``[SYS/TEMP]``) when a shared lock cannot be asked."""
        ...


class _LocalHold:
    """A mailbox held in this process: it cannot be lost while held."""

    async def confirm(self) -> None:
        """See ``Hold.confirm``: always still held."""

    async def wait_lost(self) -> None:
        """See ``Hold.wait_lost``: never lost."""
        await trio.sleep_forever()


HELD_HERE: Hold = _LocalHold()


class InProcessLocks:
    """``MailboxLocks`` for one process: a one-token ``trio.Semaphore`` per mailbox in use.

    A semaphore, not a ``trio.Lock``: a maildrop may be closed by another task than
    the one that opened it (a lock would refuse that release). Waiters are served in
    turn (trio's parking lot is FIFO). Entries exist only while a session holds or
    waits for one, so the table is bounded by the number of sessions. Only touched
    from the trio thread.
    """

    def __init__(self) -> None:
        self._slots: dict[MailboxKey, trio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: MailboxKey, *, wait_seconds: float) -> AsyncIterator[Hold]:
        """See ``MailboxLocks.hold``."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = trio.Semaphore(1, max_value=1)
        if slot.value:
            slot.acquire_nowait()  # the usual case: nobody else on the mailbox
        else:
            await self._wait(key, slot, wait_seconds)
        try:
            yield HELD_HERE
        finally:
            slot.release()  # hands the mailbox straight to the next waiter, if any
            self._forget_if_idle(key, slot)

    async def _wait(self, key: MailboxKey, slot: trio.Semaphore, wait_seconds: float) -> None:
        """Wait for the holder to leave; refused at once with no wait."""
        if wait_seconds <= 0:
            raise MaildropInUse()
        acquired = False
        try:
            with trio.move_on_after(wait_seconds):
                await slot.acquire()
                acquired = True
        finally:
            if not acquired:
                self._forget_if_idle(key, slot)  # timed out or cancelled
        if not acquired:
            raise MaildropInUse(WAITED_TEXT)

    def _forget_if_idle(self, key: MailboxKey, slot: trio.Semaphore) -> None:
        """Drop the entry once nobody holds or waits for it (the table stays bounded)."""
        if slot.value and slot.statistics().tasks_waiting == 0:
            del self._slots[key]

    def held(self, key: MailboxKey) -> bool:
        """True while a session holds or waits for ``key`` (tests, diagnostics)."""
        return key in self._slots


_DEFAULT_LOCKS: trio.lowlevel.RunVar[InProcessLocks] = trio.lowlevel.RunVar("popproxy_locks")


def default_locks() -> InProcessLocks:
    """The locks of this trio run, for callers not given a table of their own."""
    try:
        return _DEFAULT_LOCKS.get()
    except LookupError:
        locks = InProcessLocks()
        _DEFAULT_LOCKS.set(locks)
        return locks
