"""The backends the state store's contract tests run against (tests/state/conftest.py).

PostgreSQL: the server at ``POPPROXY_TEST_PG_URL`` (default the machine's own,
``postgresql://postgres@127.0.0.1:5432/test``, trust auth; scripts/test starts a
throwaway cluster and sets the variable where nothing listens on 5432). Each test
run creates a database of its own there and drops it at the end; each storage is
a schema in it, named through the URL's ``search_path`` option.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from popproxy.config import StateConfig
from popproxy.state import StoreBackend, open_store

PG_URL_VARIABLE = "POPPROXY_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
# How long the tests wait to reach the test server; a missing server is a failure.
PG_CONNECT_TIMEOUT_SECONDS = 10


class Backend(Protocol):
    """One storage place for a store; ``open`` may be called again after ``aclose``."""

    @property
    def url(self) -> str:
        """The ``state.url`` that names this storage."""
        ...

    async def open(self) -> StoreBackend: ...

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        """Rows of one SQL statement without parameters (portable SQL only)."""
        ...


@dataclass(frozen=True, slots=True)
class SqliteBackend:
    """A sqlite file under the test's temporary directory."""

    path: Path

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    async def open(self) -> StoreBackend:
        return await open_store(StateConfig(url=self.url))

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return [tuple(row) for row in conn.execute(statement)]


@dataclass(frozen=True, slots=True)
class PostgresBackend:
    """A schema of its own in the test run's PostgreSQL database."""

    database_url: str
    schema: str

    @property
    def url(self) -> str:
        return with_query(self.database_url, f"options={quote(f'-csearch_path={self.schema}')}")

    async def open(self) -> StoreBackend:
        return await open_store(StateConfig(url=self.url))

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        with admin_connection(self.url) as conn:
            return [tuple(row) for row in conn.execute(statement.encode())]


BACKENDS = ("sqlite", "postgres")


def server_url() -> str:
    """The test server's URL (a database the tests may create databases from)."""
    return os.environ.get(PG_URL_VARIABLE) or DEFAULT_PG_URL


def with_query(url: str, query: str) -> str:
    """``url`` with ``query`` added to its query string."""
    parts = urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit(parts._replace(query=joined))


def with_database(url: str, database: str) -> str:
    """``url`` naming ``database`` instead of its own."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def admin_connection(url: str) -> psycopg.Connection[Any]:
    """An autocommit connection for the tests' own setup and checks."""
    return psycopg.connect(url, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_SECONDS)


def run_database() -> Iterator[str]:
    """Create this test run's database, yield its URL, drop it (and its schemas) after."""
    server = server_url()
    name = f"popproxy_test_{os.getpid()}_{secrets.token_hex(4)}"
    with admin_connection(server) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(server, name)
    finally:
        with admin_connection(server) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


_schemas = itertools.count()


def new_postgres_backend(database_url: str) -> PostgresBackend:
    """A new, empty schema in the run's database, for one storage."""
    schema = f"store_{next(_schemas)}"
    with admin_connection(database_url) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return PostgresBackend(database_url, schema)
