"""The state store of a running server: opened once, on first need, closed at shutdown."""

from __future__ import annotations

import trio

from popproxy.config import StateConfig
from popproxy.metrics import Metrics
from popproxy.state import open_store
from popproxy.state.base import StoreBackend


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
