"""Sequences of records and prunes against a plain in-memory model of the contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import hypothesis.strategies as st
import trio
from hypothesis import HealthCheck, given, settings

from popproxy.state.base import AccountKey, Disposal, SeenMessage, SessionRecord
from state.state_backends import Backend

ACCOUNTS = (AccountKey("up", "box1"), AccountKey("up", "box2"))
USERS = ("alice", "bob")
UIDS = ("u1", "u2", "u3", "u4")
RULES = ("r1", "r2")
T0 = datetime(2024, 5, 1, tzinfo=UTC)
STEP = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Prune:
    steps_back: int  # forget what was last listed before (now - steps_back * STEP)


@dataclass
class Modelled:
    size: int
    first_seen: datetime
    last_seen: datetime
    retrieved: dict[str, datetime] = field(default_factory=dict)
    hidden: dict[str, tuple[str, datetime]] = field(default_factory=dict)
    deleted: tuple[datetime, str] | None = None


Model = dict[tuple[AccountKey, str], Modelled]
Listed = dict[AccountKey, datetime]


@st.composite
def records(draw: st.DrawFn) -> SessionRecord:
    """A record at time T0 (set later): a listing and dispositions of listed UIDLs."""
    sizes = draw(st.dictionaries(st.sampled_from(UIDS), st.sampled_from((10, 20)), max_size=4))
    listed = sorted(sizes)
    some = st.lists(st.sampled_from(listed), unique=True) if listed else st.just([])
    return SessionRecord(
        account=draw(st.sampled_from(ACCOUNTS)),
        user=draw(st.sampled_from(USERS)),
        session_id="s",
        at=T0,
        seen=tuple(SeenMessage(uid, size) for uid, size in sizes.items()),
        retrieved=frozenset(draw(some)),
        hidden=tuple(Disposal(uid, draw(st.sampled_from(RULES))) for uid in draw(some)),
        deleted_upstream=tuple(Disposal(uid, draw(st.sampled_from(RULES))) for uid in draw(some)),
    )


operations = st.lists(
    st.one_of(records(), st.builds(Prune, st.integers(0, 4))), min_size=1, max_size=12
)


def apply(model: Model, record: SessionRecord) -> None:
    """The contract, for records in time order: a new size is new content."""
    for message in record.seen:
        key = (record.account, message.uid)
        known = model.get(key)
        if known is None or known.size != message.size:
            model[key] = Modelled(message.size, record.at, record.at)
        else:
            known.last_seen = record.at
    for uid in record.retrieved:
        model[(record.account, uid)].retrieved.setdefault(record.user, record.at)
    for disposal in record.hidden:
        hides = model[(record.account, disposal.uid)].hidden
        hides.setdefault(record.user, (disposal.rule, record.at))
    for disposal in record.deleted_upstream:
        model[(record.account, disposal.uid)].deleted = (record.at, disposal.rule)


async def check(backend: Backend, ops: list[SessionRecord | Prune]) -> None:
    model: Model = {}
    listed: Listed = {}  # each account's latest listing
    store = await backend.open()
    try:
        for step, op in enumerate(ops):
            now = T0 + step * STEP
            match op:
                case SessionRecord():
                    record = SessionRecord(
                        op.account, op.user, f"s{step}", now, op.seen, op.retrieved,
                        op.hidden, op.deleted_upstream,
                    )  # fmt: skip
                    await store.record(record)
                    apply(model, record)
                    listed[record.account] = now
                case Prune(steps_back):
                    cutoff = now - steps_back * STEP
                    gone = [
                        (account, uid)
                        for (account, uid), m in model.items()
                        if m.last_seen < cutoff and m.last_seen < listed[account]
                    ]
                    before = await store.messages()
                    assert sum(row.is_gone(cutoff) for row in before) == len(gone)
                    assert await store.prune(cutoff) == len(gone)
                    for key in gone:
                        del model[key]
        stored = {(row.account, row.uid): row for row in await store.messages()}
        assert set(stored) == set(model)
        for key, expected in model.items():
            row = stored[key]
            assert (row.size, row.first_seen, row.last_seen) == (
                expected.size,
                expected.first_seen,
                expected.last_seen,
            )
            assert dict(row.retrieved_by) == expected.retrieved
            assert {user: (rule, at) for user, rule, at in row.hidden_for} == expected.hidden
            assert row.account_last_listed == listed[row.account]
            deleted = (row.deleted_upstream_at, row.deleted_by_rule)
            assert deleted == (expected.deleted or (None, None))
        for account in ACCOUNTS:
            for user in USERS:
                facts = await store.facts(account, user, UIDS)
                assert set(facts) == {uid for acc, uid in model if acc == account}
                for uid, fact in facts.items():
                    expected = model[(account, uid)]
                    assert fact.retrieved_at == expected.retrieved.get(user)
                    assert fact.hidden == (user in expected.hidden)
    finally:
        await store.aclose()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=operations)
def test_the_store_follows_the_model(
    fresh_backend: Callable[[], Backend], ops: list[SessionRecord | Prune]
) -> None:
    trio.run(check, fresh_backend(), ops)
