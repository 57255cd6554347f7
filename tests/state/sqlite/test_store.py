"""What only the sqlite backend (popproxy/state/sqlite/) promises: pragmas, migrations,
crashes, group commit, two processes."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import stat
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.pop3.client_replies import MAX_UPSTREAM_MESSAGES
from popproxy.state.base import (
    AccountKey,
    Disposal,
    SeenMessage,
    SessionRecord,
    StateError,
)
from popproxy.state.checks import MAX_RECORD_MESSAGES
from popproxy.state.sqlite import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    SqliteStore,
    from_utc_text,
    open_sqlite,
    retention,
    utc_text,
)
from popproxy.state.sqlite import store as store_module
from popproxy.state.sqlite.unchanged import (
    LAST_LISTED_REFRESH_SECONDS,
    UNCHANGED_MAX_MESSAGES,
    CatchUp,
)

BOX = AccountKey("provider", "alice@example.net")
T0 = datetime(2024, 5, 1, tzinfo=UTC)


def listing(at: datetime, sizes: dict[str, int], session_id: str = "s1") -> SessionRecord:
    return SessionRecord(
        BOX, "alice", session_id, at, seen=tuple(SeenMessage(u, s) for u, s in sizes.items())
    )


async def pragma(store: SqliteStore, name: str) -> object:
    return await store._run(lambda conn: conn.execute(f"PRAGMA {name}").fetchone()[0])


@pytest.fixture
def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch of records the store hands to a worker thread, in order."""
    batches: list[int] = []
    original = retention.record_batch

    def counting(
        conn: sqlite3.Connection,
        records: Sequence[SessionRecord],
        catch_ups: Sequence[CatchUp] = (),
    ) -> list[retention.Outcome]:
        batches.append(len(records))
        return original(conn, records, catch_ups)

    monkeypatch.setattr(store_module, "record_batch", counting)
    return batches


def test_the_record_bound_is_the_upstream_listing_bound() -> None:
    assert MAX_RECORD_MESSAGES == MAX_UPSTREAM_MESSAGES


def test_times_are_stored_as_sortable_utc_text() -> None:
    berlin = datetime(2024, 5, 1, 4, 0, tzinfo=timezone(timedelta(hours=2)))
    assert utc_text(datetime(2024, 5, 1, 2, 0, tzinfo=UTC)) == "2024-05-01T02:00:00.000000Z"
    assert from_utc_text(utc_text(berlin)) == berlin
    assert utc_text(datetime(1, 1, 1, tzinfo=UTC)) < utc_text(datetime(999, 1, 1, tzinfo=UTC))


async def test_wal_full_sync_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "state.db", busy_timeout_seconds=2.5)
    try:
        assert await pragma(store, "journal_mode") == "wal"
        assert await pragma(store, "synchronous") == 2  # FULL
        assert await pragma(store, "foreign_keys") == 1
        assert await pragma(store, "busy_timeout") == 2500
        assert await pragma(store, "user_version") == SCHEMA_VERSION
        assert await pragma(store, "application_id") == APPLICATION_ID
    finally:
        await store.aclose()


async def test_the_file_is_private_to_its_owner(tmp_path: Path) -> None:
    path = trio.Path(tmp_path / "state.db")
    store = await open_sqlite(Path(path), busy_timeout_seconds=1)
    try:
        await store.record(listing(T0, {"a": 1}))
        for made in (path, path.with_name("state.db-wal"), path.with_name("state.db-shm")):
            assert stat.S_IMODE((await made.stat()).st_mode) == 0o600, made.name
    finally:
        await store.aclose()


async def test_a_memory_store_works_without_a_file(tmp_path: Path) -> None:
    store = await open_sqlite(None, busy_timeout_seconds=1)
    try:
        await store.record(listing(T0, {"a": 1}))
        assert set(await store.facts(BOX, "alice", ["a"])) == {"a"}
    finally:
        await store.aclose()


async def test_an_older_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = await open_sqlite(path, busy_timeout_seconds=1)
    await old.record(listing(T0, {"a": 1, "b": 2}))
    await old.aclose()
    upgrade = Migration(
        SCHEMA_VERSION + 1,
        (
            "ALTER TABLE messages ADD COLUMN note TEXT",
            "UPDATE messages SET note = 'carried over'",
        ),
    )
    new = await open_sqlite(path, busy_timeout_seconds=1, migrations=(*MIGRATIONS, upgrade))
    try:
        assert await pragma(new, "user_version") == SCHEMA_VERSION + 1
        notes = await new._run(
            lambda conn: conn.execute("SELECT uid, note FROM messages ORDER BY uid").fetchall()
        )
        assert notes == [("a", "carried over"), ("b", "carried over")]
        assert set(await new.facts(BOX, "alice", ["a", "b"])) == {"a", "b"}
    finally:
        await new.aclose()


async def test_version_1_gets_each_accounts_last_listing(tmp_path: Path) -> None:
    """Migration 2 backfills accounts.last_listed from the latest last_seen."""
    path = tmp_path / "state.db"
    old = await open_sqlite(path, busy_timeout_seconds=1, migrations=MIGRATIONS[:1])
    await old._run(
        lambda conn: conn.executescript(
            "INSERT INTO accounts (id, upstream, upstream_user) VALUES (1, 'provider',"
            " 'alice@example.net');"
            "INSERT INTO messages (account_id, uid, size, first_seen, last_seen) VALUES"
            " (1, 'a', 1, '2024-05-01T00:00:00.000000Z', '2024-05-01T00:00:00.000000Z'),"
            " (1, 'b', 1, '2024-05-01T00:00:00.000000Z', '2024-05-03T00:00:00.000000Z');"
        )
    )
    await old.aclose()
    new = await open_sqlite(path, busy_timeout_seconds=1)
    try:
        rows = await new.messages()
        assert [row.account_last_listed for row in rows] == [T0 + timedelta(days=2)] * 2
        assert await new.prune(T0 + timedelta(days=1)) == 1
    finally:
        await new.aclose()


async def test_a_failing_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await (await open_sqlite(path, busy_timeout_seconds=1)).aclose()
    broken = Migration(
        SCHEMA_VERSION + 1,
        ("CREATE TABLE half_done (x INTEGER)", "ALTER TABLE no_such_table ADD COLUMN y TEXT"),
    )
    with pytest.raises(StateError, match="no_such_table"):
        await open_sqlite(path, busy_timeout_seconds=1, migrations=(*MIGRATIONS, broken))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
    conn.close()
    assert "half_done" not in tables


async def test_a_store_from_a_newer_popproxy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await (await open_sqlite(path, busy_timeout_seconds=1)).aclose()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StateError, match="newer popproxy"):
        await open_sqlite(path, busy_timeout_seconds=1)


async def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE contacts (name TEXT)")
    conn.close()
    with pytest.raises(StateError, match="not a popproxy state store"):
        await open_sqlite(path, busy_timeout_seconds=1)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0] == 1
    conn.close()


async def test_a_file_that_is_not_sqlite_is_a_state_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database\n" * 400)
    with pytest.raises(StateError, match=str(path)):
        await open_sqlite(path, busy_timeout_seconds=1)


async def test_a_missing_directory_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot open"):
        await open_sqlite(tmp_path / "no" / "state.db", busy_timeout_seconds=1)


async def test_the_integrity_check_passes_a_healthy_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await open_sqlite(path, busy_timeout_seconds=1)
    await store.record(listing(T0, {f"u{i}": i for i in range(3000)}))
    await store.aclose()
    checked = await open_sqlite(path, busy_timeout_seconds=1, integrity_check=True)
    await checked.aclose()


async def test_the_integrity_check_refuses_a_damaged_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await open_sqlite(path, busy_timeout_seconds=1)
    await store.record(listing(T0, {f"u{i}": i for i in range(3000)}))
    await store.aclose()
    with sqlite3.connect(path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    assert pages > 10
    with path.open("r+b") as raw:  # scribble over the b-tree pages past the schema
        for page in range(3, pages, 2):
            raw.seek(page * page_size + 8)
            raw.write(b"\xff" * 64)
    with pytest.raises(StateError):
        await open_sqlite(path, busy_timeout_seconds=1, integrity_check=True)


async def test_a_writer_that_waits_too_long_fails_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await open_sqlite(path, busy_timeout_seconds=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StateError, match="locked"):
            await store.record(listing(T0, {"a": 1}))
        blocker.execute("ROLLBACK")
        assert await store.messages() == []
        await store.record(listing(T0, {"a": 1}))  # the connection is fine afterwards
        assert [row.uid for row in await store.messages()] == ["a"]
    finally:
        blocker.close()
        await store.aclose()


async def test_calls_beyond_the_listing_bound_are_refused(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "state.db", busy_timeout_seconds=1)
    uids = [f"u{i}" for i in range(MAX_RECORD_MESSAGES + 1)]
    try:
        with pytest.raises(ValueError, match="at most"):
            await store.record(
                SessionRecord(BOX, "alice", "s1", T0, seen=tuple(SeenMessage(u, 1) for u in uids))
            )
        with pytest.raises(ValueError, match="at most"):
            await store.facts(BOX, "alice", uids)
        assert await store.messages() == []
    finally:
        await store.aclose()


def count_message_writes(path: Path) -> None:
    """Count every INSERT, UPDATE and DELETE of a message row into a table ``writes``
    (triggers live in the file, so they see the store's own connections)."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE writes (n INTEGER NOT NULL)")
        conn.execute("INSERT INTO writes VALUES (0)")
        for event in ("INSERT", "UPDATE", "DELETE"):
            conn.execute(
                f"CREATE TRIGGER count_{event.lower()} AFTER {event} ON messages"
                " BEGIN UPDATE writes SET n = n + 1; END"
            )


def message_writes(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT n FROM writes").fetchone()[0])


async def test_an_unchanged_listing_writes_no_message_row(tmp_path: Path) -> None:
    """A QUIT that lists what the latest QUIT listed, retrieving nothing new, writes
    only the account's row; its listing still counts as seen at its time."""
    path = tmp_path / "state.db"
    store = await open_sqlite(path, busy_timeout_seconds=1)
    try:
        sizes = {f"u{i}": i for i in range(50)}
        await store.record(dataclasses.replace(listing(T0, sizes), retrieved=frozenset({"u1"})))
        count_message_writes(path)
        later = T0 + timedelta(hours=1)
        await store.record(
            dataclasses.replace(listing(later, sizes, "s2"), retrieved=frozenset({"u1"}))
        )
        assert message_writes(path) == 0
        facts = await store.facts(BOX, "alice", list(sizes))
        assert facts["u7"].last_seen == later
        assert facts["u1"].retrieved_at == T0
        await store.record(listing(later + timedelta(hours=1), {**sizes, "new": 1}, "s3"))
        # A changed listing: the latest listing's 50 rows get their last_seen written
        # out, then the new listing's 51 rows are written.
        assert message_writes(path) == 50 + 51
    finally:
        await store.aclose()


async def test_concurrent_records_share_transactions(
    tmp_path: Path, record_batches: list[int]
) -> None:
    """Records arriving while a commit is in flight are committed together (one
    transaction, one fsync each group), and every one of them is stored."""
    store = await open_sqlite(tmp_path / "state.db", busy_timeout_seconds=5)
    try:
        async with trio.open_nursery() as nursery:
            for n in range(20):
                account = AccountKey("provider", f"box{n}")
                record = SessionRecord(
                    account, "alice", f"s{n}", T0, seen=(SeenMessage(f"m{n}", n),)
                )
                nursery.start_soon(store.record, record)
        assert sum(record_batches) == 20
        assert len(record_batches) < 20
        rows = await store.messages()
        assert sorted(row.uid for row in rows) == sorted(f"m{n}" for n in range(20))
    finally:
        await store.aclose()


async def test_a_failing_record_leaves_the_rest_of_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One record of a group that sqlite refuses fails alone (its savepoint is rolled
    back); the others of the group are committed."""
    original = retention.record_session

    def refusing(conn: sqlite3.Connection, record: SessionRecord) -> bytes | None:
        latest = original(conn, record)
        if record.session_id == "bad":
            conn.execute("INSERT INTO no_such_table VALUES (1)")
        return latest

    monkeypatch.setattr(retention, "record_session", refusing)
    store = await open_sqlite(tmp_path / "state.db", busy_timeout_seconds=5)
    failed: list[str] = []

    async def one(session_id: str, uid: str) -> None:
        try:
            await store.record(
                SessionRecord(
                    AccountKey("provider", uid),
                    "alice",
                    session_id,
                    T0,
                    seen=(SeenMessage(uid, 1),),
                )
            )
        except StateError as exc:
            failed.append(f"{session_id}: {exc}")

    try:
        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(one, "bad" if n == 3 else f"s{n}", f"m{n}")
        assert len(failed) == 1
        assert failed[0].startswith("bad: state store ")
        assert "no_such_table" in failed[0]
        rows = await store.messages()
        assert sorted(row.uid for row in rows) == ["m0", "m1", "m2", "m4", "m5"]
    finally:
        await store.aclose()


async def test_a_cancelled_waiter_is_not_committed_later(tmp_path: Path) -> None:
    """A record cancelled while it waits for the commit in flight leaves the queue:
    the next group does not commit it behind its caller's back."""
    store = await open_sqlite(tmp_path / "state.db", busy_timeout_seconds=5)
    try:
        first = SessionRecord(BOX, "alice", "s1", T0, seen=(SeenMessage("a", 1),))
        second = SessionRecord(
            AccountKey("provider", "bob"), "bob", "s2", T0, seen=(SeenMessage("b", 1),)
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.record, first)
            await trio.testing.wait_all_tasks_blocked()  # the first commit is in flight
            with trio.CancelScope() as scope:
                scope.cancel()
                with pytest.raises(trio.Cancelled):
                    await store.record(second)
                    await trio.sleep_forever()  # pragma: no cover (cancelled above)
        await store.record(listing(T0 + timedelta(seconds=1), {"a": 1}, "s3"))
        assert [row.uid for row in await store.messages()] == ["a"]
    finally:
        await store.aclose()


def data_version(conn: sqlite3.Connection) -> int:
    """Changes whenever another connection commits to the file."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def last_listed_on_disk(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return str(conn.execute("SELECT last_listed FROM accounts").fetchone()[0])


# The listing the unchanged-QUIT tests start from: u0..u19, u1 retrieved.
WATCHED_SIZES = {f"u{i}": i for i in range(20)}


@contextlib.asynccontextmanager
async def retrieved_u1_recorded(
    path: Path,
) -> AsyncIterator[tuple[SqliteStore, sqlite3.Connection]]:
    """A store at ``path`` that recorded WATCHED_SIZES at T0 with u1 retrieved, and a
    second connection to read its ``data_version`` (which moves on every commit)."""
    store = await open_sqlite(path, busy_timeout_seconds=1)
    with contextlib.closing(sqlite3.connect(path)) as watcher:
        try:
            first = dataclasses.replace(listing(T0, WATCHED_SIZES), retrieved=frozenset({"u1"}))
            await store.record(first)
            yield store, watcher
        finally:
            await store.aclose()


async def test_an_unchanged_quit_writes_nothing_until_the_refresh_bound(
    tmp_path: Path, record_batches: list[int]
) -> None:
    """A QUIT that lists the latest listing and retrieves only what is stored has no
    thread hand-off and no commit; the last_listed on disk (what a crash leaves) is
    never more than LAST_LISTED_REFRESH_SECONDS behind a QUIT that returned."""
    path = tmp_path / "state.db"
    async with retrieved_u1_recorded(path) as (store, watcher):
        version, calls = data_version(watcher), len(record_batches)
        bound = timedelta(seconds=LAST_LISTED_REFRESH_SECONDS)
        for at in (T0 + timedelta(minutes=1), T0 + bound):
            unchanged = dataclasses.replace(listing(at, WATCHED_SIZES), retrieved=frozenset({"u1"}))
            await store.record(unchanged)
            assert (data_version(watcher), len(record_batches)) == (version, calls)
        assert last_listed_on_disk(path) == utc_text(T0)
        past = T0 + bound + timedelta(microseconds=1)
        await store.record(listing(past, WATCHED_SIZES))
        assert data_version(watcher) != version
        assert len(record_batches) == calls + 1
        assert last_listed_on_disk(path) == utc_text(past)


@pytest.mark.parametrize(
    "change",
    [
        {"retrieved": frozenset({"u2"})},
        {"user": "bob", "retrieved": frozenset({"u1"})},
        {"hidden": (Disposal("u3", "keep"),)},
        {"deleted_upstream": (Disposal("u4", "gone"),)},
        {"seen": tuple(SeenMessage(f"u{i}", i) for i in range(19))},
        {"seen": (*(SeenMessage(f"u{i}", i) for i in range(19)), SeenMessage("u19", 7))},
    ],
    ids=["new-retrieval", "other-user", "hide", "upstream-deletion", "shorter", "resized"],
)
async def test_a_quit_that_changes_something_commits_before_it_returns(
    tmp_path: Path, change: dict[str, object]
) -> None:
    path = tmp_path / "state.db"
    async with retrieved_u1_recorded(path) as (store, watcher):
        version = data_version(watcher)
        at = T0 + timedelta(minutes=1)
        await store.record(dataclasses.replace(listing(at, WATCHED_SIZES, "s2"), **change))  # type: ignore[arg-type]
        assert data_version(watcher) != version
        assert last_listed_on_disk(path) == utc_text(at)


async def test_a_big_listing_is_always_written(tmp_path: Path) -> None:
    """Past UNCHANGED_MAX_MESSAGES the digest is not computed on the event loop."""
    path = tmp_path / "state.db"
    sizes = {f"u{i}": i for i in range(UNCHANGED_MAX_MESSAGES + 1)}
    store = await open_sqlite(path, busy_timeout_seconds=1)
    try:
        await store.record(listing(T0, sizes))
        await store.record(listing(T0 + timedelta(minutes=1), sizes, "s2"))
        assert last_listed_on_disk(path) == utc_text(T0 + timedelta(minutes=1))
    finally:
        await store.aclose()


async def test_after_a_failed_record_the_next_quit_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed record may or may not be stored: the account is not answered from
    memory until a record of it is committed again."""
    path = tmp_path / "state.db"
    sizes = {"a": 1}
    store = await open_sqlite(path, busy_timeout_seconds=1)
    try:
        await store.record(listing(T0, sizes))
        original = retention.record_session

        def refusing(conn: sqlite3.Connection, record: SessionRecord) -> bytes | None:
            original(conn, record)
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(retention, "record_session", refusing)
        with pytest.raises(StateError):
            await store.record(listing(T0 + timedelta(minutes=1), {"a": 1, "b": 2}, "s2"))
        monkeypatch.setattr(retention, "record_session", original)
        later = T0 + timedelta(minutes=2)
        await store.record(listing(later, sizes, "s3"))
        assert last_listed_on_disk(path) == utc_text(later)
    finally:
        await store.aclose()
