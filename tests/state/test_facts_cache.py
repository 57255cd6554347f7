"""FactsCache: a login's facts from memory, always what the sqlite store would answer.

The store is the real sqlite store in a temporary file; ``Asked`` only counts what
the cache asks of it. The property test runs sequences of records (in and out of
time order, with hides, reused UIDLs and new ones) and logins, and compares every
cached answer with the store's own.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings

from popproxy.config import StateConfig
from popproxy.state import StoreBackend, open_store
from popproxy.state.base import AccountKey, Disposal, MessageFacts, SeenMessage, SessionRecord
from popproxy.state.facts_cache import (
    FACTS_CACHE_MESSAGES,
    FACTS_CACHE_SECONDS,
    FactsCache,
    KnownMessage,
)

ACCOUNTS = (AccountKey("up", "box1"), AccountKey("up", "box2"))
USERS = ("alice", "bob")
UIDS = ("u1", "u2", "u3", "u4", "u5")
T0 = datetime(2024, 5, 1, tzinfo=UTC)
STEP = timedelta(hours=1)


class Asked:
    """The real store; ``facts`` calls are counted with the UIDLs asked. ``hold``
    makes the next read wait until the test lets it finish."""

    def __init__(self, inner: StoreBackend) -> None:
        self.inner = inner
        self.asked: list[list[str]] = []
        self.hold: trio.Event | None = None
        self.reading = trio.Event()

    async def facts(
        self, account: AccountKey, user: str, uids: Collection[str]
    ) -> Mapping[str, MessageFacts]:
        self.asked.append(list(uids))
        answer = await self.inner.facts(account, user, uids)
        if self.hold is not None:
            self.reading.set()
            await self.hold.wait()
        return answer


def rules_read(
    facts: Mapping[str, KnownMessage], uids: Sequence[str]
) -> dict[str, tuple[object, ...]]:
    return {
        uid: (fact.size, fact.first_seen, fact.hidden)
        for uid in uids
        if (fact := facts.get(uid)) is not None
    }


def record(
    at: datetime,
    listing: Mapping[str, int],
    *,
    account: AccountKey = ACCOUNTS[0],
    user: str = "alice",
    hidden: Sequence[str] = (),
) -> SessionRecord:
    return SessionRecord(
        account=account,
        user=user,
        session_id="s",
        at=at,
        seen=tuple(SeenMessage(uid, size) for uid, size in listing.items()),
        hidden=tuple(Disposal(uid, "keep") for uid in hidden),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Asked]:
    opened = await open_store(StateConfig(url=f"sqlite:///{tmp_path / 'state.db'}"))
    try:
        yield Asked(opened)
    finally:
        await opened.aclose()


async def recorded(store: Asked, cache: FactsCache, one: SessionRecord) -> None:
    """A QUIT's record, as retention writes it: the store, then the cache."""
    await store.inner.record(one)
    cache.recorded(one)


async def test_a_returning_login_asks_the_store_only_about_new_uidls(store: Asked) -> None:
    cache = FactsCache()
    listing = {"u1": 10, "u2": 20}
    await recorded(store, cache, record(T0, listing))
    first = await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2"])
    assert rules_read(first, ["u1", "u2"]) == {"u1": (10, T0, False), "u2": (20, T0, False)}
    await recorded(store, cache, record(T0 + STEP, listing, hidden=["u2"]))
    again = await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2"])
    assert rules_read(again, ["u1", "u2"]) == {"u1": (10, T0, False), "u2": (20, T0, True)}
    more = await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2", "u3"])
    assert "u3" not in more  # new mail: the store does not know it yet
    assert store.asked == [["u1", "u2"], ["u3"]]
    # Another user of the account has an entry of its own; alice's hide is not bob's.
    bobs = await cache.facts(store, ACCOUNTS[0], "bob", ["u1", "u2"])
    assert rules_read(bobs, ["u2"]) == {"u2": (20, T0, False)}
    assert len(store.asked) == 3


async def test_a_quit_fills_in_what_it_made_the_store_know(store: Asked) -> None:
    """The first QUIT of a listing the store did not know: the next login of each user
    of the account is answered from memory, with what the store now answers."""
    cache = FactsCache()
    listing = {"u1": 10, "u2": 20, "u3": 30}
    for user in USERS:
        first = await cache.facts(store, ACCOUNTS[0], user, sorted(listing))
        assert rules_read(first, sorted(listing)) == {}
    await recorded(store, cache, record(T0, listing, user="alice", hidden=["u2"]))
    asked = len(store.asked)
    for user in USERS:
        cached = await cache.facts(store, ACCOUNTS[0], user, sorted(listing))
        direct = await store.inner.facts(ACCOUNTS[0], user, sorted(listing))
        assert rules_read(cached, sorted(listing)) == rules_read(direct, sorted(listing))
    assert len(store.asked) == asked  # nothing read
    alices = await cache.facts(store, ACCOUNTS[0], "alice", sorted(listing))
    assert rules_read(alices, ["u1", "u2"]) == {"u1": (10, T0, False), "u2": (20, T0, True)}
    # A UIDL the entry never listed is not made up: the next login that lists it asks.
    await recorded(store, cache, record(T0 + STEP, {**listing, "u4": 40}))
    await cache.facts(store, ACCOUNTS[0], "alice", [*sorted(listing), "u4"])
    assert store.asked[asked:] == [["u4"]]


async def test_a_record_updates_each_entry_of_its_account_as_the_store(store: Asked) -> None:
    cache = FactsCache()
    await recorded(store, cache, record(T0 + 2 * STEP, {"u1": 10, "u2": 20}))
    for user in USERS:
        await cache.facts(store, ACCOUNTS[0], user, ["u1", "u2"])
    # A late commit (another session's QUIT at an earlier time): the earlier first-seen
    # time stays; alice hides u2, which bob still sees; u2's size changed.
    await recorded(store, cache, record(T0, {"u1": 10, "u2": 21}, hidden=["u1"]))
    alices = await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2"])
    bobs = await cache.facts(store, ACCOUNTS[0], "bob", ["u1", "u2"])
    assert rules_read(alices, ["u1"]) == {"u1": (10, T0, True)}
    assert rules_read(bobs, ["u1"]) == {"u1": (10, T0, False)}
    for facts in (alices, bobs):
        direct = await store.inner.facts(ACCOUNTS[0], "bob", ["u2"])
        assert rules_read(facts, ["u2"]) == rules_read(direct, ["u2"])
    assert store.asked == [["u1", "u2"], ["u1", "u2"], ["u2"], ["u2"]]


async def test_a_late_record_of_the_same_listing_moves_first_seen_back(store: Asked) -> None:
    cache = FactsCache()
    listing = {"u1": 10, "u2": 20}
    await recorded(store, cache, record(T0 + 2 * STEP, listing))
    await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2"])
    await recorded(store, cache, record(T0, listing))  # committed late, seen earlier
    cached = await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2"])
    assert rules_read(cached, ["u1", "u2"]) == {"u1": (10, T0, False), "u2": (20, T0, False)}
    direct = await store.inner.facts(ACCOUNTS[0], "alice", ["u1", "u2"])
    assert rules_read(cached, ["u1", "u2"]) == rules_read(direct, ["u1", "u2"])
    assert len(store.asked) == 1


async def test_a_read_overtaken_by_a_record_is_used_once_and_not_kept(store: Asked) -> None:
    cache = FactsCache()
    await recorded(store, cache, record(T0, {"u1": 10}))
    store.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        answers: list[Mapping[str, KnownMessage]] = []

        async def login() -> None:
            answers.append(await cache.facts(store, ACCOUNTS[0], "alice", ["u1"]))

        nursery.start_soon(login)
        await store.reading.wait()
        # Another session's QUIT hides u1 while the read is in flight.
        await recorded(store, cache, record(T0 + STEP, {"u1": 10}, hidden=["u1"]))
        store.hold.set()
    assert rules_read(answers[0], ["u1"]) == {"u1": (10, T0, False)}  # read before the hide
    store.hold = None
    after = await cache.facts(store, ACCOUNTS[0], "alice", ["u1"])
    assert rules_read(after, ["u1"]) == {"u1": (10, T0, True)}
    assert len(store.asked) == 2


async def test_a_record_that_may_not_be_stored_drops_the_account(store: Asked) -> None:
    cache = FactsCache()
    await recorded(store, cache, record(T0, {"u1": 10}))
    await cache.facts(store, ACCOUNTS[0], "alice", ["u1"])
    await cache.facts(store, ACCOUNTS[1], "alice", ["u1"])
    cache.forget(ACCOUNTS[0])
    await cache.facts(store, ACCOUNTS[0], "alice", ["u1"])
    await cache.facts(store, ACCOUNTS[1], "alice", ["u1"])
    assert store.asked == [["u1"], ["u1"], ["u1"]]


async def test_entries_are_read_again_after_their_time(
    store: Asked, mock_clock: trio.testing.MockClock
) -> None:
    cache = FactsCache()
    await cache.facts(store, ACCOUNTS[0], "alice", ["u1"])
    mock_clock.jump(FACTS_CACHE_SECONDS - 1)
    await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2"])  # u2 only; same expiry
    mock_clock.jump(1)
    await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2"])
    assert store.asked == [["u1"], ["u2"], ["u1", "u2"]]


async def test_the_cache_holds_at_most_its_bound_of_messages(store: Asked) -> None:
    cache = FactsCache(max_messages=3)
    await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2", "u3", "u4"])  # too long to keep
    assert cache.messages == 0
    await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2"])
    await cache.facts(store, ACCOUNTS[1], "alice", ["u1", "u2"])  # evicts the older entry
    assert cache.messages == 2
    await cache.facts(store, ACCOUNTS[1], "alice", ["u1", "u2"])
    await cache.facts(store, ACCOUNTS[0], "alice", ["u1", "u2"])
    assert len(store.asked) == 4


class Watched(AccountKey):
    """An account whose every comparison is counted."""

    __slots__ = ()
    compared = 0

    def __eq__(self, other: object) -> bool:
        Watched.compared += 1
        return AccountKey.__eq__(self, other)

    __hash__ = AccountKey.__hash__


class WatchedSet(set[str]):
    """An entry's UIDLs whose every use by the cache is counted."""

    used = 0

    def __len__(self) -> int:
        WatchedSet.used += 1
        return super().__len__()

    def __contains__(self, uid: object) -> bool:
        WatchedSet.used += 1
        return super().__contains__(uid)

    def discard(self, uid: object) -> None:
        WatchedSet.used += 1
        super().discard(uid)


async def test_a_quit_touches_only_its_own_accounts_entries(store: Asked) -> None:
    """The work of a QUIT's record (and of a forget) does not grow with the cache: 500
    other accounts' keys and UIDL sets count every use, and none is used."""
    cache = FactsCache()
    others = [Watched("up", f"other{n}") for n in range(500)]
    for other in others:
        await cache.facts(store, other, "alice", ["u1", "u2"])
        cache._entries[(other, "alice")].asked = WatchedSet(["u1", "u2"])
    await recorded(store, cache, record(T0, {"u1": 10, "u2": 20}))
    for user in USERS:
        await cache.facts(store, ACCOUNTS[0], user, ["u1", "u2", "u3"])
    assert cache.messages == 500 * 2 + 2 * 3
    Watched.compared = WatchedSet.used = 0
    # u3 becomes known to the store: both of the account's entries now know it too.
    await recorded(store, cache, record(T0 + STEP, {"u1": 10, "u2": 20, "u3": 30}))
    assert cache.messages == 500 * 2 + 2 * 3
    cache.forget(ACCOUNTS[0])
    assert cache.messages == 500 * 2
    assert (Watched.compared, WatchedSet.used) == (0, 0)
    assert sum(len(set(e.asked)) for e in cache._entries.values()) == 500 * 2
    # The other accounts' entries are still used as before.
    asked = len(store.asked)
    await cache.facts(store, others[0], "alice", ["u1", "u2"])
    assert len(store.asked) == asked


# -- the property: the cache answers as the store does ------------------------------------


@dataclass(frozen=True, slots=True)
class Login:
    account: AccountKey
    user: str
    uids: tuple[str, ...]


# How a QUIT's record ends, as the cache sees it (retention.py's commit): committed and
# brought into the cache; committed, but the caller hears a failure (the reply lost, the
# session cancelled) and drops the account; not committed, and the account dropped; or
# committed, then the process dies before the cache hears of it (a new process starts
# with an empty cache).
ENDINGS = ("recorded", "recorded", "recorded", "uncertain", "lost", "crash")


@dataclass(frozen=True, slots=True)
class Quit:
    record: SessionRecord
    steps_back: int  # recorded this many steps before now (a late commit)
    ending: str = "recorded"


@st.composite
def quits(draw: st.DrawFn) -> Quit:
    sizes = draw(st.dictionaries(st.sampled_from(UIDS), st.sampled_from((10, 20)), max_size=5))
    listed = sorted(sizes)
    hidden = draw(st.lists(st.sampled_from(listed), unique=True)) if listed else []
    one = record(
        T0,
        sizes,
        account=draw(st.sampled_from(ACCOUNTS)),
        user=draw(st.sampled_from(USERS)),
        hidden=hidden,
    )
    return Quit(one, draw(st.sampled_from((0, 0, 0, 2))), draw(st.sampled_from(ENDINGS)))


logins = st.builds(
    Login,
    st.sampled_from(ACCOUNTS),
    st.sampled_from(USERS),
    st.lists(st.sampled_from(UIDS), unique=True).map(tuple),
)


async def agree(path: Path, ops: list[Login | Quit], bound: int) -> None:
    store = await open_store(StateConfig(url=f"sqlite:///{path}"))
    cache = FactsCache(max_messages=bound)
    try:
        for step, op in enumerate(ops):
            match op:
                case Quit(one, steps_back, ending):
                    at = T0 + (step - steps_back) * STEP
                    dated = SessionRecord(
                        one.account, one.user, "s", at, one.seen, hidden=one.hidden
                    )
                    if ending != "lost":
                        await store.record(dated)
                    if ending == "recorded":
                        cache.recorded(dated)
                    elif ending == "crash":
                        cache = FactsCache(max_messages=bound)
                    else:
                        cache.forget(dated.account)
                case Login(account, user, uids):
                    cached = await cache.facts(store, account, user, uids)
                    direct = await store.facts(account, user, uids)
                    assert rules_read(cached, uids) == rules_read(direct, uids)
            # Every entry claims, of each UIDL it covers, what a fresh read of the store
            # answers: no more (nothing the store lacks), no less, no other value.
            for (account, user), entry in cache._entries.items():
                covered = sorted(entry.asked)
                direct = await store.facts(account, user, covered)
                assert rules_read(entry.known, covered) == rules_read(direct, covered)
                assert set(entry.known) <= entry.asked
            # The count kept as entries change, and the index by account, match the entries.
            assert cache.messages == sum(len(e.asked) for e in cache._entries.values())
            assert cache.messages <= bound
            indexed = {(a, u): e for a, users in cache._accounts.items() for u, e in users.items()}
            assert indexed == dict(cache._entries)
    finally:
        await store.aclose()


_paths = itertools.count()


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(st.one_of(quits(), logins), min_size=1, max_size=16),
    bound=st.sampled_from((7, FACTS_CACHE_MESSAGES)),  # 7: entries evicted as they go
)
def test_the_cache_answers_what_the_store_answers(
    tmp_path: Path, ops: list[Login | Quit], bound: int
) -> None:
    trio.run(agree, tmp_path / f"state-{next(_paths)}.db", ops, bound)
