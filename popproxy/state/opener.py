"""The state store of a running server, and what instances share beside it: each
opened once, on first need, closed at shutdown."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import trio

from popproxy.auth.throttling import FailureChange, FailureKey, ThrottleUnavailable
from popproxy.config import StateConfig
from popproxy.metrics import Metrics, StateOperation
from popproxy.state import open_store
from popproxy.state.base import StateError, StoreBackend

if TYPE_CHECKING:
    from popproxy.state.postgres.shared import PostgresShared

# After the shared state failed to open, calls fail at once for this long (one
# connection attempt per this interval, not one per login, while the database is down).
REOPEN_SECONDS = 2

_T = TypeVar("_T")


class StoreOpener:
    """The state store, opened once on first need and closed at shutdown.

    A config that does not use it (``Config.uses_state``: no upstream users, no
    gateway sources, known sources off) never opens it.
    It outlives reloads: the store is a restart key (popproxy/reload.py).
    """

    def __init__(self, config: StateConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._store: StoreBackend | None = None
        self._lock = trio.Lock()

    async def get(self) -> StoreBackend:
        """The open store; ``StateError`` if it cannot be opened.

        Once open it is returned without the lock: every login asks, and taking a
        ``trio.Lock`` is a pass through the scheduler, during which the other logins
        queue on it (issue 15)."""
        store = self._store
        if store is not None:
            return store
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
    ``postgres/shared.py``), opened once on first need and closed at shutdown.

    It stands in for the opened ``PostgresShared`` (a ``LeaseBackend`` and a
    ``FailureBackend``): each call opens it first if needed. After a failed open,
    calls fail at once for ``REOPEN_SECONDS`` instead of each waiting for a connect
    of its own, so logins during an outage are refused quickly.
    """

    def __init__(self, config: StateConfig, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics
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
            try:
                from popproxy.state.postgres import PostgresTarget
                from popproxy.state.postgres.shared import open_shared  # the postgres extra
            except ImportError as exc:
                raise StateError(
                    "the PostgreSQL state store needs psycopg: install popproxy[postgres]"
                ) from exc
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
        async with self._measure(StateOperation.LEASE) as shared:
            return await shared.take_lease(name, holder, token, seconds)

    async def renew_leases(
        self, holder: str, tokens: Sequence[str], seconds: float
    ) -> frozenset[str]:
        """See ``PostgresShared.renew_leases``."""
        async with self._measure(StateOperation.LEASE) as shared:
            return await shared.renew_leases(holder, tokens, seconds)

    async def confirm_lease(self, name: str, token: str, seconds: float) -> bool:
        """See ``PostgresShared.confirm_lease``."""
        async with self._measure(StateOperation.LEASE) as shared:
            return await shared.confirm_lease(name, token, seconds)

    async def release_lease(self, name: str, token: str) -> None:
        """See ``PostgresShared.release_lease``."""
        async with self._measure(StateOperation.LEASE) as shared:
            await shared.release_lease(name, token)

    async def prune_leases(self) -> int:
        """See ``PostgresShared.prune_leases``."""
        async with self._measure(StateOperation.LEASE) as shared:
            return await shared.prune_leases()

    async def change_failures(
        self, keys: Sequence[FailureKey], change: FailureChange[_T], *, writes: bool
    ) -> _T:
        """See ``PostgresShared.change_failures``."""
        async with self._measure(StateOperation.LOGIN_FAILURES) as shared:
            return await shared.change_failures(keys, change, writes=writes)

    async def prune_failures(self, remembered_seconds: float) -> int:
        """See ``PostgresShared.prune_failures``."""
        async with self._measure(StateOperation.LOGIN_FAILURES) as shared:
            return await shared.prune_failures(remembered_seconds)

    @contextlib.asynccontextmanager
    async def _measure(self, operation: StateOperation) -> AsyncIterator[PostgresShared]:
        """The opened shared state for one call, timed and its failure counted
        (``popproxy_state_*{operation=lease|login_failures}``). A throttle's call fails
        with ``ThrottleUnavailable``, a lease's with ``StateError``."""
        started = time.monotonic()  # wall time: the work runs in a real thread
        try:
            yield await self.get()
        except (StateError, ThrottleUnavailable) as exc:
            if self._metrics is not None:
                self._metrics.state_error(operation)
            if operation is StateOperation.LOGIN_FAILURES and isinstance(exc, StateError):
                raise ThrottleUnavailable(str(exc)) from exc
            raise
        finally:
            if self._metrics is not None:
                self._metrics.state_operation(operation, time.monotonic() - started)

    async def aclose(self) -> None:
        """Close it if it was opened; it opens again on the next call."""
        if self._shared is not None:
            await self._shared.aclose()
            self._shared = None
