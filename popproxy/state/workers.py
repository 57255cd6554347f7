"""Worker threads for a state backend whose driver blocks (sqlite3, psycopg's pool).

A backend runs each call's blocking work in ``trio.to_thread.run_sync`` behind its
own ``CapacityLimiter`` (DESIGN.md: nothing blocks the trio thread), so at most
``threads`` calls of one store are in flight and the store never takes all of
trio's default thread pool. Closing waits for the calls in flight, then runs the
backend's release in a thread (closing connections may block too). psycopg's own
async API is asyncio-only, hence threads for PostgreSQL as well, but for the shared
calls of one statement, which drive libpq from the trio thread
(``popproxy/state/postgres/nonblocking.py``; it opens its connections here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

_T = TypeVar("_T")


class Workers:
    """Runs blocking calls in threads, ``threads`` at a time, until closed."""

    def __init__(self, threads: int) -> None:
        """Allow ``threads`` calls in flight at once."""
        self._limiter = trio.CapacityLimiter(threads)
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    async def run(self, work: Callable[[], _T]) -> _T:
        """``work()`` in a worker thread once a token is free.

        Raises ``trio.ClosedResourceError`` once the store is closed. A cancelled
        caller still waits for its thread (the work cannot be interrupted midway).
        """
        if self._closed:
            raise trio.ClosedResourceError("the state store is closed")
        return await trio.to_thread.run_sync(work, limiter=self._limiter)

    async def close(self, release: Callable[[], None]) -> None:
        """Refuse new calls, wait for those in flight, then ``release()`` in a thread.

        Shielded: a store closed during a cancellation still releases its connections.
        Closing twice is harmless (the second call returns at once).
        """
        if self._closed:
            return
        self._closed = True
        holders = [object() for _ in range(int(self._limiter.total_tokens))]
        with trio.CancelScope(shield=True):
            for holder in holders:
                await self._limiter.acquire_on_behalf_of(holder)
            await trio.to_thread.run_sync(release)
