"""Fixtures for every test: the loopback client streams are closed after each test, and
a PostgreSQL database of the run's own for the tests of the state store on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pop3client import close_opened
from state.state_backends import run_database


@pytest.fixture(autouse=True)
def close_client_streams() -> Iterator[None]:
    """Close the streams `pop3client.open_loopback` opened, whatever the test did.

    Synchronous on purpose: pytest-trio runs an async fixture only for a test that
    names it (directly or through another fixture), never for autouse alone, so an
    async one here would never run and every stream would stay open until the
    interpreter exited.
    """
    yield
    close_opened()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of a database of this test run's own on the test PostgreSQL server
    (tests/state/state_backends.py), dropped at the end of the run."""
    yield from run_database()
