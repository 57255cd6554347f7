"""AccountPolicy.poll_plan: the rules read for a gateway source (docs/rules.md)."""

from __future__ import annotations

import pytest
from policy_helpers import NOW, candidate, rule

from popproxy.policy import (
    DEFAULT_RULE,
    AccountPolicy,
    Action,
    Candidate,
    Planned,
    Policy,
    PollPlan,
    Reason,
    Rule,
)


def account(*rules: Rule) -> AccountPolicy:
    return Policy(rules).for_user("carol", "provider")


def plan(policy: AccountPolicy, candidates: list[Candidate], durable: set[int]) -> PollPlan:
    return policy.poll_plan(policy.view(candidates, NOW), durable, NOW)


def test_no_rules_fetches_the_new_and_deletes_the_durable() -> None:
    got = plan(account(), [candidate(0), candidate(1), candidate(2)], durable={1})
    assert got == PollPlan(
        fetch=(0, 2),
        skip=(),
        delete_upstream=(Planned(1, "u1", DEFAULT_RULE, Reason.FETCHED),),
    )


def test_keep_fetches_and_never_deletes() -> None:
    policy = account(rule("keep", action=Action.KEEP))
    got = plan(policy, [candidate(0), candidate(1)], durable={1})
    assert got == PollPlan(fetch=(0,))


@pytest.mark.parametrize("action", [Action.DELETE, Action.DELETE_AFTER_RETRIEVE])
def test_delete_actions_are_download_and_delete(action: Action) -> None:
    policy = account(rule("dl", action=action))
    got = plan(policy, [candidate(0)], durable={0})
    assert got.delete_upstream == (Planned(0, "u0", "dl", Reason.FETCHED),)


def test_expire_deletes_only_durable_messages_past_their_days() -> None:
    policy = account(rule("week", action=Action.KEEP, expire=7))
    candidates = [
        candidate(0, days_old=8),  # old and durable: deleted
        candidate(1, days_old=6),  # young: kept
        candidate(2, days_old=30),  # old but not fetched yet: fetched, never deleted
    ]
    got = plan(policy, candidates, durable={0, 1})
    assert got.fetch == (2,)
    assert got.delete_upstream == (Planned(0, "u0", "week", Reason.EXPIRED),)


def test_max_size_and_hide_skip_and_a_skipped_message_is_never_deleted() -> None:
    policy = account(
        rule("huge", max_size=5000, continues=True),
        rule("spam", action=Action.HIDE, headers={"Subject": "spam"}),
        rule("old", action=Action.KEEP, expire=1),
    )
    candidates = [
        candidate(0, size=10_000, days_old=5, headers={"Subject": "hello"}),
        candidate(1, headers={"Subject": "spam here"}, days_old=5),
        candidate(2, headers={"Subject": "hello"}),
    ]
    got = plan(policy, candidates, durable=set())
    assert got.fetch == (2,)
    assert got.skip == (
        Planned(0, "u0", "huge", Reason.SKIPPED),
        Planned(1, "u1", "spam", Reason.SKIPPED),
    )
    assert got.delete_upstream == ()


def test_nothing_not_durable_is_ever_deleted_whatever_the_rules() -> None:
    policies = [
        account(),
        account(rule("dl", action=Action.DELETE)),
        account(rule("x", action=Action.KEEP, expire=0)),
    ]
    candidates = [candidate(i, days_old=i * 3) for i in range(6)]
    for policy in policies:
        for durable in ({0, 2}, set(), {5}):
            got = plan(policy, candidates, durable)
            assert {item.index for item in got.delete_upstream} <= durable
            assert set(got.fetch).isdisjoint(durable)


def test_now_must_be_aware() -> None:
    policy = account()
    view = policy.view([candidate(0)], NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        policy.poll_plan(view, set(), NOW.replace(tzinfo=None))
