"""Fixtures for the state store tests: every contract test runs against each backend.

A backend is a way to open *the same* storage again (``Backend.open``), so a test
can close a store and reopen it. ``fresh_backend`` makes a new, empty storage per
call (one per hypothesis example): a sqlite file, or a PostgreSQL schema in the
test run's own database (``pg_database`` in tests/conftest.py, dropped at the end
of the run).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from popproxy.state import StoreBackend
from state.state_backends import (
    BACKENDS,
    Backend,
    PostgresBackend,
    SqliteBackend,
    new_postgres_backend,
)


@pytest.fixture(params=BACKENDS)
def fresh_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Backend]:
    """Makes a new, empty storage of the parametrized backend on each call."""
    counter = itertools.count()

    def make() -> Backend:
        match request.param:
            case "sqlite":
                return SqliteBackend(tmp_path / f"state-{next(counter)}.db")
            case "postgres":
                return new_postgres_backend(request.getfixturevalue("pg_database"))
            case other:
                raise AssertionError(f"unknown backend {other}")

    return make


@pytest.fixture
def backend(fresh_backend: Callable[[], Backend]) -> Backend:
    """One empty storage for this test."""
    return fresh_backend()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[StoreBackend]:
    """The store on ``backend``, closed after the test."""
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def pg_backend(pg_database: str) -> PostgresBackend:
    """An empty schema of its own on the test PostgreSQL server (for postgres-only tests)."""
    return new_postgres_backend(pg_database)
