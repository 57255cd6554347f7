"""The ``StateStore`` contract, run against every backend (tests/state/conftest.py).

Only the protocol is used here, never a backend's internals, so a new backend
passes or fails the same tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import pytest
import trio

from popproxy.state import StateStore
from popproxy.state.base import AccountKey, Disposal, SeenMessage, SessionRecord, StoredMessage
from state.state_backends import Backend

ALICE_BOX = AccountKey("provider", "alice@example.net")
SHARED_BOX = AccountKey("provider", "team@example.net")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def session(
    at: datetime,
    seen: dict[str, int],
    *,
    account: AccountKey = ALICE_BOX,
    user: str = "alice",
    session_id: str = "s1",
    retrieved: set[str] | None = None,
    hidden: dict[str, str] | None = None,
    deleted: dict[str, str] | None = None,
) -> SessionRecord:
    """A SessionRecord from plain dicts: uid -> size, uid -> rule."""
    return SessionRecord(
        account=account,
        user=user,
        session_id=session_id,
        at=at,
        seen=tuple(SeenMessage(uid, size) for uid, size in seen.items()),
        retrieved=frozenset(retrieved or ()),
        hidden=tuple(Disposal(uid, rule) for uid, rule in (hidden or {}).items()),
        deleted_upstream=tuple(Disposal(uid, rule) for uid, rule in (deleted or {}).items()),
    )


def by_uid(rows: Sequence[StoredMessage]) -> dict[str, StoredMessage]:
    return {row.uid: row for row in rows}


async def test_an_empty_store_knows_nothing(store: StateStore) -> None:
    assert await store.facts(ALICE_BOX, "alice", ["a", "b"]) == {}
    assert await store.messages() == []
    assert await store.messages(ALICE_BOX) == []
    assert await store.prune(T0) == 0


async def test_a_listing_records_first_seen_and_size(store: StateStore) -> None:
    await store.record(session(T0, {"a": 100, "b": 200}))
    facts = await store.facts(ALICE_BOX, "alice", ["a", "b", "unknown"])
    assert set(facts) == {"a", "b"}
    assert facts["a"].size == 100
    assert facts["b"].size == 200
    for fact in facts.values():
        assert fact.first_seen == fact.last_seen == T0
        assert fact.retrieved_at is None
        assert not fact.hidden
        assert fact.deleted_upstream_at is None


async def test_a_later_listing_moves_last_seen_only(store: StateStore) -> None:
    await store.record(session(T0, {"a": 100}))
    await store.record(session(T0 + DAY, {"a": 100, "b": 5}, session_id="s2"))
    facts = await store.facts(ALICE_BOX, "alice", ["a", "b"])
    assert (facts["a"].first_seen, facts["a"].last_seen) == (T0, T0 + DAY)
    assert (facts["b"].first_seen, facts["b"].last_seen) == (T0 + DAY, T0 + DAY)


async def test_commits_out_of_order_keep_the_earliest_first_seen(store: StateStore) -> None:
    await store.record(session(T0 + DAY, {"a": 100}, session_id="late"))
    await store.record(session(T0, {"a": 100}, session_id="early"))
    fact = (await store.facts(ALICE_BOX, "alice", ["a"]))["a"]
    assert (fact.first_seen, fact.last_seen) == (T0, T0 + DAY)


async def test_times_come_back_as_utc(store: StateStore) -> None:
    berlin = timezone(timedelta(hours=2))
    local = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=berlin)
    await store.record(session(local, {"a": 1}))
    fact = (await store.facts(ALICE_BOX, "alice", ["a"]))["a"]
    assert fact.first_seen == local
    assert fact.first_seen.utcoffset() == timedelta(0)
    assert fact.first_seen.microsecond == 123456


async def test_retrievals_are_per_local_user_and_the_first_is_kept(store: StateStore) -> None:
    await store.record(
        session(T0, {"a": 1, "b": 2}, account=SHARED_BOX, user="alice", retrieved={"a"})
    )
    await store.record(
        session(T0 + DAY, {"a": 1, "b": 2}, account=SHARED_BOX, user="alice", retrieved={"a"})
    )
    await store.record(
        session(T0 + 2 * DAY, {"a": 1, "b": 2}, account=SHARED_BOX, user="bob", retrieved={"b"})
    )
    alice = await store.facts(SHARED_BOX, "alice", ["a", "b"])
    bob = await store.facts(SHARED_BOX, "bob", ["a", "b"])
    assert (alice["a"].retrieved_at, alice["b"].retrieved_at) == (T0, None)
    assert (bob["a"].retrieved_at, bob["b"].retrieved_at) == (None, T0 + 2 * DAY)
    rows = by_uid(await store.messages(SHARED_BOX))
    assert rows["a"].retrieved_by == (("alice", T0),)
    assert rows["b"].retrieved_by == (("bob", T0 + 2 * DAY),)


async def test_a_hide_is_for_one_local_user_with_its_rule(store: StateStore) -> None:
    await store.record(
        session(T0, {"a": 1}, account=SHARED_BOX, user="alice", hidden={"a": "keep-all"})
    )
    assert (await store.facts(SHARED_BOX, "alice", ["a"]))["a"].hidden
    assert not (await store.facts(SHARED_BOX, "bob", ["a"]))["a"].hidden
    row = (await store.messages(SHARED_BOX))[0]
    assert row.hidden_for == (("alice", "keep-all", T0),)


async def test_a_hidden_message_stays_hidden(store: StateStore) -> None:
    """Invariant 3: later sessions that list the same content do not unhide it."""
    await store.record(session(T0, {"a": 1}, hidden={"a": "r1"}))
    for day in range(1, 4):
        await store.record(session(T0 + day * DAY, {"a": 1}, session_id=f"s{day}"))
    fact = (await store.facts(ALICE_BOX, "alice", ["a"]))["a"]
    assert fact.hidden
    assert (await store.messages())[0].hidden_for == (("alice", "r1", T0),)


async def test_an_upstream_deletion_is_the_accounts_with_rule_and_time(store: StateStore) -> None:
    await store.record(
        session(T0, {"a": 1, "b": 2}, account=SHARED_BOX, user="alice", deleted={"a": "old"})
    )
    for user in ("alice", "bob"):
        facts = await store.facts(SHARED_BOX, user, ["a", "b"])
        assert facts["a"].deleted_upstream_at == T0
        assert facts["b"].deleted_upstream_at is None
    rows = by_uid(await store.messages(SHARED_BOX))
    assert (rows["a"].deleted_upstream_at, rows["a"].deleted_by_rule) == (T0, "old")
    assert (rows["b"].deleted_upstream_at, rows["b"].deleted_by_rule) == (None, None)


async def test_a_deletion_the_upstream_did_not_apply_is_recorded_again(store: StateStore) -> None:
    await store.record(session(T0, {"a": 1}, deleted={"a": "first"}))
    await store.record(session(T0 + DAY, {"a": 1}, session_id="s2", deleted={"a": "second"}))
    row = (await store.messages())[0]
    assert (row.deleted_upstream_at, row.deleted_by_rule) == (T0 + DAY, "second")
    assert row.last_seen == T0 + DAY


async def test_a_reused_uidl_with_another_size_is_new_content(store: StateStore) -> None:
    """Invariant 3: the old content's history never hides or expires the new one."""
    await store.record(
        session(T0, {"a": 100}, retrieved={"a"}, hidden={"a": "r"}, deleted={"a": "r"})
    )
    later = T0 + 30 * DAY
    await store.record(session(later, {"a": 999}, session_id="s2"))
    fact = (await store.facts(ALICE_BOX, "alice", ["a"]))["a"]
    assert fact.size == 999
    assert fact.first_seen == fact.last_seen == later
    assert fact.retrieved_at is None
    assert not fact.hidden
    assert fact.deleted_upstream_at is None
    row = (await store.messages())[0]
    assert (row.retrieved_by, row.hidden_for, row.deleted_by_rule) == ((), (), None)


async def test_a_reused_uidl_can_be_hidden_in_the_same_record(store: StateStore) -> None:
    await store.record(session(T0, {"a": 100}))
    later = T0 + DAY
    await store.record(session(later, {"a": 7}, session_id="s2", hidden={"a": "r"}))
    fact = (await store.facts(ALICE_BOX, "alice", ["a"]))["a"]
    assert (fact.size, fact.first_seen, fact.hidden) == (7, later, True)


async def test_an_older_listing_does_not_replace_newer_content(store: StateStore) -> None:
    """A commit that arrives late with the old size neither resurrects the old content
    nor hides the new one."""
    await store.record(session(T0 + DAY, {"a": 7}, session_id="new"))
    await store.record(
        session(T0, {"a": 100}, session_id="old", hidden={"a": "r"}, retrieved={"a"})
    )
    fact = (await store.facts(ALICE_BOX, "alice", ["a"]))["a"]
    assert (fact.size, fact.first_seen) == (7, T0 + DAY)
    assert (fact.hidden, fact.retrieved_at) == (False, None)


async def test_accounts_are_separate(store: StateStore) -> None:
    other = AccountKey("other-provider", "alice@example.net")
    await store.record(session(T0, {"a": 1}, hidden={"a": "r"}))
    await store.record(session(T0 + DAY, {"a": 2}, account=other, session_id="s2"))
    mine = (await store.facts(ALICE_BOX, "alice", ["a"]))["a"]
    theirs = (await store.facts(other, "alice", ["a"]))["a"]
    assert (mine.size, mine.hidden) == (1, True)
    assert (theirs.size, theirs.hidden, theirs.first_seen) == (2, False, T0 + DAY)
    assert [row.account for row in await store.messages()] == [other, ALICE_BOX]
    assert [row.account for row in await store.messages(other)] == [other]
    assert await store.messages(AccountKey("nowhere", "nobody")) == []


async def test_facts_for_a_whole_large_listing(store: StateStore) -> None:
    listing = {f"uid-{i:05d}": i for i in range(2500)}
    await store.record(session(T0, listing, hidden={"uid-02499": "r"}))
    facts = await store.facts(ALICE_BOX, "alice", [*listing, "missing"])
    assert {uid: fact.size for uid, fact in facts.items()} == listing
    assert [uid for uid, fact in facts.items() if fact.hidden] == ["uid-02499"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(session(T0, {"a": 1}, retrieved={"b"}), id="retrieved-not-listed"),
        pytest.param(session(T0, {"a": 1}, hidden={"b": "r"}), id="hidden-not-listed"),
        pytest.param(session(T0, {"a": 1}, deleted={"b": "r"}), id="deleted-not-listed"),
        pytest.param(session(T0.replace(tzinfo=None), {"a": 1}), id="naive-time"),
        pytest.param(session(T0, {"a": 1}, session_id=""), id="empty-session-id"),
        pytest.param(session(T0, {"": 1}), id="empty-uid"),
        pytest.param(session(T0, {"x" * 71: 1}), id="uid-over-70"),
        pytest.param(session(T0, {"a": -1}), id="negative-size"),
        pytest.param(session(T0, {"a": 1}, hidden={"a": ""}), id="empty-rule"),
        pytest.param(session(T0, {"a": 1}, user="al\0ice"), id="nul-in-user"),
        pytest.param(session(T0, {"a": 1}, hidden={"a": "r\0"}), id="nul-in-rule"),
        pytest.param(session(T0, {"a": 1}, user="\udc80"), id="not-utf8-user"),
    ],
)
async def test_a_record_that_no_session_could_make_is_refused_whole(
    store: StateStore, bad: SessionRecord
) -> None:
    with pytest.raises(ValueError):
        await store.record(bad)
    assert await store.messages() == []


async def test_a_uidl_listed_twice_in_one_record_is_refused(store: StateStore) -> None:
    record = session(T0, {"a": 1})
    twice = SessionRecord(
        record.account, record.user, record.session_id, T0, seen=(*record.seen, *record.seen)
    )
    with pytest.raises(ValueError, match="twice"):
        await store.record(twice)
    assert await store.messages() == []


async def test_prune_forgets_what_the_upstream_stopped_listing(store: StateStore) -> None:
    await store.record(session(T0, {"gone": 1, "kept": 2}, hidden={"gone": "r"}))
    await store.record(session(T0 + 10 * DAY, {"kept": 2}, session_id="s2"))
    assert await store.prune(T0 + DAY) == 1
    assert [row.uid for row in await store.messages()] == ["kept"]
    assert await store.facts(ALICE_BOX, "alice", ["gone"]) == {}
    # Listed again after being forgotten, it is a new message with no history.
    await store.record(session(T0 + 11 * DAY, {"gone": 1}, session_id="s3"))
    fact = (await store.facts(ALICE_BOX, "alice", ["gone"]))["gone"]
    assert (fact.first_seen, fact.hidden) == (T0 + 11 * DAY, False)


async def test_prune_keeps_an_account_nobody_listed_since(store: StateStore) -> None:
    """Invariant 3: messages still upstream keep their hides however long nobody logs in."""
    await store.record(session(T0, {"a": 1}, hidden={"a": "r"}))
    assert await store.prune(T0 + 365 * DAY) == 0
    assert (await store.facts(ALICE_BOX, "alice", ["a"]))["a"].hidden


async def test_an_empty_listing_makes_every_uidl_gone(store: StateStore) -> None:
    await store.record(session(T0, {"a": 1, "b": 2}))
    await store.record(session(T0 + DAY, {}, session_id="s2"))
    rows = await store.messages()
    assert [row.account_last_listed for row in rows] == [T0 + DAY, T0 + DAY]
    assert [row.is_gone(T0 + DAY) for row in rows] == [True, True]
    assert [row.is_gone(T0) for row in rows] == [False, False]
    assert await store.prune(T0) == 0
    assert await store.prune(T0 + DAY) == 2


async def test_prune_counts_past_one_batch(store: StateStore) -> None:
    await store.record(session(T0, {f"u{i}": i for i in range(4500)}))
    await store.record(session(T0 + DAY, {"new": 1}, session_id="s2"))
    assert await store.prune(T0 + DAY) == 4500
    assert [row.uid for row in await store.messages()] == ["new"]
    assert await store.prune(T0 + DAY) == 0


async def test_prune_needs_an_aware_time(store: StateStore) -> None:
    with pytest.raises(ValueError, match="timezone"):
        await store.prune(T0.replace(tzinfo=None))


async def test_the_store_survives_close_and_reopen(backend: Backend) -> None:
    first = await backend.open()
    try:
        await first.record(session(T0, {"a": 1, "b": 2}, retrieved={"a"}, deleted={"b": "r"}))
    finally:
        await first.aclose()
    second = await backend.open()
    try:
        facts = await second.facts(ALICE_BOX, "alice", ["a", "b"])
        assert facts["a"].retrieved_at == T0
        assert facts["b"].deleted_upstream_at == T0
    finally:
        await second.aclose()


async def test_a_closed_store_refuses_work(backend: Backend) -> None:
    opened = await backend.open()
    await opened.aclose()
    await opened.aclose()  # closing twice is harmless
    with pytest.raises(trio.ClosedResourceError):
        await opened.facts(ALICE_BOX, "alice", ["a"])


async def test_concurrent_sessions_on_one_store(store: StateStore) -> None:
    """Sessions of several accounts commit at once; every record is whole afterwards."""
    accounts = [AccountKey("provider", f"box{i}@example.net") for i in range(5)]
    listing = {f"m{i}": 1000 + i for i in range(20)}

    async def one_session(n: int) -> None:
        await store.record(
            session(
                T0 + timedelta(seconds=n),
                listing,
                account=accounts[n % 5],
                user=f"user{n}",
                session_id=f"s{n}",
                retrieved={f"m{n % 20}"},
                hidden={f"m{(n + 1) % 20}": "r"},
            )
        )

    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(one_session, n)
    for n in range(50):
        facts = await store.facts(accounts[n % 5], f"user{n}", list(listing))
        assert {uid: fact.size for uid, fact in facts.items()} == listing
        assert [uid for uid, fact in facts.items() if fact.retrieved_at] == [f"m{n % 20}"]
        assert [uid for uid, fact in facts.items() if fact.hidden] == [f"m{(n + 1) % 20}"]


# -- known-good sources (popproxy/auth/known_sources.py) --------------------------------


async def test_a_remembered_source_is_known_since_its_login(store: StateStore) -> None:
    assert await store.known_source("alice", "192.0.2.1", T0 - DAY) is None
    await store.remember_source("alice", "192.0.2.1", T0, keep=10, forget_before=T0 - 30 * DAY)
    assert await store.known_source("alice", "192.0.2.1", T0 - DAY) == T0
    assert await store.known_source("alice", "192.0.2.1", T0) == T0  # at `since`: known
    assert await store.known_source("alice", "192.0.2.1", T0 + DAY) is None  # too long ago
    # Per user and per source: no one else's login makes a source known.
    assert await store.known_source("bob", "192.0.2.1", T0 - DAY) is None
    assert await store.known_source("alice", "192.0.2.2", T0 - DAY) is None
    assert await store.known_source("alice", "2001:db8::/64", T0 - DAY) is None


async def test_a_later_login_moves_the_time_and_an_earlier_one_does_not(
    store: StateStore,
) -> None:
    forget = T0 - 30 * DAY
    await store.remember_source("alice", "2001:db8::/64", T0, keep=10, forget_before=forget)
    await store.remember_source("alice", "2001:db8::/64", T0 + DAY, keep=10, forget_before=forget)
    await store.remember_source("alice", "2001:db8::/64", T0, keep=10, forget_before=forget)
    assert await store.known_source("alice", "2001:db8::/64", T0) == T0 + DAY


async def test_a_user_keeps_only_the_most_recent_sources(store: StateStore) -> None:
    forget = T0 - 30 * DAY
    for n in range(5):
        await store.remember_source(
            "alice", f"192.0.2.{n}", T0 + n * DAY, keep=3, forget_before=forget
        )
    known = [await store.known_source("alice", f"192.0.2.{n}", forget) for n in range(5)]
    assert known == [None, None, T0 + 2 * DAY, T0 + 3 * DAY, T0 + 4 * DAY]
    # Another user's sources are not counted against alice's, nor trimmed with them.
    await store.remember_source("bob", "192.0.2.0", T0, keep=1, forget_before=forget)
    assert await store.known_source("bob", "192.0.2.0", forget) == T0
    assert await store.known_source("alice", "192.0.2.4", forget) == T0 + 4 * DAY


async def test_sources_older_than_the_window_are_forgotten(store: StateStore) -> None:
    await store.remember_source("alice", "192.0.2.1", T0, keep=10, forget_before=T0 - DAY)
    later = T0 + 40 * DAY
    await store.remember_source("alice", "192.0.2.2", later, keep=10, forget_before=later - DAY)
    # Gone from the store, not only too old for this question.
    assert await store.known_source("alice", "192.0.2.1", T0 - 100 * DAY) is None
    assert await store.known_source("alice", "192.0.2.2", later) == later


async def test_a_known_source_call_no_session_could_make_is_refused(store: StateStore) -> None:
    with pytest.raises(ValueError):
        await store.known_source("", "192.0.2.1", T0)
    with pytest.raises(ValueError):
        await store.known_source("alice", "x" * 65, T0)
    with pytest.raises(ValueError):
        await store.remember_source("alice", "192.0.2.1", T0, keep=0, forget_before=T0)
    with pytest.raises(ValueError):
        await store.remember_source("alice", "192.0.2.1", T0, keep=1001, forget_before=T0)


async def test_a_late_record_inside_an_unchanged_listing_span_keeps_prune_exact(
    store: StateStore,
) -> None:
    """The same listing twice (the second QUIT writes no message row on sqlite), then a
    late commit from between them listing one more UIDL: that UIDL is gone from the
    latest listing and pruned, the latest listing's UIDLs are last seen at its time."""
    await store.record(session(T0, {"a": 1, "b": 2}, session_id="s1"))
    await store.record(session(T0 + 2 * DAY, {"a": 1, "b": 2}, session_id="s2"))
    await store.record(session(T0 + DAY, {"a": 1, "x": 3}, session_id="late"))
    rows = by_uid(await store.messages(ALICE_BOX))
    assert {uid: row.last_seen for uid, row in rows.items()} == {
        "a": T0 + 2 * DAY,
        "b": T0 + 2 * DAY,
        "x": T0 + DAY,
    }
    facts = await store.facts(ALICE_BOX, "alice", ["a", "b", "x"])
    assert {uid: f.last_seen for uid, f in facts.items()} == {
        "a": T0 + 2 * DAY,
        "b": T0 + 2 * DAY,
        "x": T0 + DAY,
    }
    assert await store.prune(T0 + 3 * DAY) == 1
    assert set(by_uid(await store.messages(ALICE_BOX))) == {"a", "b"}


async def test_a_big_listing_reads_and_writes_like_a_small_one(store: StateStore) -> None:
    """Listings past the size where a backend scans the whole account at once."""
    sizes = {f"u{i}": i for i in range(6000)}
    await store.record(session(T0, sizes, retrieved={"u1"}))
    await store.record(session(T0 + DAY, {**sizes, "new": 7}, retrieved={"u2"}))
    facts = await store.facts(ALICE_BOX, "alice", [*sizes, "new", "unknown"])
    assert len(facts) == 6001
    assert facts["u1"].retrieved_at == T0
    assert facts["u2"].retrieved_at == T0 + DAY
    assert facts["new"].first_seen == T0 + DAY
    assert facts["u5999"].size == 5999
    assert (facts["u3"].first_seen, facts["u3"].last_seen) == (T0, T0 + DAY)


MINUTE = timedelta(minutes=1)


async def test_every_quit_that_changes_something_is_stored_when_it_returns(
    backend: Backend,
) -> None:
    """Quick QUITs on the same listing (sqlite answers the unchanged ones without a
    write): each that retrieves, hides or deletes something new, or lists something
    else, is read back by another store on the same storage as soon as it returns."""
    store = await backend.open()
    try:
        listed = {"a": 1, "b": 2, "c": 3, "d": 4}
        await store.record(session(T0, listed, retrieved={"a"}))
        await store.record(session(T0 + MINUTE, listed, retrieved={"a"}, session_id="s2"))
        steps = [
            session(T0 + 2 * MINUTE, listed, retrieved={"a", "b"}, session_id="s3"),
            session(T0 + 3 * MINUTE, listed, user="bob", retrieved={"a"}, session_id="s4"),
            session(T0 + 4 * MINUTE, listed, hidden={"c": "keep"}, session_id="s5"),
            session(T0 + 5 * MINUTE, listed, deleted={"d": "gone"}, session_id="s6"),
            session(T0 + 6 * MINUTE, {**listed, "e": 5}, session_id="s7"),
            session(T0 + 7 * MINUTE, {**listed, "e": 6}, session_id="s8"),
        ]
        for step in steps:
            await store.record(step)
            other = await backend.open()
            try:
                alice = await other.facts(ALICE_BOX, "alice", ["a", "b", "c", "d", "e"])
                bob = await other.facts(ALICE_BOX, "bob", ["a"])
            finally:
                await other.aclose()
            match step.session_id:
                case "s3":
                    assert alice["b"].retrieved_at == step.at
                case "s4":
                    assert bob["a"].retrieved_at == step.at
                case "s5":
                    assert alice["c"].hidden
                case "s6":
                    assert alice["d"].deleted_upstream_at == step.at
                case "s7":
                    assert (alice["e"].first_seen, alice["e"].size) == (step.at, 5)
                case "s8":
                    assert (alice["e"].first_seen, alice["e"].size) == (step.at, 6)
            assert alice["a"].retrieved_at == T0
    finally:
        await store.aclose()


async def test_prune_near_the_last_listed_refresh_bound_is_exact(backend: Backend) -> None:
    """The same listing at T0, +30 and +50 minutes (sqlite writes only the first), then
    one without ``x``: ``x`` was last seen at +50 minutes, to the microsecond, for
    this store, for another store on the same storage and for prune; first seen
    (what expire_after_days reads) never moves."""
    store = await backend.open()
    try:
        await store.record(session(T0, {"a": 1, "x": 2}, hidden={"x": "r"}))
        await store.record(session(T0 + 30 * MINUTE, {"a": 1, "x": 2}, session_id="s2"))
        last = T0 + 50 * MINUTE
        await store.record(session(last, {"a": 1, "x": 2}, session_id="s3"))
        facts = await store.facts(ALICE_BOX, "alice", ["a", "x"])
        assert {u: (f.first_seen, f.last_seen) for u, f in facts.items()} == {
            "a": (T0, last),
            "x": (T0, last),
        }
        assert [r.account_last_listed for r in await store.messages()] == [last, last]
        assert await store.prune(T0 + 365 * DAY) == 0  # x is still listed
        await store.record(session(T0 + 2 * 60 * MINUTE, {"a": 1}, session_id="s4"))
        assert by_uid(await store.messages())["x"].last_seen == last
        other = await backend.open()
        try:
            assert by_uid(await other.messages())["x"].last_seen == last
            assert await other.prune(last) == 0
        finally:
            await other.aclose()
        assert await store.prune(last + timedelta(microseconds=1)) == 1
        assert set(by_uid(await store.messages())) == {"a"}
    finally:
        await store.aclose()


async def test_a_late_record_after_unchanged_quits_stays_late(backend: Backend) -> None:
    """A late commit (its time before the latest QUIT's, which sqlite did not write)
    leaves the latest listing as it is: its extra UIDL is the one gone."""
    store = await backend.open()
    try:
        await store.record(session(T0, {"a": 1, "b": 2}))
        await store.record(session(T0 + 40 * MINUTE, {"a": 1, "b": 2}, session_id="s2"))
        await store.record(session(T0 + 20 * MINUTE, {"a": 1, "x": 3}, session_id="late"))
        rows = by_uid(await store.messages(ALICE_BOX))
        assert {uid: row.last_seen for uid, row in rows.items()} == {
            "a": T0 + 40 * MINUTE,
            "b": T0 + 40 * MINUTE,
            "x": T0 + 20 * MINUTE,
        }
        assert await store.prune(T0 + 30 * MINUTE) == 1
        assert set(by_uid(await store.messages(ALICE_BOX))) == {"a", "b"}
    finally:
        await store.aclose()


async def test_the_last_listing_time_survives_close_and_reopen(backend: Backend) -> None:
    first = await backend.open()
    try:
        await first.record(session(T0, {"a": 1}))
        await first.record(session(T0 + 10 * MINUTE, {"a": 1}, session_id="s2"))
    finally:
        await first.aclose()
    second = await backend.open()
    try:
        [row] = await second.messages()
        assert (row.last_seen, row.account_last_listed) == (T0 + 10 * MINUTE, T0 + 10 * MINUTE)
    finally:
        await second.aclose()
