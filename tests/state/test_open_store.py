"""``open_store``: the backend from the URL, and the metrics each operation reports."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

import popproxy
from popproxy.config import StateConfig
from popproxy.metrics import Metrics, StateOperation
from popproxy.state import StateError, open_store
from popproxy.state.base import AccountKey, SeenMessage, SessionRecord
from popproxy.state.opener import StoreOpener

BOX = AccountKey("provider", "alice@example.net")
T0 = datetime(2024, 5, 1, tzinfo=UTC)
RECORD = SessionRecord(BOX, "alice", "s1", T0, seen=(SeenMessage("a", 1),))


def count(metrics: Metrics, name: str, operation: StateOperation) -> float | None:
    return metrics.registry.get_sample_value(name, {"operation": operation.value})


def durations(metrics: Metrics, operation: StateOperation) -> float | None:
    return count(metrics, "popproxy_state_operation_duration_seconds_count", operation)


async def test_each_operation_reports_its_latency(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    store = await open_store(StateConfig(url=f"sqlite:///{tmp_path}/s.db"), metrics=metrics)
    try:
        await store.record(RECORD)
        await store.facts(BOX, "alice", ["a"])
        await store.messages()
        await store.prune(T0)
    finally:
        await store.aclose()
    assert durations(metrics, StateOperation.COMMIT) == 1
    assert durations(metrics, StateOperation.LOAD) == 2
    assert durations(metrics, StateOperation.PRUNE) == 1
    for operation in StateOperation:
        assert count(metrics, "popproxy_state_errors_total", operation) == 0


async def test_a_failed_operation_is_counted(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    metrics = Metrics(CollectorRegistry())
    config = StateConfig(url=f"sqlite:///{path}", busy_timeout_seconds=0.05)
    store = await open_store(config, metrics=metrics)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StateError):
            await store.record(RECORD)
    finally:
        blocker.close()
        await store.aclose()
    assert count(metrics, "popproxy_state_errors_total", StateOperation.COMMIT) == 1
    assert durations(metrics, StateOperation.COMMIT) == 1


async def test_a_memory_url_needs_no_file(tmp_path: Path) -> None:
    store = await open_store(StateConfig(url="sqlite:///:memory:"))
    try:
        await store.record(RECORD)
        assert [row.uid for row in await store.messages()] == ["a"]
    finally:
        await store.aclose()


async def test_another_scheme_is_refused() -> None:
    with pytest.raises(StateError, match="'mysql' is not supported"):
        await open_store(StateConfig(url="mysql://db.example.net/popproxy"))


def test_only_the_postgres_backend_imports_psycopg_and_only_when_used() -> None:
    """psycopg is an optional extra (popproxy[postgres]): the CLI, the server and the
    sqlite backend load without it, and only the modules of state/postgres/ (the store,
    its schema and the shared leases and login failures) use it."""
    code = (
        "import sys\n"
        "import popproxy.cli, popproxy.serve, popproxy.explain, popproxy.state\n"
        "print(sorted(m for m in sys.modules if m.startswith('psycopg')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    package = Path(popproxy.__file__).parent
    importers = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if re.search(r"^\s*(import|from) psycopg", path.read_text(encoding="utf-8"), re.M)
    }
    assert {"state/postgres/store.py", "state/postgres/schema.py", "state/postgres/shared.py"} <= (
        importers
    )
    assert all(name.startswith("state/postgres/") for name in importers)


async def test_a_postgres_url_without_the_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "popproxy.state.postgres", None)  # as if not installed
    with pytest.raises(StateError, match=r"install popproxy\[postgres\]"):
        await open_store(StateConfig(url="postgresql://popproxy@127.0.0.1/popproxy"))


async def test_the_opener_opens_once_and_then_hands_out_the_store_without_a_wait() -> None:
    """``StoreOpener.get`` takes its lock only to open: every login asks for the store."""
    opener = StoreOpener(StateConfig("sqlite:///:memory:"), Metrics.unexported())
    try:
        store = await opener.get()
        with trio.testing.assert_no_checkpoints():
            assert await opener.get() is store
    finally:
        await opener.aclose()
