"""RetainedMaildrop: the policy's view, renumbering, retrievals, and the QUIT that carries
out the plan then records it (DESIGN.md "Session data flow", steps 4 and 6).

The inner maildrop is a real Maildir and the store is the real sqlite store (in a
temporary file), so deletions and records are what they would be in production;
the upstream case is covered against Dovecot in tests/integration/test_retention.py.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from clocks import MovableClock
from maildirs import make_maildir
from prometheus_client import CollectorRegistry

from popproxy.config import StateConfig
from popproxy.maildrop.base import Committed, MaildropError
from popproxy.maildrop.maildir import open_maildir
from popproxy.maildrop.retention import (
    RetainedMaildrop,
    RetentionContext,
    decide_view,
    open_retained,
)
from popproxy.metrics import Metrics, PolicyAction
from popproxy.policy import DEFAULT_RULE, Action, Candidate, HeaderMatch, Match, Policy, Rule
from popproxy.policy.patterns import HeaderPattern, header_pattern
from popproxy.pop3.replies import ResponseCode
from popproxy.state import open_store
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
from popproxy.state.facts_cache import FactsCache

ACCOUNT = AccountKey("provider", "shared@example.net")
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MESSAGES = (
    b"Subject: one\r\n\r\nfirst\r\n",
    b"Subject: two\r\nList-Id: <news.example.net>\r\n\r\nsecond\r\n",
    b"Subject: three\r\n\r\nthird, a longer body than the others\r\n",
)


def rule(
    name: str,
    *,
    action: Action,
    expire: int | None = None,
    headers: dict[str, str] | None = None,
    older: int | None = None,
) -> Rule:
    match = Match(
        older_than_days=older,
        headers=tuple(
            HeaderMatch(field.lower(), header_pattern(pattern))
            for field, pattern in (headers or {}).items()
        ),
    )
    return Rule(name=name, match=match, action=action, expire_after_days=expire)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    names = (f"{1_700_000_000 + n}.M{n}P1.test" for n in range(1, len(MESSAGES) + 1))
    return make_maildir(tmp_path / "Maildir", dict(zip(names, MESSAGES, strict=True)))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await open_store(StateConfig("sqlite:///" + str(tmp_path / "state.db")))
    yield opened
    await opened.aclose()


class Opener:
    """Opens sessions of one local user on the Maildir, as the router does upstream."""

    def __init__(
        self,
        maildir: Path,
        store: StateStore,
        policy: Policy,
        facts_cache: FactsCache | None = None,
    ) -> None:
        self.facts_cache = facts_cache
        self.maildir = maildir
        self.store = store
        self.policy = policy
        self.clock = MovableClock(NOW)
        self.metrics = Metrics(CollectorRegistry())
        self.metrics.declare(listeners=(), upstreams=(), rules=(*policy.rule_names, DEFAULT_RULE))
        self.released = 0
        self.sessions = 0
        self.confirm: Callable[[], Awaitable[None]] | None = None

    async def _release(self) -> None:
        await trio.lowlevel.checkpoint()
        self.released += 1

    async def open(self, user: str = "phone") -> RetainedMaildrop:
        self.sessions += 1
        context = RetentionContext(
            account=ACCOUNT,
            user=user,
            session_id=f"s{self.sessions}",
            policy=self.policy.for_user(user, ACCOUNT.upstream),
            store=self.store,
            clock=self.clock,
            metrics=self.metrics,
            facts_cache=self.facts_cache,
        )
        inner = await open_maildir(self.maildir)
        return await open_retained(inner, context, on_close=self._release, confirm=self.confirm)

    def action_count(self, rule_name: str, action: PolicyAction) -> float:
        value = self.metrics.registry.get_sample_value(
            "popproxy_policy_actions_total", {"rule": rule_name, "action": action.value}
        )
        return value or 0.0


def subjects(maildrop: RetainedMaildrop) -> list[str]:
    return [m.uid for m in maildrop.messages]


async def body(maildrop: RetainedMaildrop, index: int, lines: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in maildrop.retrieve(index, body_lines=lines)])


def keep_policy() -> Policy:
    return Policy(rules=(rule("keep-all", action=Action.KEEP),))


def files(maildir: Path) -> int:
    return sum(1 for sub in ("new", "cur") for _ in (maildir / sub).iterdir())


async def test_no_rules_a_dele_deletes_and_the_quit_is_recorded(
    maildir: Path, store: StateStore
) -> None:
    opener = Opener(maildir, store, Policy.empty())
    first = await opener.open()
    uids = subjects(first)
    assert len(uids) == len(MESSAGES)
    assert await body(first, 0) == MESSAGES[0]
    assert await first.commit({1}) == Committed(deleted_upstream=1)
    await first.aclose()
    assert files(maildir) == len(MESSAGES) - 1
    rows = {row.uid: row for row in await store.messages(ACCOUNT)}
    assert set(rows) == set(uids)
    assert rows[uids[1]].deleted_upstream_at == NOW
    assert rows[uids[1]].deleted_by_rule == DEFAULT_RULE
    assert [user for user, _at in rows[uids[0]].retrieved_by] == ["phone"]
    assert opener.action_count(DEFAULT_RULE, PolicyAction.DELETED) == 1
    assert opener.released == 1


async def test_keep_a_dele_hides_for_this_user_only_and_for_good(
    maildir: Path, store: StateStore
) -> None:
    opener = Opener(maildir, store, keep_policy())
    first = await opener.open("phone")
    uids = subjects(first)
    assert await first.commit({0, 2}) == Committed(hidden=2)  # nothing deleted: 2 hidden
    await first.aclose()
    assert files(maildir) == len(MESSAGES)  # nothing deleted
    again = await opener.open("phone")
    assert subjects(again) == [uids[1]]
    assert await body(again, 0) == MESSAGES[1]  # renumbered: client 1 is upstream 2
    await again.aclose()
    desk = await opener.open("desk")
    assert subjects(desk) == uids  # another local user of the account sees everything
    await desk.aclose()
    assert opener.action_count("keep-all", PolicyAction.HIDDEN) == 2
    # The rule kept the two messages the client marked (issue 16, item 7).
    assert opener.action_count("keep-all", PolicyAction.KEPT) == 2
    assert opener.action_count("keep-all", PolicyAction.DELETED) == 0


class Reads:
    """The real store; the logins' reads of it are counted."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.reads = 0

    async def facts(
        self, account: AccountKey, user: str, uids: Collection[str]
    ) -> Mapping[str, MessageFacts]:
        self.reads += 1
        return await self.inner.facts(account, user, uids)


async def test_with_the_facts_cache_a_hide_holds_and_a_returning_login_reads_nothing(
    maildir: Path, store: StateStore
) -> None:
    cache = FactsCache()
    opener = Opener(maildir, store, keep_policy(), cache)
    reads = Reads(store)
    first = await opener.open("phone")
    uids = subjects(first)
    await first.commit(set())  # the store knows the listing from now on
    await first.aclose()
    reads = Reads(store)
    assert await cache.facts(reads, ACCOUNT, "phone", uids) is not None
    assert reads.reads == 0  # the first QUIT's record filled in what it made the store know
    second = await opener.open("phone")
    assert await second.commit({0, 2}) == Committed(hidden=2)
    await second.aclose()
    cached = await cache.facts(reads, ACCOUNT, "phone", uids)
    assert [uid for uid in uids if cached[uid].hidden] == [uids[0], uids[2]]
    assert reads.reads == 0  # the QUIT's record updated the entry the login made
    again = await opener.open("phone")
    assert subjects(again) == [uids[1]]
    await again.aclose()
    desk = await opener.open("desk")
    assert subjects(desk) == uids
    await desk.aclose()


async def test_with_the_facts_cache_a_failed_record_drops_the_account(
    maildir: Path, store: StateStore
) -> None:
    cache = FactsCache()
    session = await Opener(maildir, store, keep_policy(), cache).open("phone")
    await session.commit(set())
    await session.aclose()
    failing = await Opener(maildir, FullDisk(store), keep_policy(), cache).open("phone")
    with pytest.raises(MaildropError):
        await failing.commit({0})
    await failing.aclose()
    reads = Reads(store)
    uids = [m.uid for m in session.messages]
    await cache.facts(reads, ACCOUNT, "phone", uids)
    assert reads.reads == 1  # read again: the entry went with the failed record
    await cache.facts(reads, ACCOUNT, "phone", uids)
    assert reads.reads == 1


async def test_no_quit_no_record_and_no_deletion(maildir: Path, store: StateStore) -> None:
    opener = Opener(maildir, store, Policy.empty())
    session = await opener.open()
    await body(session, 0)
    await session.aclose()  # the session ended without QUIT: commit is never called
    assert files(maildir) == len(MESSAGES)
    assert await store.messages() == []
    assert opener.released == 1


async def test_delete_after_retrieve_counts_complete_retrs_only(
    maildir: Path, store: StateStore
) -> None:
    drain = rule("drain", action=Action.DELETE_AFTER_RETRIEVE)
    opener = Opener(maildir, store, Policy(rules=(drain,)))
    session = await opener.open()
    uids = subjects(session)
    assert session.expire == "0"
    await body(session, 0)  # complete
    await body(session, 1, lines=0)  # TOP: not a retrieval
    chunks = session.retrieve(2)
    async with contextlib.aclosing(chunks):
        await anext(chunks)  # stopped half way (the client went away mid-RETR)
    # Nothing marked, one message deleted upstream: the one retrieved to its end.
    assert await session.commit(set()) == Committed(deleted_upstream=1, retrieved=1)
    await session.aclose()
    rows = {row.uid: row for row in await store.messages(ACCOUNT)}
    assert [uid for uid, row in rows.items() if row.deleted_upstream_at] == [uids[0]]
    assert files(maildir) == len(MESSAGES) - 1


async def test_expiry_deletes_old_messages_at_any_quit_even_hidden_ones(
    maildir: Path, store: StateStore
) -> None:
    policy = Policy(rules=(rule("keep-30", action=Action.KEEP, expire=30),))
    opener = Opener(maildir, store, policy)
    first = await opener.open()
    assert first.expire == "30"
    await first.commit({0})  # hidden for phone; first seen NOW for all three
    await first.aclose()
    opener.clock.now = NOW + timedelta(days=31)
    desk = await opener.open("desk")
    overdue = opener.metrics.registry.get_sample_value(
        "popproxy_policy_overdue_messages_total", {"rule": "keep-30"}
    )
    assert overdue == len(MESSAGES)
    # desk asked for nothing: the rule deletes all three
    assert await desk.commit(set()) == Committed(deleted_upstream=3, expired=3)
    await desk.aclose()
    assert files(maildir) == 0
    assert opener.action_count("keep-30", PolicyAction.EXPIRED) == len(MESSAGES)


async def test_headers_are_read_only_when_a_rule_needs_them(
    maildir: Path, store: StateStore
) -> None:
    lists = rule("no-lists", action=Action.HIDE, headers={"List-Id": "."})
    opener = Opener(maildir, store, Policy(rules=(lists,)))
    session = await opener.open()
    assert len(session.messages) == len(MESSAGES) - 1
    assert session.view.decisions[1].hidden is not None
    await session.aclose()


# Other content under message 1's unique name, of another size (a UIDL reused).
REUSED = b"Subject: other content\r\n\r\nlonger than the first one was\r\n"


def reuse_first_uidl(maildir: Path) -> None:
    """Message 1's file now holds other content under the same unique name (UIDL)."""
    target = next(p for p in maildir.glob("*/*") if p.name.startswith("1700000001."))
    assert len(REUSED) != len(MESSAGES[0])
    target.write_bytes(REUSED)


def contents(maildir: Path) -> list[bytes]:
    return sorted(p.read_bytes() for sub in ("new", "cur") for p in (maildir / sub).iterdir())


async def test_a_uidl_reused_for_other_content_is_a_new_message(
    maildir: Path, store: StateStore
) -> None:
    opener = Opener(maildir, store, keep_policy())
    first = await opener.open()
    await first.commit({0})
    await first.aclose()
    reuse_first_uidl(maildir)
    again = await opener.open()
    assert len(again.messages) == len(MESSAGES)  # not hidden: it is not the message hidden
    await again.aclose()


async def test_a_reused_uidl_is_first_seen_anew_so_expiry_spares_the_new_content(
    maildir: Path, store: StateStore
) -> None:
    """Invariant 3 and the age rules: the new content under a reused UIDL is first seen
    when it is first listed, not when the old content was, so an expiry rule does not
    delete it at the first QUIT after it arrived."""
    opener = Opener(maildir, store, Policy(rules=(rule("keep-30", action=Action.KEEP, expire=30),)))
    first = await opener.open()
    uids = subjects(first)
    await first.commit(set())  # all three recorded, first seen NOW
    await first.aclose()
    reuse_first_uidl(maildir)
    later = NOW + timedelta(days=31)
    opener.clock.now = later
    again = await opener.open()
    assert subjects(again) == uids
    assert again.view.decisions[0].expires_at == later + timedelta(days=30)
    await again.commit(set())  # messages 2 and 3 have expired; the new content has not
    await again.aclose()
    assert contents(maildir) == [REUSED]
    rows = {row.uid: row for row in await store.messages(ACCOUNT)}
    assert (rows[uids[0]].size, rows[uids[0]].first_seen) == (len(REUSED), later)
    assert rows[uids[0]].deleted_upstream_at is None
    assert opener.action_count("keep-30", PolicyAction.EXPIRED) == 2


async def test_a_reused_uidl_is_not_older_than_the_old_content(
    maildir: Path, store: StateStore
) -> None:
    """An ``older_than_days`` rule sees the new content under a reused UIDL as new."""
    policy = Policy(rules=(rule("hide-old", action=Action.HIDE, older=30),))
    opener = Opener(maildir, store, policy)
    first = await opener.open()
    uids = subjects(first)
    await first.commit(set())
    await first.aclose()
    reuse_first_uidl(maildir)
    opener.clock.now = NOW + timedelta(days=31)
    again = await opener.open()
    assert subjects(again) == [uids[0]]  # the old two are hidden; the new content is not
    assert await body(again, 0) == REUSED
    await again.aclose()


async def test_age_bounds_are_strict_over_the_store_and_the_clock(
    maildir: Path, store: StateStore
) -> None:
    """Exactly 30 days after it was first seen a message is neither older than 30 days
    nor expired after 30; a second later it is both (docs/rules.md: bounds are strict)."""
    policy = Policy(
        rules=(
            rule("hide-old", action=Action.HIDE, older=30, expire=30),
            rule("keep-30", action=Action.KEEP, expire=30),
        )
    )
    opener = Opener(maildir, store, policy)
    first = await opener.open()
    uids = subjects(first)
    await first.commit(set())
    await first.aclose()
    opener.clock.now = NOW + timedelta(days=30)
    exactly = await opener.open()
    assert subjects(exactly) == uids  # not older than 30 days: nothing hidden
    assert {d.rule for d in exactly.view.decisions} == {"keep-30"}
    await exactly.commit(set())  # not expired: nothing deleted
    await exactly.aclose()
    assert files(maildir) == len(MESSAGES)
    opener.clock.now = NOW + timedelta(days=30, seconds=1)
    after = await opener.open()
    assert subjects(after) == []  # older than 30 days: hidden
    await after.commit(set())  # and expired: deleted at this QUIT
    await after.aclose()
    assert files(maildir) == 0
    assert opener.action_count("hide-old", PolicyAction.EXPIRED) == len(MESSAGES)


class FullDisk:
    """The real store, except that writing fails as a full disk would make it fail."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner

    async def facts(
        self, account: AccountKey, user: str, uids: Collection[str]
    ) -> Mapping[str, MessageFacts]:
        return await self.inner.facts(account, user, uids)

    async def record(self, record: SessionRecord) -> None:
        raise StateError("database or disk is full")

    async def messages(self, account: AccountKey | None = None) -> Sequence[StoredMessage]:
        return await self.inner.messages(account)

    async def prune(self, gone_before: datetime) -> int:
        return await self.inner.prune(gone_before)

    async def known_source(self, user: str, source: str, since: datetime) -> datetime | None:
        return await self.inner.known_source(user, source, since)

    async def remember_source(
        self, user: str, source: str, at: datetime, *, keep: int, forget_before: datetime
    ) -> None:
        raise StateError("database or disk is full")

    async def audit(self, query: AuditQuery) -> Sequence[AuditEntry]:
        return await self.inner.audit(query)

    async def trim_audit(self, before: datetime, *, dry_run: bool = False) -> int:
        return await self.inner.trim_audit(before, dry_run=dry_run)

    async def aclose(self) -> None:
        await self.inner.aclose()


class CommittedThenLost(FullDisk):
    """The real store, whose record commits, and then the caller hears of a failure
    (``fail``: the reply lost) or waits until it is cancelled (the session ended)."""

    def __init__(self, inner: StateStore, *, fail: bool) -> None:
        super().__init__(inner)
        self.fail = fail
        self.committed = trio.Event()

    async def record(self, record: SessionRecord) -> None:
        await self.inner.record(record)
        self.committed.set()
        if self.fail:
            raise StateError("disk I/O error")
        await trio.sleep_forever()


@pytest.mark.parametrize("fail", [True, False], ids=["failed", "cancelled"])
async def test_with_the_facts_cache_a_record_committed_but_not_confirmed_is_read_again(
    maildir: Path, store: StateStore, fail: bool
) -> None:
    """The store committed the QUIT's hides but the commit did not return: the cache
    claims nothing of them, and the next login reads what the store holds."""
    cache = FactsCache()
    session = await Opener(maildir, store, keep_policy(), cache).open("phone")
    uids = subjects(session)
    await session.commit(set())
    await session.aclose()
    lossy = CommittedThenLost(store, fail=fail)
    lost = await Opener(maildir, lossy, keep_policy(), cache).open("phone")
    failures: list[MaildropError] = []

    async def quit_() -> None:
        try:
            await lost.commit({0})
        except MaildropError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(quit_)
        await lossy.committed.wait()
        nursery.cancel_scope.cancel()  # the session ends while the commit is unconfirmed
    assert len(failures) == fail
    await lost.aclose()
    reads = Reads(store)
    cached = await cache.facts(reads, ACCOUNT, "phone", uids)
    assert reads.reads == 1
    direct = await store.facts(ACCOUNT, "phone", uids)
    assert {uid: cached[uid].hidden for uid in uids} == {uid: direct[uid].hidden for uid in uids}
    assert cached[uids[0]].hidden


async def test_a_store_failure_at_quit_is_a_temporary_error_after_the_deletions(
    maildir: Path, store: StateStore
) -> None:
    opener = Opener(maildir, FullDisk(store), Policy.empty())
    session = await opener.open()
    with pytest.raises(MaildropError) as failed:
        await session.commit({0})
    assert failed.value.code is ResponseCode.SYS_TEMP
    assert failed.value.committed == Committed(deleted_upstream=1)
    await session.aclose()
    # The deletion was done (the upstream confirmed it) and is gone from the next listing.
    assert files(maildir) == len(MESSAGES) - 1
    assert opener.action_count(DEFAULT_RULE, PolicyAction.DELETED) == 1


async def test_a_lock_lost_before_quit_deletes_and_records_nothing(
    maildir: Path, store: StateStore
) -> None:
    """The mailbox lock (a lease shared across instances) is not confirmed at QUIT:
    the QUIT fails with [SYS/TEMP] before anything is deleted or recorded (invariant 2)."""
    opener = Opener(maildir, store, Policy.empty())
    confirmed = 0

    async def lost() -> None:
        nonlocal confirmed
        confirmed += 1
        raise MaildropError(ResponseCode.SYS_TEMP, "The mailbox lock was lost.")

    opener.confirm = lost
    session = await opener.open()
    assert await body(session, 0) == MESSAGES[0]
    with pytest.raises(MaildropError) as failed:
        await session.commit({0, 1})
    assert failed.value.code is ResponseCode.SYS_TEMP
    await session.aclose()
    assert confirmed == 1
    assert files(maildir) == len(MESSAGES)
    assert await store.messages(ACCOUNT) == []
    assert opener.action_count(DEFAULT_RULE, PolicyAction.DELETED) == 0


class _MatchInWorker:
    """A compiled pattern that says where it runs: its search tells the event loop it
    has started (only a worker thread of trio can), then waits until the loop, still
    free, lets it finish."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.finish = threading.Event()

    def search(self, text: bytes) -> None:
        trio.from_thread.run_sync(self.started.set)
        assert self.finish.wait(timeout=60), "the event loop never let the match finish"


async def test_header_rules_match_in_a_worker_thread_while_the_loop_serves_others(
    maildir: Path, store: StateStore
) -> None:
    """RE2 can take about a second on a 100 KiB header for the heaviest admitted pattern
    (policy/patterns.py); the match must not stop every other session meanwhile."""
    regex = _MatchInWorker()
    match = Match(headers=(HeaderMatch("subject", HeaderPattern("slow", regex)),))
    opener = Opener(maildir, store, Policy(rules=(Rule("slow", match, Action.HIDE),)))
    opened: list[RetainedMaildrop] = []

    async def login() -> None:
        opened.append(await opener.open())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(login)
        with trio.fail_after(60):
            await regex.started.wait()
        assert not opened  # the login is matching headers, and this task runs meanwhile
        regex.finish.set()
    assert len(opened[0].messages) == len(MESSAGES)  # the pattern matched nothing
    await opened[0].aclose()


async def test_without_header_rules_the_view_is_decided_on_the_event_loop(
    maildir: Path, store: StateStore
) -> None:
    policy = keep_policy().for_user("phone", ACCOUNT.upstream)
    candidates = [Candidate(0, "u1", 10, NOW)]
    # No checkpoint: nothing was handed to a thread (a hand-off costs more than deciding).
    with trio.CancelScope() as scope:
        scope.cancel()
        view = await decide_view(policy, candidates, NOW)
    assert view.visible == (0,)
