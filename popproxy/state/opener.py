"""The state store of a running server, and what instances share beside it: each
opened once, on first need, closed at shutdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import trio

from popproxy.auth.throttling import FailureChange, FailureKey, ThrottleUnavailable
from popproxy.config import StateConfig
from popproxy.metrics import Metrics
from popproxy.state import open_store
from popproxy.state.base import StateError, StoreBackend

if TYPE_CHECKING:
    from popproxy.state.pg_shared import PostgresShared

# After the shared state failed to open, calls fail at once for this long (one
# connection attempt per this interval, not one per login, while the database is down).
REOPEN_SECONDS = 2

_T = TypeVar("_T")


class StoreOpener:
    """The state store, opened once on first need and closed at shutdown.

    A config without upstream users or gateway sources never opens it (a Maildir
    needs no state).
    It outlives reloads: the store is a restart key (popproxy/reload.py).
    """

    def __init__(self, config: StateConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._store: StoreBackend | None = None
        self._lock = trio.Lock()

    async def get(self) -> StoreBackend:
        """The open store; ``StateError`` if it cannot be opened."""
        async with self._lock:
            if self._store is None:
                self._store = await open_store(self._config, metrics=self._metrics)
            return self._store

    async def aclose(self) -> None:
        """Close the store if it was opened; it opens again on the next ``get``."""
        if self._store is not None:
            await self._store.aclose()
            self._store = None


class SharedOpener:
    """What instances share beside the store (leases, login failures; PostgreSQL only,
    ``pg_shared.py``), opened once on first need and closed at shutdown.

    It stands in for the opened ``PostgresShared`` (a ``LeaseBackend`` and a
    ``FailureBackend``): each call opens it first if needed. After a failed open,
    calls fail at once for ``REOPEN_SECONDS`` instead of each waiting for a connect
    of its own, so logins during an outage are refused quickly.
    """

    def __init__(self, config: StateConfig) -> None:
        self._config = config
        self._shared: PostgresShared | None = None
        self._lock = trio.Lock()
        self._failed: tuple[float, str] | None = None  # when, and why

    async def get(self) -> PostgresShared:
        """The open shared state; ``StateError`` if it cannot be opened."""
        async with self._lock:
            if self._shared is not None:
                return self._shared
            now = trio.current_time()
            if self._failed is not None and now < self._failed[0] + REOPEN_SECONDS:
                raise StateError(self._failed[1])
            from popproxy.state.pg_shared import open_shared  # needs the postgres extra
            from popproxy.state.postgres import PostgresTarget

            try:
                self._shared = await open_shared(
                    PostgresTarget(self._config.url, self._config.password)
                )
            except StateError as exc:
                self._failed = (now, str(exc))
                raise
            self._failed = None
            return self._shared

    async def take_lease(self, name: str, holder: str, token: str, seconds: float) -> bool:
        """See ``PostgresShared.take_lease``."""
        return await (await self.get()).take_lease(name, holder, token, seconds)

    async def renew_leases(
        self, holder: str, tokens: Sequence[str], seconds: float
    ) -> frozenset[str]:
        """See ``PostgresShared.renew_leases``."""
        return await (await self.get()).renew_leases(holder, tokens, seconds)

    async def confirm_lease(self, name: str, token: str, seconds: float) -> bool:
        """See ``PostgresShared.confirm_lease``."""
        return await (await self.get()).confirm_lease(name, token, seconds)

    async def release_lease(self, name: str, token: str) -> None:
        """See ``PostgresShared.release_lease``."""
        await (await self.get()).release_lease(name, token)

    async def prune_leases(self) -> int:
        """See ``PostgresShared.prune_leases``."""
        return await (await self.get()).prune_leases()

    async def change_failures(
        self, keys: Sequence[FailureKey], change: FailureChange[_T], *, writes: bool
    ) -> _T:
        """See ``PostgresShared.change_failures``."""
        return await (await self._get_for_throttle()).change_failures(keys, change, writes=writes)

    async def prune_failures(self, remembered_seconds: float) -> int:
        """See ``PostgresShared.prune_failures``."""
        return await (await self._get_for_throttle()).prune_failures(remembered_seconds)

    async def _get_for_throttle(self) -> PostgresShared:
        try:
            return await self.get()
        except StateError as exc:
            raise ThrottleUnavailable(str(exc)) from exc

    async def aclose(self) -> None:
        """Close it if it was opened; it opens again on the next call."""
        if self._shared is not None:
            await self._shared.aclose()
            self._shared = None
