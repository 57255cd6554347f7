"""What only the PostgreSQL backend promises: migrations shared by several processes,
the URL and its password, bounded waits, and riding out lost connections."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import trio

from popproxy.secret import Secret
from popproxy.state.base import (
    AccountKey,
    AuditQuery,
    Disposal,
    SeenMessage,
    SessionRecord,
    StateError,
)
from popproxy.state.postgres import (
    PG_CONNECT_TIMEOUT_SECONDS,
    PostgresStore,
    PostgresTarget,
    open_postgres,
    retention,
)
from popproxy.state.postgres.schema import MIGRATIONS, SCHEMA_TABLE, SCHEMA_VERSION, Migration
from state.state_backends import PostgresBackend, admin_connection

BOX = AccountKey("provider", "alice@example.net")
T0 = datetime(2024, 5, 1, tzinfo=UTC)


def listing(sizes: dict[str, int], session_id: str = "s1") -> SessionRecord:
    return SessionRecord(
        BOX, "alice", session_id, T0, seen=tuple(SeenMessage(u, s) for u, s in sizes.items())
    )


async def open_at(
    backend: PostgresBackend,
    migrations: tuple[Migration, ...] = MIGRATIONS,
    *,
    lock_timeout_seconds: float = 5,
) -> PostgresStore:
    return await open_postgres(
        PostgresTarget(backend.url),
        lock_timeout_seconds=lock_timeout_seconds,
        migrations=migrations,
    )


def versions(backend: PostgresBackend) -> list[tuple[int, int]]:
    return [
        (int(v), int(o))
        for v, o in backend.query(
            f"SELECT version, oldest_reader FROM {SCHEMA_TABLE} ORDER BY version"
        )
    ]


def tables(backend: PostgresBackend) -> set[str]:
    return {
        str(row[0])
        for row in backend.query(
            f"SELECT tablename FROM pg_tables WHERE schemaname = '{backend.schema}'"
        )
    }


async def test_instances_starting_at_once_migrate_once(pg_backend: PostgresBackend) -> None:
    """Eight stores open one empty schema at the same moment: each opens, and every
    migration ran once (without the advisory lock, all but one would fail on CREATE
    TABLE, and the counting migration would count more than one)."""
    counting = Migration(
        SCHEMA_VERSION + 1,
        ("CREATE TABLE migrated (n integer)", "INSERT INTO migrated VALUES (1)"),
        oldest_reader=SCHEMA_VERSION,
    )
    stores: list[PostgresStore] = []

    async def start() -> None:
        stores.append(await open_at(pg_backend, (*MIGRATIONS, counting)))

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(start)
        assert len(stores) == 8
        for n, store in enumerate(stores):
            await store.record(listing({f"u{n}": n}, session_id=f"s{n}"))
        assert len(await stores[0].messages()) == 8
    finally:
        for store in stores:
            await store.aclose()
    assert pg_backend.query("SELECT count(*) FROM migrated") == [(1,)]
    assert [v for v, _ in versions(pg_backend)] == [*range(1, SCHEMA_VERSION + 2)]


async def test_an_older_schema_is_upgraded_in_place(pg_backend: PostgresBackend) -> None:
    old = await open_at(pg_backend)
    await old.record(listing({"a": 1, "b": 2}))
    await old.aclose()
    upgrade = Migration(
        SCHEMA_VERSION + 1,
        ("ALTER TABLE messages ADD COLUMN note text", "UPDATE messages SET note = 'carried over'"),
        oldest_reader=SCHEMA_VERSION,
    )
    new = await open_at(pg_backend, (*MIGRATIONS, upgrade))
    try:
        assert set(await new.facts(BOX, "alice", ["a", "b"])) == {"a", "b"}
    finally:
        await new.aclose()
    assert versions(pg_backend)[-1] == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    notes = pg_backend.query("SELECT uid, note FROM messages ORDER BY uid")
    assert notes == [("a", "carried over"), ("b", "carried over")]


async def test_a_failing_migration_changes_nothing(pg_backend: PostgresBackend) -> None:
    await (await open_at(pg_backend)).aclose()
    broken = Migration(
        SCHEMA_VERSION + 1,
        ("CREATE TABLE half_done (x integer)", "ALTER TABLE no_such_table ADD COLUMN y text"),
        oldest_reader=SCHEMA_VERSION,
    )
    with pytest.raises(StateError, match="no_such_table"):
        await open_at(pg_backend, (*MIGRATIONS, broken))
    assert [v for v, _ in versions(pg_backend)] == [*range(1, SCHEMA_VERSION + 1)]
    assert "half_done" not in tables(pg_backend)


async def test_a_failing_first_migration_leaves_an_empty_schema(
    pg_backend: PostgresBackend,
) -> None:
    broken = Migration(1, ("CREATE TABLE half_done (x integer)", "SELECT no_such_column"), 1)
    with pytest.raises(StateError, match="no_such_column"):
        await open_at(pg_backend, (broken,))
    assert tables(pg_backend) == set()


async def test_a_newer_schema_that_this_version_can_read_is_used(
    pg_backend: PostgresBackend,
) -> None:
    """A rolling upgrade: the first upgraded instance migrated, the others still run."""
    additive = Migration(
        SCHEMA_VERSION + 1, ("CREATE TABLE later_feature (x integer)",), SCHEMA_VERSION
    )
    await (await open_at(pg_backend, (*MIGRATIONS, additive))).aclose()
    older = await open_at(pg_backend)
    try:
        await older.record(listing({"a": 1}))
        assert [row.uid for row in await older.messages()] == ["a"]
    finally:
        await older.aclose()
    assert [v for v, _ in versions(pg_backend)] == [*range(1, SCHEMA_VERSION + 2)]


async def test_a_newer_schema_that_this_version_cannot_read_is_refused(
    pg_backend: PostgresBackend,
) -> None:
    breaking = Migration(
        SCHEMA_VERSION + 1, ("ALTER TABLE messages RENAME TO messages_v2",), SCHEMA_VERSION + 1
    )
    await (await open_at(pg_backend, (*MIGRATIONS, breaking))).aclose()
    with pytest.raises(StateError, match="newer popproxy"):
        await open_at(pg_backend)


async def test_another_programs_tables_are_refused(pg_backend: PostgresBackend) -> None:
    with admin_connection(pg_backend.url) as conn:
        conn.execute("CREATE TABLE messages (subject text)")
    with pytest.raises(StateError, match="not a popproxy state store"):
        await open_at(pg_backend)
    assert tables(pg_backend) == {"messages"}


async def test_a_search_path_without_a_schema_is_a_clear_error(
    pg_backend: PostgresBackend,
) -> None:
    missing = PostgresBackend(pg_backend.database_url, "no_such_schema")
    with pytest.raises(StateError, match="no existing schema"):
        await open_at(missing)


async def test_a_server_that_refuses_fails_at_once_with_the_reason() -> None:
    started = time.monotonic()
    with pytest.raises(StateError, match=r"cannot open the state store .*127\.0\.0\.1:1/"):
        await open_postgres(
            PostgresTarget("postgresql://popproxy@127.0.0.1:1/popproxy"), lock_timeout_seconds=1
        )
    assert time.monotonic() - started < PG_CONNECT_TIMEOUT_SECONDS


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://popproxy:hunter2@db.example.net/popproxy",
        "postgresql://popproxy@db.example.net/popproxy?password=hunter2",
        "postgresql://popproxy@db.example.net/popproxy?sslmode=require&password=hunter2",
    ],
)
async def test_a_url_with_a_password_is_refused(url: str) -> None:
    with pytest.raises(StateError, match="must not contain a password") as caught:
        await open_postgres(PostgresTarget(url), lock_timeout_seconds=1)
    assert "hunter2" not in str(caught.value)


def test_the_password_goes_to_libpq_beside_the_url_and_the_url_wins() -> None:
    target = PostgresTarget(
        "postgresql://popproxy@db.example.net:6432/state?sslmode=verify-full&connect_timeout=3",
        Secret.from_str("s3cret"),
    )
    kwargs = target.connection_kwargs()
    assert kwargs["password"] == "s3cret"
    assert "connect_timeout" not in kwargs  # the URL's own 3 seconds stand
    assert kwargs["tcp_user_timeout"] > 0
    assert target.describe() == "postgresql://db.example.net:6432/state"
    assert "s3cret" not in repr(target)
    with pytest.raises(StateError, match="not UTF-8"):
        PostgresTarget(target.url, Secret(b"\xff\xfe")).connection_kwargs()


async def test_a_writer_that_waits_too_long_fails_and_writes_nothing(
    pg_backend: PostgresBackend,
) -> None:
    store = await open_at(pg_backend, lock_timeout_seconds=0.05)
    try:
        await store.record(listing({"a": 1}))
        with admin_connection(pg_backend.url) as blocker:
            blocker.execute("BEGIN")
            blocker.execute("SELECT * FROM accounts FOR UPDATE")
            with pytest.raises(StateError, match="lock timeout"):
                await store.record(listing({"a": 1, "b": 2}, session_id="s2"))
            blocker.execute("ROLLBACK")
        assert [row.uid for row in await store.messages()] == ["a"]
        await store.record(listing({"a": 1, "b": 2}, session_id="s2"))  # fine afterwards
        assert [row.uid for row in await store.messages()] == ["a", "b"]
    finally:
        await store.aclose()


async def test_connections_cut_by_the_server_are_replaced(pg_backend: PostgresBackend) -> None:
    """An administrator (or a PostgreSQL restart) ends every connection of the store:
    the next calls get fresh ones and no call fails."""
    store = await open_at(pg_backend)
    try:
        await store.record(listing({"a": 1}))
        with admin_connection(pg_backend.url) as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'popproxy' AND datname = current_database()"
                " AND pid <> pg_backend_pid()"
            ).fetchone()
        assert ended is not None and ended[0] >= 1
        for n in range(6):
            assert set(await store.facts(BOX, "alice", ["a"])) == {"a"}, n
    finally:
        await store.aclose()


@pytest.mark.parametrize("pipelined", [True, False])
async def test_a_record_is_the_same_with_or_without_pipeline_mode(
    pg_backend: PostgresBackend, monkeypatch: pytest.MonkeyPatch, pipelined: bool
) -> None:
    """A libpq older than 14 has no pipeline mode: the record sends its statements one
    by one and stores the same (retention.PIPELINE)."""
    monkeypatch.setattr(retention, "PIPELINE", pipelined)
    store = await open_at(pg_backend)
    try:
        await store.record(listing({"a": 1, "b": 2}))
        await store.record(
            SessionRecord(
                BOX,
                "alice",
                "s2",
                T0 + timedelta(minutes=1),
                seen=(SeenMessage("a", 1), SeenMessage("b", 3)),  # b: new content
                retrieved=frozenset({"a"}),
                hidden=(Disposal("a", "keep"),),
                deleted_upstream=(Disposal("b", "delete"),),
            )
        )
        facts = await store.facts(BOX, "alice", ["a", "b"])
        assert (facts["a"].size, facts["a"].first_seen, facts["a"].hidden) == (1, T0, True)
        assert facts["a"].retrieved_at == T0 + timedelta(minutes=1)
        assert facts["b"].size == 3 and facts["b"].first_seen == T0 + timedelta(minutes=1)
        assert facts["b"].deleted_upstream_at == T0 + timedelta(minutes=1)
        assert {(e.uid, e.action.value) for e in await store.audit(AuditQuery())} == {
            ("a", "hide"),
            ("b", "delete_upstream"),
        }
    finally:
        await store.aclose()


def test_times_are_timestamptz_and_names_compare_by_bytes(pg_backend: PostgresBackend) -> None:
    trio.run(lambda: _open_and_close(pg_backend))
    columns = dict(
        pg_backend.query(
            "SELECT column_name || '.' || table_name, coalesce(collation_name, data_type)"
            f" FROM information_schema.columns WHERE table_schema = '{pg_backend.schema}'"
            " AND column_name IN ('uid', 'first_seen', 'upstream_user', 'local_user')"
        )
    )
    assert columns["first_seen.messages"] == "timestamp with time zone"
    assert {columns["uid.messages"], columns["upstream_user.accounts"]} == {"C"}
    assert columns["local_user.hides"] == "C"


async def _open_and_close(backend: PostgresBackend) -> None:
    await (await open_at(backend)).aclose()


async def test_a_logins_facts_read_from_the_event_loop_equal_the_worker_threads(
    pg_backend: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short listing's facts come from the trio thread (text, times in microseconds),
    a long one's from a worker thread (psycopg's types): the same facts either way,
    retrievals, hides, deletions and sub-second times included."""
    store = await open_at(pg_backend)
    try:
        sizes = {f"m{i}": 100 + i for i in range(6)}
        first = T0 + timedelta(microseconds=123_457)
        await store.record(
            SessionRecord(
                BOX,
                "alice",
                "s1",
                first,
                seen=tuple(SeenMessage(u, s) for u, s in sizes.items()),
                retrieved=frozenset({"m1", "m2"}),
                hidden=(Disposal("m2", "10-keep"),),
                deleted_upstream=(Disposal("m3", "20-delete"),),
            )
        )
        later = first + timedelta(days=1, microseconds=5)
        seen = tuple(SeenMessage(u, s) for u, s in (sizes | {"m9": 9}).items())
        await store.record(SessionRecord(BOX, "alice", "s2", later, seen=seen))
        wanted = [*sizes, "m9", "unknown"]
        on_loop = await store.facts(BOX, "alice", wanted)
        other_user = await store.facts(BOX, "bob", wanted)
        monkeypatch.setattr("popproxy.state.postgres.store.FACTS_ON_LOOP_MAX_UIDS", 0)
        assert await store.facts(BOX, "alice", wanted) == on_loop
        assert await store.facts(BOX, "bob", wanted) == other_user
    finally:
        await store.aclose()
    assert set(on_loop) == {*sizes, "m9"}
    assert on_loop["m0"].first_seen == first and on_loop["m0"].last_seen == later
    assert on_loop["m9"].first_seen == later
    assert on_loop["m1"].retrieved_at == first and on_loop["m0"].retrieved_at is None
    assert on_loop["m2"].hidden and not other_user["m2"].hidden
    assert on_loop["m3"].deleted_upstream_at == first
    assert other_user["m1"].retrieved_at is None
