"""The gateway's part of the ``StateStore`` contract, run against every backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from popproxy.state import StoreBackend
from popproxy.state.base import (
    AccountKey,
    AuditAction,
    AuditEntry,
    AuditQuery,
    Disposal,
    FetchState,
    PollSummary,
    SeenMessage,
    SourceKey,
    StagedMessage,
    StateError,
)
from state.state_backends import Backend

CAROL = SourceKey("carol", "provider", "carol@example.net")
OTHER = SourceKey("carol", "gmail", "carol@gmail.com")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def listing(**sizes: int) -> list[SeenMessage]:
    return [SeenMessage(uid, size) for uid, size in sizes.items()]


async def test_a_new_listing_is_listed_with_its_first_seen_time(store: StoreBackend) -> None:
    facts = await store.gateway_listing(CAROL, listing(a=10, b=20), T0)
    assert {uid: (f.size, f.first_seen, f.state) for uid, f in facts.items()} == {
        "a": (10, T0, FetchState.LISTED),
        "b": (20, T0, FetchState.LISTED),
    }
    later = await store.gateway_listing(CAROL, listing(a=10, c=5), T0 + DAY)
    assert later["a"].first_seen == T0
    assert later["c"].first_seen == T0 + DAY
    assert set(later) == {"a", "c"}


async def test_staged_then_delivered_survives_a_reopen(backend: Backend) -> None:
    store = await backend.open()
    try:
        await store.gateway_listing(CAROL, listing(a=10, b=20), T0)
        await store.gateway_stage(CAROL, [StagedMessage("a", 10, "1.Ga.popproxy")], T0)
    finally:
        await store.aclose()
    store = await backend.open()
    try:
        (staged,) = await store.gateway_staged(CAROL)
        assert (staged.uid, staged.state, staged.file_name) == (
            "a",
            FetchState.STAGED,
            "1.Ga.popproxy",
        )
        await store.gateway_settle(CAROL, ["a"], (), T0)
        assert await store.gateway_staged(CAROL) == []
        facts = await store.gateway_listing(CAROL, listing(a=10, b=20), T0 + DAY)
        assert facts["a"].state is FetchState.DELIVERED
        assert facts["a"].file_name == "1.Ga.popproxy"
        assert facts["b"].state is FetchState.LISTED
    finally:
        await store.aclose()


async def test_a_staged_message_can_go_back_to_listed(store: StoreBackend) -> None:
    await store.gateway_listing(CAROL, listing(a=10), T0)
    await store.gateway_stage(CAROL, [StagedMessage("a", 10, "n")], T0)
    await store.gateway_settle(CAROL, (), ["a"], T0)
    facts = await store.gateway_listing(CAROL, listing(a=10), T0)
    assert facts["a"].state is FetchState.LISTED


async def test_only_a_listed_message_can_be_staged(store: StoreBackend) -> None:
    await store.gateway_listing(CAROL, listing(a=10), T0)
    with pytest.raises(StateError):
        await store.gateway_stage(CAROL, [StagedMessage("a", 11, "n")], T0)  # another size
    with pytest.raises(StateError):
        await store.gateway_settle(CAROL, ["a"], (), T0)  # not staged
    assert (await store.gateway_listing(CAROL, listing(a=10), T0))["a"].state is (FetchState.LISTED)


async def test_a_reused_uidl_with_another_size_is_a_new_message(store: StoreBackend) -> None:
    await store.gateway_listing(CAROL, listing(a=10), T0)
    await store.gateway_stage(CAROL, [StagedMessage("a", 10, "n")], T0)
    await store.gateway_settle(CAROL, ["a"], (), T0)
    await store.gateway_deleted(CAROL, [Disposal("a", "default")], T0, session_id="p1")
    facts = await store.gateway_listing(CAROL, listing(a=99), T0 + DAY)
    assert (facts["a"].size, facts["a"].state, facts["a"].first_seen) == (
        99,
        FetchState.LISTED,
        T0 + DAY,
    )
    assert facts["a"].deleted_upstream_at is None


async def test_sources_are_apart(store: StoreBackend) -> None:
    await store.gateway_listing(CAROL, listing(a=10), T0)
    await store.gateway_stage(CAROL, [StagedMessage("a", 10, "n")], T0)
    await store.gateway_settle(CAROL, ["a"], (), T0)
    facts = await store.gateway_listing(OTHER, listing(a=10), T0 + DAY)
    assert facts["a"].state is FetchState.LISTED
    assert facts["a"].first_seen == T0 + DAY


async def test_poll_summaries_and_counts(store: StoreBackend) -> None:
    await store.gateway_listing(CAROL, listing(a=10, b=20), T0)
    await store.gateway_stage(CAROL, [StagedMessage("a", 10, "n")], T0)
    await store.gateway_settle(CAROL, ["a"], (), T0)
    await store.gateway_deleted(CAROL, [Disposal("a", "default")], T0, session_id="p1")
    ok = PollSummary(T0, "ok", fetched=1, skipped=1, deleted=1, fetched_bytes=10)
    await store.gateway_poll_finished(CAROL, ok)
    failed = PollSummary(T0 + DAY, "auth_failed")
    await store.gateway_poll_finished(CAROL, failed)
    (status,) = await store.gateway_sources()
    assert status.source == CAROL
    assert status.last_poll == failed
    assert status.last_success_at == T0
    assert (status.listed, status.delivered, status.deleted_upstream) == (1, 1, 1)


async def test_prune_forgets_gone_gateway_rows_but_never_a_staged_one(store: StoreBackend) -> None:
    await store.gateway_listing(CAROL, listing(a=10, b=20, c=30), T0)
    await store.gateway_stage(CAROL, [StagedMessage("c", 30, "n")], T0)
    await store.gateway_listing(CAROL, listing(b=20), T0 + 10 * DAY)  # a and c are gone
    assert await store.prune(T0 + DAY) == 1  # a; c is staged
    (status,) = await store.gateway_sources()
    assert status.listed == 2  # b, and the staged c
    (staged,) = await store.gateway_staged(CAROL)
    assert staged.uid == "c"


async def test_gateway_facts_read_without_writing(store: StoreBackend) -> None:
    assert await store.gateway_facts(CAROL, ["a"]) == {}
    await store.gateway_listing(CAROL, listing(a=10, b=20), T0)
    await store.gateway_stage(CAROL, [StagedMessage("a", 10, "n")], T0)
    facts = await store.gateway_facts(CAROL, ["a", "b", "unknown"])
    assert {uid: (f.size, f.state, f.first_seen) for uid, f in facts.items()} == {
        "a": (10, FetchState.STAGED, T0),
        "b": (20, FetchState.LISTED, T0),
    }
    assert await store.gateway_facts(OTHER, ["a"]) == {}
    assert await store.gateway_sources() != []  # CAROL only: the reads created nothing
    assert [s.source for s in await store.gateway_sources()] == [CAROL]


async def test_a_polls_deletions_are_in_the_audit_log_under_its_id(store: StoreBackend) -> None:
    await store.gateway_listing(CAROL, listing(a=10, b=20), T0)
    await store.gateway_stage(
        CAROL, [StagedMessage("a", 10, "n1"), StagedMessage("b", 20, "n2")], T0
    )
    await store.gateway_settle(CAROL, ["a", "b"], (), T0)
    await store.gateway_deleted(
        CAROL, [Disposal("a", "old-mail"), Disposal("b", "default")], T0 + DAY, session_id="p7"
    )
    account = AccountKey("provider", "carol@example.net")
    delete = AuditAction.DELETE_UPSTREAM
    assert await store.audit(AuditQuery(user="carol")) == [
        AuditEntry(T0 + DAY, "p7", "carol", account, "b", 20, "default", delete),
        AuditEntry(T0 + DAY, "p7", "carol", account, "a", 10, "old-mail", delete),
    ]
    assert [row.uid for row in await store.audit(AuditQuery(rule="old-mail"))] == ["a"]
    # The trim and the gateway's own pruning are apart: the rows go by their age only.
    assert await store.trim_audit(T0 + DAY) == 0
    assert await store.trim_audit(T0 + 2 * DAY) == 2
    assert (await store.gateway_facts(CAROL, ["a"]))["a"].deleted_upstream_at == T0 + DAY


async def test_a_deletion_of_a_uidl_the_store_does_not_know_is_not_audited(
    store: StoreBackend,
) -> None:
    await store.gateway_listing(CAROL, listing(a=10), T0)
    await store.gateway_deleted(CAROL, [Disposal("zz", "default")], T0, session_id="p1")
    assert await store.audit(AuditQuery()) == []


async def test_a_deletion_no_poll_could_report_is_refused(store: StoreBackend) -> None:
    with pytest.raises(ValueError):
        await store.gateway_deleted(CAROL, [Disposal("a", "")], T0, session_id="p1")
    with pytest.raises(ValueError):
        await store.gateway_deleted(CAROL, [Disposal("a", "r")], T0, session_id="")
