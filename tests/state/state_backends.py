"""The backends the state store's contract tests run against (tests/state/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from popproxy.config import StateConfig
from popproxy.state import StateStore, open_store


class Backend(Protocol):
    """One storage place for a store; ``open`` may be called again after ``aclose``."""

    async def open(self) -> StateStore: ...


@dataclass(frozen=True, slots=True)
class SqliteBackend:
    """A sqlite file under the test's temporary directory."""

    path: Path

    async def open(self) -> StateStore:
        return await open_store(StateConfig(url=f"sqlite:///{self.path}"))


BACKENDS = ("sqlite",)
