"""A second process writing a state store: ``python record_writer.py URL PREFIX COUNT``.

Records COUNT sessions on the account ("proc", PREFIX) into the store that the
``state.url`` URL names (sqlite or PostgreSQL), one after another, and prints each
session's number on its own line once its ``record`` returned (so the parent knows
it is committed). Used by tests/state/test_store_processes.py to kill a writer
mid-stream and to write the same store from two processes at once. ``session``
says what a session left behind.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import trio

from popproxy.config import StateConfig
from popproxy.state import open_store
from popproxy.state.base import AccountKey, Disposal, SeenMessage, SessionRecord

T0 = datetime(2024, 5, 1, tzinfo=UTC)
UIDS_PER_SESSION = 200
HIDDEN_PER_SESSION = 5
DELETED_PER_SESSION = 5
BUSY_TIMEOUT_SECONDS = 30.0


def account(prefix: str) -> AccountKey:
    return AccountKey("proc", prefix)


def session(prefix: str, n: int) -> SessionRecord:
    """Session ``n``: its own UIDLs, all retrieved, the first few hidden, the next few deleted."""
    uids = [f"{prefix}-{n}-{j}" for j in range(UIDS_PER_SESSION)]
    return SessionRecord(
        account=account(prefix),
        user=f"{prefix}-user",
        session_id=f"{prefix}-{n}",
        at=T0 + timedelta(seconds=n),
        seen=tuple(SeenMessage(uid, j) for j, uid in enumerate(uids)),
        retrieved=frozenset(uids),
        hidden=tuple(Disposal(uid, "hide-rule") for uid in uids[:HIDDEN_PER_SESSION]),
        deleted_upstream=tuple(
            Disposal(uid, "delete-rule")
            for uid in uids[HIDDEN_PER_SESSION : HIDDEN_PER_SESSION + DELETED_PER_SESSION]
        ),
    )


async def write(url: str, prefix: str, count: int, concurrency: int = 1) -> None:
    """Record sessions 0..count-1, ``concurrency`` at a time (each task its own share),
    so that with more than one the store commits them in groups."""
    store = await open_store(StateConfig(url=url, busy_timeout_seconds=BUSY_TIMEOUT_SECONDS))

    async def task(first: int) -> None:
        for n in range(first, count, concurrency):
            await store.record(session(prefix, n))
            sys.stdout.write(f"{n}\n")
            sys.stdout.flush()

    try:
        async with trio.open_nursery() as nursery:
            for first in range(concurrency):
                nursery.start_soon(task, first)
    finally:
        await store.aclose()


if __name__ == "__main__":
    trio.run(write, sys.argv[1], sys.argv[2], int(sys.argv[3]), int((sys.argv[4:5] or ["1"])[0]))
