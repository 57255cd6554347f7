"""Known-good sources (popproxy/known_sources.py): the addresses each user lately logged
in from, spared that user name's lockout (issue 18 item 1, DESIGN.md invariant 8).

Over a real sqlite store (in memory) counted by a thin wrapper: the store is read only
when a name is locked out and written only for a new source (or a stale one), never
on every login. With log_in: a known source gets past the name's lockout with the
address penalty still applied, and never past the address lockout.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from clocks import MovableClock

from popproxy.auth.authenticator import Authenticator
from popproxy.auth.credentials import Credentials
from popproxy.auth.login import LoginClient, LoginOutcome, log_in
from popproxy.auth.passwords import hash_password
from popproxy.auth.throttle import ThrottleTable
from popproxy.auth.throttling import LocalThrottle
from popproxy.config import LimitsConfig, UserConfig
from popproxy.known_sources import REFRESH, KnownSourcePolicy, KnownSources
from popproxy.peer import PeerAddress
from popproxy.secret import Secret
from popproxy.state.base import (
    AccountKey,
    AuditEntry,
    AuditQuery,
    MessageFacts,
    SessionRecord,
    StateError,
    StateStore,
    StoredMessage,
)
from popproxy.state.sqlite import open_sqlite

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
POLICY = KnownSourcePolicy(days=30, per_user=3)
LIMITS = LimitsConfig(
    auth_lockout_failures=3,
    auth_lockout_address_failures=6,
    auth_known_source_days=30,
    auth_known_sources_per_user=3,
)
DEMO = UserConfig("demo", hash_password(Secret.from_str("secret"), ln=4), maildir=Path("/m"))
HOME = PeerAddress("192.0.2.1", 40000)
ATTACKER = PeerAddress("198.51.100.9", 40000)
ELSEWHERE = PeerAddress("203.0.113.5", 40000)


class Counted:
    """The real store, with its known-source calls counted (or failing, as an outage)."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.reads = 0
        self.writes = 0
        self.down = False

    async def get(self) -> StateStore:
        if self.down:
            raise StateError("state store unreachable")
        return self

    async def facts(
        self, account: AccountKey, user: str, uids: Collection[str]
    ) -> Mapping[str, MessageFacts]:
        return await self.inner.facts(account, user, uids)

    async def record(self, record: SessionRecord) -> None:
        await self.inner.record(record)

    async def messages(self, account: AccountKey | None = None) -> Sequence[StoredMessage]:
        return await self.inner.messages(account)

    async def prune(self, gone_before: datetime) -> int:
        return await self.inner.prune(gone_before)

    async def known_source(self, user: str, source: str, since: datetime) -> datetime | None:
        self.reads += 1
        return await self.inner.known_source(user, source, since)

    async def remember_source(
        self, user: str, source: str, at: datetime, *, keep: int, forget_before: datetime
    ) -> None:
        self.writes += 1
        await self.inner.remember_source(user, source, at, keep=keep, forget_before=forget_before)

    async def audit(self, query: AuditQuery) -> Sequence[AuditEntry]:
        return await self.inner.audit(query)

    async def trim_audit(self, before: datetime, *, dry_run: bool = False) -> int:
        return await self.inner.trim_audit(before, dry_run=dry_run)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def store() -> AsyncIterator[Counted]:
    inner = await open_sqlite(None, busy_timeout_seconds=5)
    counted = Counted(inner)
    yield counted
    await inner.aclose()


async def test_a_source_is_known_after_a_login_and_for_the_window_only(store: Counted) -> None:
    clock = MovableClock(T0)
    known = KnownSources(store, POLICY, clock)
    assert not await known.knows("demo", "192.0.2.1", session="s1")
    await known.logged_in("demo", "192.0.2.1", session="s1")
    assert await known.knows("demo", "192.0.2.1", session="s1")
    assert not await known.knows("demo", "192.0.2.2", session="s1")
    assert not await known.knows("other", "192.0.2.1", session="s1")
    clock.now = T0 + timedelta(days=30, seconds=1)
    assert not await known.knows("demo", "192.0.2.1", session="s1")
    # A new process (after a restart) knows it from the store alone.
    clock.now = T0 + timedelta(days=29)
    assert await KnownSources(store, POLICY, clock).knows("demo", "192.0.2.1", session="s2")


async def test_the_store_is_written_once_per_new_source_not_per_login(store: Counted) -> None:
    clock = MovableClock(T0)
    known = KnownSources(store, POLICY, clock)
    for _ in range(5):
        await known.logged_in("demo", "192.0.2.1", session="s")
    assert (store.reads, store.writes) == (1, 1)  # asked once whether it was fresh
    # Known from this process's memory: no read when the name is locked either.
    assert await known.knows("demo", "192.0.2.1", session="s")
    assert store.reads == 1
    # After a restart: a read, and no write (the store has it from today).
    restarted = KnownSources(store, POLICY, clock)
    await restarted.logged_in("demo", "192.0.2.1", session="s")
    await restarted.logged_in("demo", "192.0.2.1", session="s")
    assert (store.reads, store.writes) == (2, 1)
    # A day later a login writes again, so a source in daily use never ages out.
    clock.now = T0 + REFRESH + timedelta(seconds=1)
    await known.logged_in("demo", "192.0.2.1", session="s")
    assert store.writes == 2
    # Known 30 days after that login, where the first one alone would have aged out.
    clock.now = T0 + timedelta(days=30, hours=1)
    assert await known.knows("demo", "192.0.2.1", session="s")


async def test_only_the_most_recent_sources_of_a_user_are_kept(store: Counted) -> None:
    clock = MovableClock(T0)
    known = KnownSources(store, POLICY, clock)
    for n in range(5):
        clock.now = T0 + timedelta(hours=n)
        await known.logged_in("demo", f"192.0.2.{n}", session="s")
    fresh = KnownSources(store, POLICY, clock)  # the store's answer, not this memory's
    found = [await fresh.knows("demo", f"192.0.2.{n}", session="s") for n in range(5)]
    assert found == [False, False, True, True, True]


async def test_a_process_remembers_a_bounded_number_of_pairs(store: Counted) -> None:
    known = KnownSources(store, POLICY, MovableClock(T0), max_pairs=2)
    for n in range(3):
        await known.logged_in(f"user{n}", "192.0.2.1", session="s")
    reads = store.reads
    assert await known.knows("user0", "192.0.2.1", session="s")  # forgotten here: read
    assert store.reads == reads + 1


async def test_off_and_unusable_stores_know_nothing(
    store: Counted, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="popproxy")
    off = KnownSources(store, KnownSourcePolicy(days=0, per_user=3), MovableClock(T0))
    await off.logged_in("demo", "192.0.2.1", session="s")
    assert not await off.knows("demo", "192.0.2.1", session="s")
    assert (store.reads, store.writes) == (0, 0)
    known = KnownSources(store, POLICY, MovableClock(T0))
    assert not await known.knows("", "192.0.2.1", session="s")  # a name outside the safe set
    store.down = True
    await known.logged_in("demo", "192.0.2.1", session="s9")  # the login goes on
    assert not await known.knows("demo", "192.0.2.1", session="s9")  # a lockout stays
    lines = [(r.getMessage(), r.__dict__["fields"]["session"]) for r in caplog.records]
    assert lines == [("known_source_unrecorded", "s9"), ("known_source_unavailable", "s9")]


async def test_a_reload_applies_new_limits(store: Counted) -> None:
    known = KnownSources(store, POLICY, MovableClock(T0))
    known.adopt(LimitsConfig(auth_known_source_days=0))
    await known.logged_in("demo", "192.0.2.1", session="s")
    assert store.writes == 0


# -- with the login orchestration ------------------------------------------------------


class Logins:
    def __init__(self, known: KnownSources) -> None:
        self.authenticator = Authenticator({"demo": DEMO}, LIMITS)
        self.throttle = ThrottleTable()
        self.known = known

    async def login(self, peer: PeerAddress, password: str) -> tuple[LoginOutcome, float]:
        start = trio.current_time()
        attempt = await log_in(
            self.authenticator,
            LocalThrottle(self.throttle),
            LoginClient("ab12cd34", peer),
            Credentials("demo", Secret.from_str(password)),
            before_wait=trio.lowlevel.checkpoint,
            known=self.known,
        )
        return attempt.outcome, trio.current_time() - start


async def test_a_locked_name_spares_its_known_source_only(
    store: Counted, autojump_clock: trio.testing.MockClock
) -> None:
    logins = Logins(KnownSources(store, POLICY, MovableClock(T0)))
    assert (await logins.login(HOME, "secret"))[0] is LoginOutcome.OK
    for n in range(LIMITS.auth_lockout_failures):
        assert (await logins.login(ATTACKER, f"guess{n}"))[0] is LoginOutcome.FAILED
    assert (await logins.login(ELSEWHERE, "secret"))[0] is LoginOutcome.LOCKED_OUT
    assert (await logins.login(ATTACKER, "secret"))[0] is LoginOutcome.LOCKED_OUT
    outcome, took = await logins.login(HOME, "secret")
    assert (outcome, took) == (LoginOutcome.OK, 0)  # at once: the penalty is the attacker's
    # Nothing was written for the attacker's or the new address: only HOME is known.
    assert store.writes == 1


async def test_a_known_source_keeps_its_penalty_and_its_address_lockout(
    store: Counted, autojump_clock: trio.testing.MockClock
) -> None:
    logins = Logins(KnownSources(store, POLICY, MovableClock(T0)))
    assert (await logins.login(HOME, "secret"))[0] is LoginOutcome.OK
    waits = []
    for n in range(LIMITS.auth_lockout_address_failures):
        outcome, took = await logins.login(HOME, f"guess{n}")
        assert outcome is LoginOutcome.FAILED
        waits.append(took)
    # The penalty doubled per failure (2, 4, 8, 15 s ...), past the name's lockout too.
    assert waits == [0, 2, 4, 8, 15, 15]
    assert (await logins.login(ELSEWHERE, "secret"))[0] is LoginOutcome.LOCKED_OUT
    outcome, took = await logins.login(HOME, "secret")
    assert outcome is LoginOutcome.THROTTLED  # the address's own lockout
    assert took == 15
