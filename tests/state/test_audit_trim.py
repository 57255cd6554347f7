"""The running server's periodic trim of the audit log (popproxy/state/audit_trim.py).

Trio's clock is a MockClock that the test moves (``mock_clock.jump``; no real sleeps);
not an autojump clock, which would also jump while the test waits for the store's
worker thread and so start a trim before the test set the wall clock. The wall clock
the cutoff is counted from is injected. The store is a real sqlite store, wrapped so
that the test learns when each trim has finished (the deletes run in a worker thread)
and, in one test, so that a trim fails as a locked or unreachable database makes it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.config import StateConfig
from popproxy.state import StateError, StateStore, open_store
from popproxy.state.audit_trim import AUDIT_TRIM_INTERVAL_SECONDS, trim_audit_periodically
from popproxy.state.base import AuditQuery
from state.test_store_contract import T0, session

DAY = timedelta(days=1)


class ObservedTrims:
    """The store's ``get`` for the trim task; each finished trim (its count, or the
    error) goes to ``done``. The first ``failures`` trims fail with ``StateError``."""

    def __init__(self, store: StateStore, failures: int = 0) -> None:
        self.store = store
        self.failures = failures
        self.cutoffs: list[datetime] = []
        self.send, self.done = trio.open_memory_channel[int | StateError](10)

    async def get(self) -> ObservedTrims:
        return self

    async def trim_audit(self, before: datetime, *, dry_run: bool = False) -> int:
        self.cutoffs.append(before)
        if self.failures:
            self.failures -= 1
            error = StateError("state store /x/state.db: database is locked")
            self.send.send_nowait(error)
            raise error
        deleted = await self.store.trim_audit(before, dry_run=dry_run)
        self.send.send_nowait(deleted)
        return deleted


@pytest.fixture
async def filled(tmp_path: Path) -> AsyncIterator[StateStore]:
    """A store with one deletion on each of days 0, 10 and 20."""
    store = await open_store(StateConfig(url=f"sqlite:///{tmp_path}/state.db"))
    for day in (0, 10, 20):
        when = T0 + day * DAY
        await store.record(
            session(when, {f"d{day}": 1}, session_id=f"s{day}", deleted={f"d{day}": "r"})
        )
    try:
        yield store
    finally:
        await store.aclose()


async def uids(store: StateStore) -> list[str]:
    return [row.uid for row in await store.audit(AuditQuery())]


async def test_it_trims_at_start_and_then_every_interval(
    filled: StateStore, mock_clock: trio.testing.MockClock
) -> None:
    now = [T0 + 25 * DAY]
    observed = ObservedTrims(filled)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trim_audit_periodically, observed, 7, lambda: now[0])
        assert await observed.done.receive() == 2  # days 0 and 10 are older than 7 days
        assert await uids(filled) == ["d20"]
        now[0] = T0 + 30 * DAY  # the wall clock moves on; nothing trims before the interval
        await trio.testing.wait_all_tasks_blocked()  # the task sleeps
        mock_clock.jump(AUDIT_TRIM_INTERVAL_SECONDS - 1)
        await trio.testing.wait_all_tasks_blocked()
        assert observed.cutoffs == [T0 + 18 * DAY]
        await trio.testing.wait_all_tasks_blocked()  # the task sleeps
        mock_clock.jump(1)
        assert await observed.done.receive() == 1
        assert observed.cutoffs == [T0 + 18 * DAY, T0 + 23 * DAY]
        assert await uids(filled) == []
        await trio.testing.wait_all_tasks_blocked()  # the task sleeps
        mock_clock.jump(AUDIT_TRIM_INTERVAL_SECONDS)
        assert await observed.done.receive() == 0  # and so on, every interval
        nursery.cancel_scope.cancel()


async def test_a_failed_trim_logs_a_line_and_is_tried_again_next_interval(
    filled: StateStore, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popproxy.state.audit_trim")
    observed = ObservedTrims(filled, failures=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trim_audit_periodically, observed, 7, lambda: T0 + 15 * DAY)
        assert isinstance(await observed.done.receive(), StateError)
        await trio.testing.wait_all_tasks_blocked()  # the task sleeps
        mock_clock.jump(AUDIT_TRIM_INTERVAL_SECONDS)
        assert isinstance(await observed.done.receive(), StateError)
        assert await uids(filled) == ["d20", "d10", "d0"]
        await trio.testing.wait_all_tasks_blocked()  # the task sleeps
        mock_clock.jump(AUDIT_TRIM_INTERVAL_SECONDS)
        assert await observed.done.receive() == 1
        nursery.cancel_scope.cancel()
    assert await uids(filled) == ["d20", "d10"]
    messages = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    assert (
        messages[:2]
        == [
            (
                "audit_trim_failed",
                {
                    "reason": "state store /x/state.db: database is locked",
                    "retry_in_seconds": AUDIT_TRIM_INTERVAL_SECONDS,
                },
            )
        ]
        * 2
    )
    assert messages[2] == (
        "audit_trimmed",
        {"rows": 1, "before": "2024-05-09T12:00:00+00:00", "retention_days": 7},
    )
    assert len(messages) == 3  # a trim that deletes nothing logs nothing
