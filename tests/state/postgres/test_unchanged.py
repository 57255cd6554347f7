"""popproxy/state/postgres/unchanged.py: a QUIT that by its login's facts changes
nothing writes nothing; every QUIT that changes something still writes it, on one
store or on two sharing the database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from popproxy.state.base import AccountKey, Disposal, MessageFacts, SeenMessage, SessionRecord
from popproxy.state.postgres import PostgresStore, PostgresTarget, open_postgres
from popproxy.state.postgres.unchanged import (
    NOT_RETRIEVED_KEPT,
    UNCHANGED_REFRESH_SECONDS,
    LoginFacts,
)
from state.state_backends import PostgresBackend

BOX = AccountKey("provider", "alice@example.net")
T0 = datetime(2024, 5, 1, tzinfo=UTC)
SIZES = {"a": 10, "b": 20, "c": 30}
REFRESH = timedelta(seconds=UNCHANGED_REFRESH_SECONDS)


def quit_record(
    at: datetime,
    *,
    sizes: dict[str, int] = SIZES,
    retrieved: frozenset[str] = frozenset(),
    hidden: tuple[Disposal, ...] = (),
    deleted: tuple[Disposal, ...] = (),
    user: str = "alice",
    session: str = "s",
) -> SessionRecord:
    return SessionRecord(
        BOX,
        user,
        session,
        at,
        seen=tuple(SeenMessage(u, s) for u, s in sizes.items()),
        retrieved=retrieved,
        hidden=hidden,
        deleted_upstream=deleted,
    )


async def open_at(backend: PostgresBackend) -> PostgresStore:
    return await open_postgres(PostgresTarget(backend.url), lock_timeout_seconds=5)


def stored(backend: PostgresBackend) -> tuple[datetime, dict[str, datetime], set[str]]:
    """The account's last_listed, each UIDL's last_seen, and alice's retrievals."""
    [(last_listed,)] = backend.query("SELECT last_listed FROM accounts")
    seen = dict(backend.query("SELECT uid, last_seen FROM messages"))
    retrieved = {
        str(uid)
        for (uid,) in backend.query(
            "SELECT m.uid FROM retrievals AS r JOIN messages AS m ON m.id = r.message_id"
            " WHERE r.local_user = 'alice'"
        )
    }
    return last_listed, seen, retrieved


async def test_a_quit_that_changes_nothing_writes_nothing_until_the_refresh(
    pg_backend: PostgresBackend,
) -> None:
    store = await open_at(pg_backend)
    try:
        await store.record(quit_record(T0, retrieved=frozenset({"a"})))
        before = stored(pg_backend)
        # A later session: its login reads the facts, it retrieves "a" again, QUITs.
        await store.facts(BOX, "alice", list(SIZES))
        await store.record(quit_record(T0 + REFRESH, retrieved=frozenset({"a"})))
        assert stored(pg_backend) == before
        # Past the refresh, the same QUIT writes its times.
        await store.facts(BOX, "alice", list(SIZES))
        later = T0 + REFRESH + timedelta(seconds=1)
        await store.record(quit_record(later, retrieved=frozenset({"a"})))
        last_listed, seen, retrieved = stored(pg_backend)
        assert last_listed == later and set(seen.values()) == {later}
        assert retrieved == {"a"}
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    "change",
    [
        "retrieves another",
        "hides one",
        "deletes one upstream",
        "lists a new UIDL",
        "lists a UIDL with another size",
        "lists one UIDL fewer",
        "lists them in another order",
        "read no facts at login",
        "read the facts for another user",
    ],
)
async def test_a_quit_that_changes_something_writes_it(
    pg_backend: PostgresBackend, change: str
) -> None:
    store = await open_at(pg_backend)
    try:
        await store.record(quit_record(T0, retrieved=frozenset({"a"})))
        at = T0 + timedelta(minutes=5)
        if change != "read no facts at login":
            reader = "bob" if change == "read the facts for another user" else "alice"
            await store.facts(BOX, reader, list(SIZES))
        record = quit_record(at, retrieved=frozenset({"a"}))
        match change:
            case "retrieves another":
                record = quit_record(at, retrieved=frozenset({"a", "b"}))
            case "hides one":
                record = quit_record(at, hidden=(Disposal("c", "keep"),))
            case "deletes one upstream":
                record = quit_record(at, deleted=(Disposal("c", "drain"),))
            case "lists a new UIDL":
                record = quit_record(at, sizes=SIZES | {"d": 40})
            case "lists a UIDL with another size":
                record = quit_record(at, sizes=SIZES | {"c": 31})
            case "lists one UIDL fewer":
                record = quit_record(at, sizes={"a": 10, "b": 20})
            case "lists them in another order":
                record = quit_record(at, sizes=dict(reversed(SIZES.items())))
        await store.record(record)
        last_listed, seen, retrieved = stored(pg_backend)
        assert last_listed == at
        assert retrieved == ({"a", "b"} if change == "retrieves another" else {"a"})
        facts = await store.facts(BOX, "alice", ["a", "b", "c", "d"])
        match change:
            case "hides one":
                assert facts["c"].hidden
            case "deletes one upstream":
                assert facts["c"].deleted_upstream_at == at
            case "lists a new UIDL":
                assert facts["d"].first_seen == at
            case "lists a UIDL with another size":
                assert (facts["c"].size, facts["c"].first_seen) == (31, at)
            case "lists one UIDL fewer":
                assert seen["c"] == T0 and seen["a"] == at  # c is gone from the listing
    finally:
        await store.aclose()


async def test_a_logins_facts_answer_one_quit(pg_backend: PostgresBackend) -> None:
    """Read once, used once: a second QUIT without a new login writes."""
    store = await open_at(pg_backend)
    try:
        await store.record(quit_record(T0))
        await store.facts(BOX, "alice", list(SIZES))
        await store.record(quit_record(T0 + timedelta(minutes=1)))
        await store.record(quit_record(T0 + timedelta(minutes=2)))
        assert stored(pg_backend)[0] == T0 + timedelta(minutes=2)
    finally:
        await store.aclose()


async def test_two_stores_on_one_database_lose_nothing(pg_backend: PostgresBackend) -> None:
    """Two instances: what one writes between the other's login and QUIT stays, and
    the other's QUIT still writes what its own facts did not show as stored."""
    first, second = await open_at(pg_backend), await open_at(pg_backend)
    try:
        await first.record(quit_record(T0))
        await second.facts(BOX, "alice", list(SIZES))  # second's login: nothing retrieved
        await first.facts(BOX, "alice", list(SIZES))
        await first.record(quit_record(T0 + timedelta(minutes=1), retrieved=frozenset({"a"})))
        assert stored(pg_backend)[2] == {"a"}
        # second retrieved a and b: its login saw neither stored, so it writes.
        at = T0 + timedelta(minutes=2)
        await second.record(quit_record(at, retrieved=frozenset({"a", "b"})))
        assert stored(pg_backend)[2] == {"a", "b"}
        facts = await first.facts(BOX, "alice", list(SIZES))
        assert facts["a"].retrieved_at == T0 + timedelta(minutes=1)  # the first retrieval
        assert facts["b"].retrieved_at == at
        # A login on either store now sees both: a QUIT retrieving them writes nothing
        # (a write would move last_listed to the QUIT's time).
        before = stored(pg_backend)
        await second.facts(BOX, "alice", list(SIZES))
        again = at + timedelta(minutes=1)
        await second.record(quit_record(again, retrieved=frozenset({"a", "b"})))
        assert stored(pg_backend) == before
    finally:
        await first.aclose()
        await second.aclose()


# -- LoginFacts alone ---------------------------------------------------------------------


def fact(uid: str, size: int, last_seen: datetime, *, retrieved: bool = False) -> MessageFacts:
    return MessageFacts(
        uid=uid,
        size=size,
        first_seen=T0,
        last_seen=last_seen,
        retrieved_at=T0 if retrieved else None,
        hidden=False,
        deleted_upstream_at=None,
    )


def test_a_listing_with_an_unknown_uidl_is_not_answered() -> None:
    logins = LoginFacts()
    logins.read(BOX, "alice", ["a", "b"], {"a": fact("a", 10, T0)})
    assert not logins.answer_unchanged(quit_record(T0, sizes={"a": 10, "b": 20}))


def test_the_oldest_row_decides_the_refresh() -> None:
    logins = LoginFacts()
    old, new = T0 - REFRESH, T0
    facts = {"a": fact("a", 10, new), "b": fact("b", 20, old)}
    logins.read(BOX, "alice", ["a", "b"], facts)
    assert logins.answer_unchanged(quit_record(T0, sizes={"a": 10, "b": 20}))
    logins.read(BOX, "alice", ["a", "b"], facts)
    later = T0 + timedelta(seconds=1)
    assert not logins.answer_unchanged(quit_record(later, sizes={"a": 10, "b": 20}))


def test_logins_kept_are_bounded() -> None:
    logins = LoginFacts(max_logins=2)
    for user in ("u1", "u2", "u3"):
        logins.read(BOX, user, ["a"], {"a": fact("a", 10, T0)})
    answered = [
        logins.answer_unchanged(quit_record(T0, sizes={"a": 10}, user=user))
        for user in ("u1", "u2", "u3")
    ]
    assert answered == [False, True, True]


def test_a_login_with_many_messages_not_retrieved_keeps_nothing() -> None:
    logins = LoginFacts()
    uids = [f"m{i}" for i in range(NOT_RETRIEVED_KEPT + 1)]
    facts = {uid: fact(uid, 10, T0) for uid in uids}
    logins.read(BOX, "alice", uids, facts)
    assert not logins.answer_unchanged(quit_record(T0, sizes=dict.fromkeys(uids, 10)))
    facts[uids[0]] = fact(uids[0], 10, T0, retrieved=True)  # one fewer: kept
    logins.read(BOX, "alice", uids, facts)
    assert logins.answer_unchanged(quit_record(T0, sizes=dict.fromkeys(uids, 10)))
