"""Properties of view and plan over random rules and maildrops (hypothesis).

Invariant 1 (DESIGN.md): nothing is deleted upstream unless the client deleted it
under a deleting rule, retrieved it under delete_after_retrieve, or it expired.
Invariant 3: what is hidden for a user is never in the view.
"""

from __future__ import annotations

from datetime import timedelta
from random import Random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_helpers import NOW, candidate, rule

from popproxy.policy import (
    Action,
    Candidate,
    Hidden,
    OnDele,
    Policy,
    Reason,
    RetentionPlan,
    Rule,
    View,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUBJECTS = ("invoice", "newsletter", "hello", "")
# Strategies built once: building them inside each draw costs more than the test.
optional_days = st.none() | st.integers(1, 60)
optional_size = st.none() | st.integers(0, 5000)
actions = st.none() | st.sampled_from(Action)
user_globs = st.sampled_from([(), ("alice",), ("bob",), ("a*",)])
subject_patterns = st.none() | st.sampled_from(SUBJECTS[:3])


@st.composite
def rules(draw: st.DrawFn) -> tuple[Rule, ...]:
    out = []
    for number in range(draw(st.integers(0, 6))):
        action = draw(actions)
        expire = draw(optional_days)
        max_size = draw(optional_size)
        if action is None and expire is None and max_size is None:
            action = Action.KEEP
        subject = draw(subject_patterns)
        out.append(
            rule(
                f"r{number}",
                action=action,
                expire=expire,
                max_size=max_size,
                continues=draw(st.booleans()),
                users=draw(user_globs),
                older=draw(optional_days),
                newer=draw(optional_days),
                larger=draw(optional_size),
                smaller=draw(optional_size),
                headers=None if subject is None else {"Subject": subject},
            )
        )
    return tuple(out)


ages = st.floats(-1, 90, allow_nan=False)
sizes = st.integers(0, 6000)
subjects = st.sampled_from(SUBJECTS)


@st.composite
def maildrops(draw: st.DrawFn) -> list[Candidate]:
    count = draw(st.integers(0, 12))
    indexes = draw(st.permutations(range(count)))
    return [
        candidate(
            index,
            days_old=draw(ages),
            size=draw(sizes),
            hidden=draw(st.booleans()),
            headers={"Subject": draw(subjects)},
        )
        for index in indexes
    ]


@st.composite
def sessions(draw: st.DrawFn) -> tuple[Policy, list[Candidate], set[int], set[int], timedelta]:
    policy = Policy(draw(rules()))
    candidates = draw(maildrops())
    view = policy.for_user("alice", "provider").view(candidates, NOW)
    marked = set(draw(st.sets(st.sampled_from(view.visible)) if view.visible else st.just(set())))
    retrieved = set(
        draw(st.sets(st.sampled_from(view.visible)) if view.visible else st.just(set()))
    )
    later = draw(st.timedeltas(timedelta(0), timedelta(days=3)))
    return policy, candidates, marked, retrieved, later


def run(
    policy: Policy,
    candidates: list[Candidate],
    marked: set[int],
    retrieved: set[int],
    later: timedelta,
) -> tuple[View, RetentionPlan]:
    account = policy.for_user("alice", "provider")
    view = account.view(candidates, NOW)
    return view, account.plan(view, marked, retrieved, NOW + later)


@FAST
@given(sessions())
def test_nothing_is_deleted_without_a_reason(
    session: tuple[Policy, list[Candidate], set[int], set[int], timedelta],
) -> None:
    _, _, marked, retrieved, later = session
    view, plan = run(*session)
    decisions = {c.index: d for c, d in zip(view.candidates, view.decisions, strict=True)}
    for item in plan.delete_upstream:
        decision = decisions[item.index]
        match item.reason:
            case Reason.EXPIRED:
                assert decision.expires_at is not None
                assert NOW + later > decision.expires_at
            case Reason.DELETED:
                assert item.index in marked
                assert decision.on_dele is OnDele.DELETE
                assert decision.action is not Action.KEEP
            case Reason.RETRIEVED:
                assert item.index in retrieved
                assert decision.action is Action.DELETE_AFTER_RETRIEVE
            case Reason.HIDDEN:
                raise AssertionError("HIDDEN is never a reason to delete upstream")
    for item in plan.hide:
        assert item.reason is Reason.HIDDEN
        assert item.index in marked
        assert decisions[item.index].action is Action.KEEP
    # Under keep without expiry, nothing is ever deleted upstream.
    kept = {i for i, d in decisions.items() if d.action is Action.KEEP and d.expires_at is None}
    assert not kept & {item.index for item in plan.delete_upstream}


@FAST
@given(sessions())
def test_the_plan_covers_every_mark_and_each_message_at_most_once(
    session: tuple[Policy, list[Candidate], set[int], set[int], timedelta],
) -> None:
    _, _, marked, _, _ = session
    _, plan = run(*session)
    deleted = [item.index for item in plan.delete_upstream]
    hidden = [item.index for item in plan.hide]
    assert len(set(deleted + hidden)) == len(deleted) + len(hidden)
    assert marked <= set(deleted) | set(hidden)
    assert deleted == sorted(deleted) and hidden == sorted(hidden)
    assert plan.overruled == len(hidden)


@FAST
@given(sessions())
def test_hidden_messages_are_never_visible_and_numbering_is_dense(
    session: tuple[Policy, list[Candidate], set[int], set[int], timedelta],
) -> None:
    _, candidates, *_ = session
    view, _ = run(*session)
    assert len(view.decisions) == len(candidates)
    assert view.candidates == tuple(candidates)
    for c, d in zip(candidates, view.decisions, strict=True):
        assert d.visible == (c.index in view.visible)
        assert d.visible == (d.hidden is None)
        if c.hidden:
            assert d.hidden is Hidden.FOR_USER
        if d.action is Action.HIDE:
            assert not d.visible
    assert list(view.visible) == sorted(set(view.visible))
    assert set(view.visible) <= {c.index for c in candidates}


@FAST
@given(sessions(), st.randoms(use_true_random=False))
def test_plan_is_deterministic_and_independent_of_candidate_order(
    session: tuple[Policy, list[Candidate], set[int], set[int], timedelta],
    random: Random,
) -> None:
    policy, candidates, marked, retrieved, later = session
    view, plan = run(*session)
    shuffled = list(candidates)
    random.shuffle(shuffled)
    view2, plan2 = run(policy, shuffled, marked, retrieved, later)
    assert plan2 == plan
    assert view2.visible == view.visible
    assert run(*session) == (view, plan)
