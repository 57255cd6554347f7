"""Several processes on one store, on every backend: a writer killed in the middle of a
stream of records, and a second process committing while 100 sessions do.

The writer is ``record_writer.py`` (a real second process opening the store by its
``state.url``). For sqlite the file must also pass ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from popproxy.state.base import AccountKey, Disposal, SeenMessage, SessionRecord, StoredMessage
from state import record_writer
from state.state_backends import Backend, SqliteBackend

REPO = Path(__file__).resolve().parents[2]
WRITER = Path(record_writer.__file__)
T0 = datetime(2024, 5, 1, tzinfo=UTC)
# How long a writer subprocess may take before the test gives up on it.
PROCESS_DEADLINE_SECONDS = 120


def writer_command(url: str, prefix: str, count: int, concurrency: int = 1) -> list[str]:
    return [sys.executable, str(WRITER), url, prefix, str(count), str(concurrency)]


def writer_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def session_rows(rows: Sequence[StoredMessage]) -> dict[str, list[StoredMessage]]:
    """Stored messages of record_writer sessions, by session id."""
    out: dict[str, list[StoredMessage]] = defaultdict(list)
    for row in rows:
        prefix, n, _ = row.uid.rsplit("-", 2)
        out[f"{prefix}-{n}"].append(row)
    return out


async def stored_rows(backend: Backend, prefix: str) -> Sequence[StoredMessage]:
    """The writer's rows, read by a store opened afresh (sqlite: after its integrity check)."""
    if isinstance(backend, SqliteBackend):
        assert backend.query("PRAGMA integrity_check") == [("ok",)]
    store = await backend.open()
    try:
        return await store.messages(record_writer.account(prefix))
    finally:
        await store.aclose()


async def assert_sessions_whole(backend: Backend, prefix: str, sessions: range) -> None:
    """Each of ``sessions`` of ``prefix`` is stored completely, and nothing else of it."""
    by_session = session_rows(await stored_rows(backend, prefix))
    assert set(by_session) == {f"{prefix}-{n}" for n in sessions}
    for n in sessions:
        expected = record_writer.session(prefix, n)
        stored = {row.uid: row for row in by_session[f"{prefix}-{n}"]}
        assert {uid: row.size for uid, row in stored.items()} == {
            m.uid: m.size for m in expected.seen
        }
        assert all(row.retrieved_by == ((expected.user, expected.at),) for row in stored.values())
        hidden = {uid for uid, row in stored.items() if row.hidden_for}
        deleted = {uid for uid, row in stored.items() if row.deleted_upstream_at}
        assert hidden == {d.uid for d in expected.hidden}
        assert deleted == {d.uid for d in expected.deleted_upstream}


async def run_and_kill(url: str, prefix: str, commits: int) -> int:
    """Start a writer, SIGKILL it once it reported ``commits`` commits; return how many
    it reported (the kill lands while it builds or commits the next record)."""
    reported = 0
    with trio.fail_after(PROCESS_DEADLINE_SECONDS):
        process = await trio.lowlevel.open_process(
            writer_command(url, prefix, 100_000), stdout=subprocess.PIPE, env=writer_env()
        )
        assert process.stdout is not None
        pending = b""
        try:
            while reported < commits:
                chunk = await process.stdout.receive_some()
                assert chunk, "the writer exited early"
                *lines, pending = (pending + chunk).split(b"\n")
                reported += len(lines)
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()
            await process.stdout.aclose()
    assert process.returncode == -signal.SIGKILL
    return reported


@pytest.mark.parametrize("commits", [1, 6, 15])
async def test_a_writer_killed_mid_stream_leaves_whole_records(
    backend: Backend, commits: int
) -> None:
    """SIGKILL in the middle of a stream of records: every record the writer reported
    is there, and each record is whole or absent."""
    await (await backend.open()).aclose()
    reported = await run_and_kill(backend.url, "killed", commits)
    stored_sessions = len(session_rows(await stored_rows(backend, "killed")))
    assert reported <= stored_sessions <= reported + 1
    await assert_sessions_whole(backend, "killed", range(stored_sessions))


async def test_a_writer_killed_during_group_commits_acknowledged_only_durable(
    backend: Backend,
) -> None:
    """SIGKILL while 8 tasks' records are committed in groups (sqlite: one transaction
    per group): every record whose ``record`` returned is stored whole, the others of
    the groups in flight are whole or absent (invariant: no QUIT gets +OK for state
    that is not durable)."""
    concurrency = 8
    await (await backend.open()).aclose()
    acknowledged: set[int] = set()
    with trio.fail_after(PROCESS_DEADLINE_SECONDS):
        process = await trio.lowlevel.open_process(
            writer_command(backend.url, "grouped", 100_000, concurrency),
            stdout=subprocess.PIPE,
            env=writer_env(),
        )
        assert process.stdout is not None
        pending = b""
        try:
            while len(acknowledged) < 40:
                chunk = await process.stdout.receive_some()
                assert chunk, "the writer exited early"
                *lines, pending = (pending + chunk).split(b"\n")
                acknowledged.update(int(line) for line in lines)
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()
            await process.stdout.aclose()
    assert process.returncode == -signal.SIGKILL
    by_session = session_rows(await stored_rows(backend, "grouped"))
    stored = {int(name.rsplit("-", 1)[1]) for name in by_session}
    assert acknowledged <= stored
    # At most one record per task was in flight beyond what was acknowledged.
    assert len(stored - acknowledged) <= concurrency
    for n in stored:
        expected = record_writer.session("grouped", n)
        rows = {row.uid: row for row in by_session[f"grouped-{n}"]}
        assert {uid: row.size for uid, row in rows.items()} == {
            m.uid: m.size for m in expected.seen
        }
        assert all(row.retrieved_by == ((expected.user, expected.at),) for row in rows.values())
        assert {uid for uid, row in rows.items() if row.hidden_for} == {
            d.uid for d in expected.hidden
        }
        assert {uid for uid, row in rows.items() if row.deleted_upstream_at} == {
            d.uid for d in expected.deleted_upstream
        }


async def test_100_concurrent_sessions_and_a_second_process(backend: Backend) -> None:
    """Invariant: concurrent commits from tasks on several accounts and from another
    process on the same store never corrupt it or lose a record."""
    store = await backend.open()
    accounts = [AccountKey("provider", f"box{i}@example.net") for i in range(7)]
    shared = {f"shared-{i}": 500 + i for i in range(30)}
    other_sessions = 40

    async def one_session(n: int) -> None:
        own = {f"own-{n}-{j}": j for j in range(10)}
        await store.record(
            SessionRecord(
                account=accounts[n % len(accounts)],
                user=f"user{n}",
                session_id=f"task-{n}",
                at=T0 + timedelta(seconds=n),
                seen=tuple(SeenMessage(u, s) for u, s in {**shared, **own}.items()),
                retrieved=frozenset({f"shared-{n % 30}", f"own-{n}-0"}),
                hidden=(Disposal(f"shared-{(n + 1) % 30}", "hide-rule"),),
                deleted_upstream=(Disposal(f"own-{n}-1", "delete-rule"),),
            )
        )

    try:
        with trio.fail_after(PROCESS_DEADLINE_SECONDS):
            other = await trio.lowlevel.open_process(
                writer_command(backend.url, "other", other_sessions),
                stdout=subprocess.PIPE,
                env=writer_env(),
            )
            assert other.stdout is not None
            try:
                # The tasks start once the other process is writing, so the two overlap.
                assert await other.stdout.receive_some(), "the other writer exited early"
                async with trio.open_nursery() as nursery:
                    for n in range(100):
                        nursery.start_soon(one_session, n)
                assert await other.wait() == 0
            finally:
                other.kill()
                await other.wait()
                await other.stdout.aclose()
        for n in range(100):
            account = accounts[n % len(accounts)]
            facts = await store.facts(account, f"user{n}", [*shared, f"own-{n}-0", f"own-{n}-1"])
            assert len(facts) == 32
            assert {uid for uid, f in facts.items() if f.retrieved_at} == {
                f"shared-{n % 30}",
                f"own-{n}-0",
            }
            assert {uid for uid, f in facts.items() if f.hidden} == {f"shared-{(n + 1) % 30}"}
            assert facts[f"own-{n}-1"].deleted_upstream_at == T0 + timedelta(seconds=n)
            first = min(m for m in range(100) if m % len(accounts) == n % len(accounts))
            assert facts["shared-0"].first_seen == T0 + timedelta(seconds=first)
    finally:
        await store.aclose()
    audit = backend.query(
        "SELECT action, count(*) FROM disposals WHERE session_id LIKE 'task-%'"
        " GROUP BY action ORDER BY action"
    )
    assert audit == [("delete_upstream", 100), ("hide", 100)]
    await assert_sessions_whole(backend, "other", range(other_sessions))
