"""The audit log's contract (``StateStore.audit`` and ``trim_audit``), on every backend.

Only the protocol is used, as in test_store_contract.py; a read-only store is opened
through ``open_store(read_only=True)`` on the same storage.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from popproxy.config import StateConfig
from popproxy.state import StateError, StateStore, open_store
from popproxy.state.base import (
    AccountKey,
    AuditAction,
    AuditEntry,
    AuditQuery,
    Disposal,
    SeenMessage,
    SessionRecord,
)
from popproxy.state.checks import PRUNE_BATCH
from state.state_backends import Backend, SqliteBackend
from state.test_store_contract import ALICE_BOX, SHARED_BOX, T0, session

DAY = timedelta(days=1)
OTHER_BOX = AccountKey("backup", "alice@example.org")


async def three_sessions(store: StateStore) -> None:
    """alice hides a and deletes b on day 0; bob deletes c of the shared box on day 1;
    alice deletes a message of another upstream on day 2."""
    await store.record(
        session(T0, {"a": 10, "b": 20}, hidden={"a": "keep-all"}, deleted={"b": "spam"})
    )
    await store.record(
        session(
            T0 + DAY,
            {"c": 30},
            account=SHARED_BOX,
            user="bob",
            session_id="s2",
            deleted={"c": "old-mail"},
        )
    )
    await store.record(
        session(T0 + 2 * DAY, {"d": 40}, account=OTHER_BOX, session_id="s3", deleted={"d": "spam"})
    )


async def test_an_empty_audit_log_has_no_rows(store: StateStore) -> None:
    assert await store.audit(AuditQuery()) == []
    assert await store.trim_audit(T0) == 0
    assert await store.trim_audit(T0, dry_run=True) == 0


async def test_every_hide_and_deletion_is_a_row_newest_first(store: StateStore) -> None:
    await three_sessions(store)
    rows = await store.audit(AuditQuery())
    delete, hide = AuditAction.DELETE_UPSTREAM, AuditAction.HIDE
    assert rows == [
        AuditEntry(T0 + 2 * DAY, "s3", "alice", OTHER_BOX, "d", 40, "spam", delete),
        AuditEntry(T0 + DAY, "s2", "bob", SHARED_BOX, "c", 30, "old-mail", delete),
        # One session's rows: the later written first (hides are written before deletions).
        AuditEntry(T0, "s1", "alice", ALICE_BOX, "b", 20, "spam", delete),
        AuditEntry(T0, "s1", "alice", ALICE_BOX, "a", 10, "keep-all", hide),
    ]
    assert all(row.at.tzinfo is not None and row.at.utcoffset() == timedelta(0) for row in rows)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (AuditQuery(user="alice"), ["d", "b", "a"]),
        (AuditQuery(user="bob"), ["c"]),
        (AuditQuery(user="nobody"), []),
        (AuditQuery(upstream="provider"), ["c", "b", "a"]),
        (AuditQuery(upstream="backup"), ["d"]),
        (AuditQuery(rule="spam"), ["d", "b"]),
        (AuditQuery(uid="a"), ["a"]),
        (AuditQuery(since=T0 + DAY), ["d", "c"]),  # inclusive
        (AuditQuery(since=T0 + DAY + timedelta(microseconds=1)), ["d"]),
        (AuditQuery(user="alice", rule="spam", upstream="provider"), ["b"]),
        (AuditQuery(limit=2), ["d", "c"]),
        (AuditQuery(rule="spam", limit=1), ["d"]),
    ],
)
async def test_each_filter_narrows_the_rows(
    store: StateStore, query: AuditQuery, expected: list[str]
) -> None:
    await three_sessions(store)
    assert [row.uid for row in await store.audit(query)] == expected


async def test_since_in_another_time_zone_is_the_same_instant(store: StateStore) -> None:
    await three_sessions(store)
    east = (T0 + DAY).astimezone(timezone(timedelta(hours=2)))
    assert [row.uid for row in await store.audit(AuditQuery(since=east))] == ["d", "c"]


async def test_a_reused_uidl_keeps_the_old_contents_rows(store: StateStore) -> None:
    await store.record(session(T0, {"a": 10}, deleted={"a": "spam"}))
    await store.record(session(T0 + DAY, {"a": 99}, session_id="s2", hidden={"a": "hide-big"}))
    rows = await store.audit(AuditQuery(uid="a"))
    assert [(row.size, row.action, row.rule) for row in rows] == [
        (99, AuditAction.HIDE, "hide-big"),
        (10, AuditAction.DELETE_UPSTREAM, "spam"),
    ]


async def test_pruning_gone_uidls_keeps_their_audit_rows(store: StateStore) -> None:
    await store.record(session(T0, {"a": 10}, deleted={"a": "spam"}))
    await store.record(session(T0 + 10 * DAY, {}, session_id="s2"))
    assert await store.prune(T0 + 5 * DAY) == 1
    assert [row.uid for row in await store.audit(AuditQuery())] == ["a"]


async def test_trim_deletes_the_rows_older_than_the_cutoff(store: StateStore) -> None:
    await three_sessions(store)
    assert await store.trim_audit(T0 + DAY, dry_run=True) == 2
    assert len(await store.audit(AuditQuery())) == 4  # a dry run deletes nothing
    assert await store.trim_audit(T0 + DAY) == 2
    assert [row.uid for row in await store.audit(AuditQuery())] == ["d", "c"]
    assert await store.trim_audit(T0 + DAY) == 0
    # The messages' own facts are not the audit log's: the deletion is still known.
    facts = await store.facts(ALICE_BOX, "alice", ["a", "b"])
    assert facts["b"].deleted_upstream_at == T0
    assert facts["a"].hidden


async def test_trim_works_in_batches_and_removes_them_all(store: StateStore) -> None:
    count = PRUNE_BATCH + 7
    uids = [f"m{i}" for i in range(count)]
    await store.record(
        SessionRecord(
            account=ALICE_BOX,
            user="alice",
            session_id="big",
            at=T0,
            seen=tuple(SeenMessage(uid, 1) for uid in uids),
            deleted_upstream=tuple(Disposal(uid, "spam") for uid in uids),
        )
    )
    await store.record(session(T0 + DAY, {"new": 1}, session_id="s2", deleted={"new": "spam"}))
    assert await store.trim_audit(T0 + DAY, dry_run=True) == count
    assert await store.trim_audit(T0 + DAY) == count
    assert [row.uid for row in await store.audit(AuditQuery())] == ["new"]


@pytest.mark.parametrize(
    "query",
    [
        AuditQuery(limit=0),
        AuditQuery(limit=100_001),
        AuditQuery(user=""),
        AuditQuery(rule="x" * 129),
        AuditQuery(uid="a\0b"),
        AuditQuery(since=datetime(2024, 5, 1)),  # naive
    ],
)
async def test_a_query_no_caller_could_make_is_refused(
    store: StateStore, query: AuditQuery
) -> None:
    with pytest.raises(ValueError):
        await store.audit(query)


async def test_a_naive_trim_cutoff_is_refused(store: StateStore) -> None:
    with pytest.raises(ValueError):
        await store.trim_audit(datetime(2024, 5, 1))


async def test_a_read_only_store_reads_the_audit_and_writes_nothing(
    store: StateStore, backend: Backend
) -> None:
    await three_sessions(store)
    reader = await open_store(StateConfig(url=backend.url), read_only=True)
    try:
        assert [row.uid for row in await reader.audit(AuditQuery())] == ["d", "c", "b", "a"]
        with pytest.raises(StateError):
            await reader.record(session(T0 + 3 * DAY, {"e": 1}, session_id="s4"))
        with pytest.raises(StateError):
            await reader.trim_audit(T0 + 3 * DAY)
    finally:
        await reader.aclose()
    assert len(await store.audit(AuditQuery())) == 4
    assert await store.facts(ALICE_BOX, "alice", ["e"]) == {}


async def test_a_read_only_open_of_an_empty_storage_is_refused_and_creates_nothing(
    backend: Backend,
) -> None:
    with pytest.raises(StateError):
        await open_store(StateConfig(url=backend.url), read_only=True)
    if isinstance(backend, SqliteBackend):
        assert not backend.path.exists()
    else:
        assert (
            backend.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            == []
        )
