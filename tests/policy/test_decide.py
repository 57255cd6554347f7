"""Policy, AccountPolicy.view and .plan: every matcher, action, the order and continue."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import NOW, candidate, rule

from popproxy.policy import (
    DEFAULT_RULE,
    AccountPolicy,
    Action,
    Candidate,
    Headers,
    Hidden,
    OnDele,
    Outcome,
    Planned,
    Policy,
    Reason,
    RetentionPlan,
    Rule,
    Setting,
)

KEEP, DELETE, DAR, HIDE = (
    Action.KEEP,
    Action.DELETE,
    Action.DELETE_AFTER_RETRIEVE,
    Action.HIDE,
)


def account(*rules: Rule, user: str = "alice", upstream: str = "provider") -> AccountPolicy:
    return Policy(rules).for_user(user, upstream)


def plan_of(
    policy: AccountPolicy,
    candidates: list[Candidate],
    *,
    marked: set[int] = frozenset(),  # type: ignore[assignment]
    retrieved: set[int] = frozenset(),  # type: ignore[assignment]
    at: datetime = NOW,
) -> RetentionPlan:
    return policy.plan(policy.view(candidates, NOW), marked, retrieved, at)


def reasons(plan: RetentionPlan) -> dict[str, tuple[int, str, Reason]]:
    return {
        **{f"delete {p.uid}": (p.index, p.rule, p.reason) for p in plan.delete_upstream},
        **{f"hide {p.uid}": (p.index, p.rule, p.reason) for p in plan.hide},
    }


# -- no rules ---------------------------------------------------------------------------


def test_no_rules_is_rfc1939_dele_and_expire_never() -> None:
    policy = Policy.empty().for_user("alice", "provider")
    assert policy.rules == ()
    assert policy.expire == "NEVER"
    assert not policy.needs_headers
    assert Policy.empty().expire_before_login() == "NEVER"
    view = policy.view([candidate(0), candidate(1, days_old=9000)], NOW)
    assert view.visible == (0, 1)
    decision = view.decisions[0]
    assert (decision.rule, decision.action, decision.on_dele) == (
        DEFAULT_RULE,
        DELETE,
        OnDele.DELETE,
    )
    assert decision.expires_at is None
    assert decision.visible and decision.hidden is None
    plan = policy.plan(view, {1}, {0, 1}, NOW)
    assert plan == RetentionPlan(delete_upstream=(Planned(1, "u1", "default", Reason.DELETED),))
    assert plan.overruled == 0


# -- matchers -----------------------------------------------------------------------------


def test_user_and_upstream_globs_select_the_rules_of_an_account() -> None:
    rules = (
        rule("scanners", action=KEEP, users=["scanner-*", "copier"], continues=True),
        rule("work", expire=30, upstreams=["work*"], continues=True),
        rule("exact", max_size=10, users=["alice"], upstreams=["home"]),
    )
    policy = Policy(rules)
    assert [r.name for r in policy.for_user("scanner-1", "home").rules] == ["scanners"]
    assert [r.name for r in policy.for_user("copier", "work-eu").rules] == ["scanners", "work"]
    assert [r.name for r in policy.for_user("alice", "home").rules] == ["exact"]
    assert [r.name for r in policy.for_user("Alice", "home").rules] == []  # case-sensitive
    assert [r.name for r in policy.for_user("bob", "Work").rules] == []


def test_age_bounds_are_strict_days_since_first_seen() -> None:
    policy = account(rule("old", action=KEEP, older=30), rule("new", action=HIDE, newer=2))
    view = policy.view(
        [
            candidate(0, days_old=30),  # exactly 30 days: not older than 30
            candidate(1, days_old=30.001),
            candidate(2, days_old=2),  # exactly 2: not newer than 2
            candidate(3, days_old=1.99),
        ],
        NOW,
    )
    assert [d.rule for d in view.decisions] == ["default", "old", "default", "new"]


def test_first_seen_in_the_future_counts_as_age_zero() -> None:
    policy = account(rule("fresh", action=KEEP, newer=1))
    assert policy.view([candidate(0, days_old=-5)], NOW).decisions[0].rule == "fresh"


def test_size_bounds_are_strict() -> None:
    policy = account(rule("big", action=KEEP, larger=100), rule("small", action=HIDE, smaller=10))
    view = policy.view([candidate(i, size=s) for i, s in enumerate((100, 101, 10, 9))], NOW)
    assert [d.rule for d in view.decisions] == ["default", "big", "default", "small"]


def test_header_patterns_search_any_body_and_all_fields_must_match() -> None:
    policy = account(
        rule("invoices", action=KEEP, headers={"Subject": r"(?i)invoice", "From": r"@erp\."})
    )
    assert policy.needs_headers
    view = policy.view(
        [
            candidate(0, headers={"subject": "Your INVOICE 12", "from": "bot@erp.example"}),
            candidate(1, headers={"subject": "Your invoice", "from": "someone@example"}),
            candidate(2, headers={"from": "bot@erp.example"}),  # no Subject: no match
            candidate(3, headers={"SUBJECT": "re: invoice", "FROM": "x@erp.y"}),
        ],
        NOW,
    )
    assert [d.rule for d in view.decisions] == ["invoices", "default", "default", "invoices"]


def test_a_header_rule_needs_the_headers() -> None:
    policy = account(rule("spam", action=HIDE, headers={"X-Spam-Flag": "YES"}))
    with pytest.raises(ValueError, match="headers"):
        policy.view([candidate(0)], NOW)


def test_headers_are_not_needed_when_no_header_rule_can_apply() -> None:
    rules = (rule("spam", action=HIDE, headers={"X-Spam-Flag": "YES"}, users=["bob"]),)
    assert not account(*rules).needs_headers
    assert Policy(rules).for_user("bob", "provider").needs_headers
    # Nor after a rule that ends evaluation for every message.
    assert not account(rule("all", action=KEEP), *rules).needs_headers


# -- actions ------------------------------------------------------------------------------


def test_keep_turns_dele_into_hide_for_this_user() -> None:
    policy = account(rule("scanners", action=KEEP))
    plan = plan_of(policy, [candidate(0), candidate(1)], marked={1}, retrieved={0, 1})
    assert reasons(plan) == {"hide u1": (1, "scanners", Reason.HIDDEN)}
    assert plan.overruled == 1
    assert policy.view([candidate(0)], NOW).decisions[0].on_dele is OnDele.HIDE


def test_hidden_for_user_is_not_shown_and_not_touched() -> None:
    policy = account(rule("scanners", action=KEEP))
    view = policy.view([candidate(0, hidden=True), candidate(1)], NOW)
    assert view.visible == (1,)
    assert view.decisions[0].hidden is Hidden.FOR_USER
    assert view.decisions[0].hidden_rule is None
    assert policy.plan(view, set(), set(), NOW) == RetentionPlan()


def test_delete_deletes_on_dele_only() -> None:
    policy = account(rule("plain", action=DELETE))
    plan = plan_of(policy, [candidate(0), candidate(1)], marked={0}, retrieved={1})
    assert reasons(plan) == {"delete u0": (0, "plain", Reason.DELETED)}


def test_delete_after_retrieve_deletes_what_was_retrieved_and_what_was_deleted() -> None:
    policy = account(rule("erp", action=DAR))
    cands = [candidate(0), candidate(1), candidate(2)]
    plan = plan_of(policy, cands, marked={1}, retrieved={0, 1})
    assert reasons(plan) == {
        "delete u0": (0, "erp", Reason.RETRIEVED),
        "delete u1": (1, "erp", Reason.DELETED),
    }
    assert policy.view(cands, NOW).decisions[2].delete_after_retrieve
    assert policy.expire == "0"


def test_hide_rule_hides_and_never_deletes() -> None:
    policy = account(rule("newsletters", action=HIDE, larger=500))
    view = policy.view([candidate(0, size=501), candidate(1, size=10)], NOW)
    assert view.visible == (1,)
    assert (view.decisions[0].hidden, view.decisions[0].hidden_rule) == (
        Hidden.HIDE_RULE,
        "newsletters",
    )
    assert policy.plan(view, {1}, {1}, NOW) == RetentionPlan(
        delete_upstream=(Planned(1, "u1", "default", Reason.DELETED),)
    )


def test_max_size_bytes_hides_larger_messages_only() -> None:
    policy = account(rule("no-big", max_size=1000))
    view = policy.view([candidate(0, size=1000), candidate(1, size=1001)], NOW)
    assert view.visible == (0,)
    assert (view.decisions[1].hidden, view.decisions[1].hidden_rule) == (
        Hidden.TOO_LARGE,
        "no-big",
    )
    # max_size_bytes alone leaves the action at the default.
    assert view.decisions[0].rule == DEFAULT_RULE


def test_why_hidden_prefers_the_users_own_hide() -> None:
    policy = account(rule("h", action=HIDE, max_size=1))
    decisions = policy.view([candidate(0, hidden=True, size=5), candidate(1, size=5)], NOW)
    assert [d.hidden for d in decisions.decisions] == [Hidden.FOR_USER, Hidden.HIDE_RULE]


# -- expiry -------------------------------------------------------------------------------


def test_expired_messages_are_deleted_at_any_quit_visible_or_not() -> None:
    policy = account(rule("month", expire=30, action=KEEP))
    cands = [
        candidate(0, days_old=31),  # expired, untouched by the client
        candidate(1, days_old=31, hidden=True),  # expired, hidden for this user earlier
        candidate(2, days_old=29),  # not yet
        candidate(3, days_old=30),  # exactly 30 days: not more than 30
    ]
    view = policy.view(cands, NOW)
    assert view.decisions[2].expires_at == NOW + timedelta(days=1)
    plan = policy.plan(view, set(), set(), NOW)
    assert reasons(plan) == {
        "delete u0": (0, "month", Reason.EXPIRED),
        "delete u1": (1, "month", Reason.EXPIRED),
    }
    # The same session, a day and a minute later at QUIT: 2 and 3 have expired too.
    later = policy.plan(view, set(), set(), NOW + timedelta(days=1, minutes=1))
    assert [p.index for p in later.delete_upstream] == [0, 1, 2, 3]


def test_keep_with_expiry_hides_on_dele_and_deletes_once_expired() -> None:
    policy = account(rule("scanners", action=KEEP, expire=7))
    cands = [candidate(0, days_old=8), candidate(1, days_old=1)]
    plan = plan_of(policy, cands, marked={0, 1})
    assert reasons(plan) == {
        "delete u0": (0, "scanners", Reason.EXPIRED),
        "hide u1": (1, "scanners", Reason.HIDDEN),
    }
    assert plan.overruled == 1


def test_hide_rules_messages_still_expire() -> None:
    policy = account(rule("spam", action=HIDE, expire=3))
    plan = plan_of(policy, [candidate(0, days_old=4), candidate(1, days_old=2)])
    assert reasons(plan) == {"delete u0": (0, "spam", Reason.EXPIRED)}


def test_expiry_rule_and_action_rule_are_named_separately() -> None:
    policy = account(rule("expire-all", expire=10, continues=True), rule("keep", action=KEEP))
    decision = policy.view([candidate(0, days_old=11)], NOW).decisions[0]
    assert (decision.rule, decision.expire_rule) == ("keep", "expire-all")
    plan = policy.plan(policy.view([candidate(0, days_old=11)], NOW), {0}, set(), NOW)
    assert plan.delete_upstream == (Planned(0, "u0", "expire-all", Reason.EXPIRED),)


# -- order and continue ----------------------------------------------------------------------


def test_first_match_wins() -> None:
    policy = account(rule("a", action=KEEP, larger=10), rule("b", action=HIDE), rule("c"))
    view = policy.view([candidate(0, size=11), candidate(1, size=5)], NOW)
    assert [d.rule for d in view.decisions] == ["a", "b"]
    assert [d.matched for d in view.decisions] == [("a",), ("b",)]
    # "c" can never apply: "b" matches every message and does not continue.
    assert [r.name for r in policy.rules] == ["a", "b"]


def test_continue_contributes_and_later_matches_override_what_they_name() -> None:
    policy = account(
        rule("base", action=KEEP, expire=90, max_size=5000, continues=True),
        rule("big", max_size=10_000, larger=4000, continues=True),
        rule("erp", action=DAR, users=["alice"], headers={"From": "erp"}),
        rule("short", expire=7),
    )
    view = policy.view(
        [
            candidate(0, size=6000, headers={"from": "erp@x"}),
            candidate(1, size=100, headers={"from": "people@x"}),
        ],
        NOW,
    )
    erp, other = view.decisions
    assert erp.matched == ("base", "big", "erp")
    assert (erp.action, erp.rule, erp.expire_rule) == (DAR, "erp", "base")
    assert erp.visible  # 6000 <= big's 10000, which overrides base's 5000
    assert erp.expires_at == NOW + timedelta(days=90)
    assert other.matched == ("base", "short")
    assert (other.action, other.rule, other.expire_rule) == (KEEP, "base", "short")
    assert other.expires_at == NOW + timedelta(days=7)


def test_unset_settings_fall_back_to_the_defaults() -> None:
    policy = account(rule("tag", max_size=10, continues=True))
    decision = policy.view([candidate(0, size=5)], NOW).decisions[0]
    assert (decision.rule, decision.action, decision.expires_at) == ("default", DELETE, None)
    assert decision.matched == ("tag",)


def test_only_continue_rules_matching_evaluates_them_all() -> None:
    policy = account(
        rule("one", action=KEEP, continues=True), rule("two", expire=5, continues=True)
    )
    decision = policy.view([candidate(0)], NOW).decisions[0]
    assert decision.matched == ("one", "two")
    assert (decision.rule, decision.expire_rule) == ("one", "two")


# -- what can apply, and EXPIRE (RFC 2449 §6.7) -------------------------------------------------


def test_outcomes_list_what_each_setting_can_end_up_as() -> None:
    policy = account(
        rule("base", expire=90, continues=True),
        rule("old-big", expire=30, larger=10, continues=True),
        rule("keep", action=KEEP, expire=365),
    )
    # "keep" matches everything and names expire_after_days: 90 and 30 never survive it.
    assert policy.outcomes(Setting.EXPIRE_AFTER_DAYS) == (Outcome(365, "keep"),)
    assert policy.outcomes(Setting.ACTION) == (Outcome(KEEP, "keep"),)
    assert policy.outcomes(Setting.MAX_SIZE_BYTES) == (Outcome(None, "default"),)
    assert policy.expire == "365"


def test_outcomes_with_conditional_rules() -> None:
    policy = account(
        rule("base", expire=90, continues=True),
        rule("big", expire=30, larger=10),
        rule("spam", action=HIDE, headers={"X-Spam": "yes"}),
    )
    assert policy.outcomes(Setting.EXPIRE_AFTER_DAYS) == (
        Outcome(90, "base"),
        Outcome(30, "big"),
    )
    assert policy.outcomes(Setting.ACTION) == (
        Outcome(DELETE, "default"),
        Outcome(HIDE, "spam"),
    )
    assert policy.expire == "30"


@pytest.mark.parametrize(
    ("rules", "expire"),
    [
        ((), "NEVER"),
        ((rule("k", action=KEEP),), "NEVER"),
        ((rule("d", action=DELETE),), "NEVER"),
        ((rule("e", expire=14),), "14"),
        ((rule("e", expire=14, larger=5), rule("f", expire=3, older=1)), "3"),
        ((rule("dar", action=DAR, headers={"From": "erp"}), rule("e", expire=14)), "0"),
        ((rule("k", action=KEEP), rule("dar", action=DAR)), "NEVER"),  # dar never applies
        ((rule("e", expire=2, users=["bob"]),), "NEVER"),  # not alice's
    ],
)
def test_expire_after_login(rules: tuple[Rule, ...], expire: str) -> None:
    assert account(*rules).expire == expire


@pytest.mark.parametrize(
    ("accounts", "expected"),
    [
        ({}, "NEVER"),
        ({"demo": None}, "NEVER"),
        ({"alice": "work", "bob": "work"}, "30"),
        ({"alice": "work", "carol": "home"}, "30 USER"),
        ({"alice": "work", "demo": None}, "30 USER"),
        ({"alice": "work", "erp": "work"}, "0 USER"),
        ({"carol": "home", "demo": None}, "NEVER"),
    ],
)
def test_expire_before_login(accounts: dict[str, str | None], expected: str) -> None:
    rules = (
        rule("erp", action=DAR, users=["erp"]),
        rule("work", expire=30, upstreams=["work"]),
    )
    assert Policy(rules, accounts).expire_before_login() == expected


def test_for_user_is_the_same_for_configured_and_unconfigured_accounts() -> None:
    rules = (rule("work", expire=30, upstreams=["work"]),)
    configured = Policy(rules, {"alice": "work"}).for_user("alice", "work")
    assert configured == Policy(rules).for_user("alice", "work")
    assert Policy(rules, {"alice": "work"}).rule_names == ("work",)


# -- misuse is refused ----------------------------------------------------------------------


def test_rules_must_be_unique_named_and_set_something() -> None:
    with pytest.raises(ValueError, match="unique"):
        Policy((rule("a"), rule("a")))
    with pytest.raises(ValueError, match="sets nothing"):
        Rule(name="nothing")
    with pytest.raises(ValueError, match="reserved"):
        Rule(name="default", action=KEEP)
    with pytest.raises(ValueError, match="rule name"):
        Rule(name="-x", action=KEEP)


def test_plan_refuses_indexes_outside_the_view() -> None:
    policy = account(rule("h", action=HIDE, larger=10))
    view = policy.view([candidate(0, size=100), candidate(1)], NOW)
    for marked, retrieved in (({0}, set()), (set(), {0}), ({7}, set())):
        with pytest.raises(ValueError, match="not in the view"):
            policy.plan(view, marked, retrieved, NOW)


def test_times_must_be_timezone_aware_and_indexes_unique() -> None:
    policy = account()
    naive = datetime(2024, 1, 1)  # naive on purpose
    with pytest.raises(ValueError, match="timezone"):
        policy.view([candidate(0)], naive)
    with pytest.raises(ValueError, match="timezone"):
        Candidate(index=0, uid="u", size=1, first_seen=naive)
    with pytest.raises(ValueError, match="0 or more"):
        Candidate(index=-1, uid="u", size=1, first_seen=NOW)
    with pytest.raises(ValueError, match="share an index"):
        policy.view([candidate(0), candidate(0)], NOW)
    view = policy.view([candidate(0)], NOW)
    with pytest.raises(ValueError, match="timezone"):
        policy.plan(view, set(), set(), naive)


class _NoOffset(tzinfo):
    """A tzinfo that knows no offset: a time with it is not timezone-aware."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return None


def test_a_candidate_is_aware_of_any_zone_with_an_offset_and_cannot_change() -> None:
    with pytest.raises(ValueError, match="timezone"):
        Candidate(0, "u", 1, datetime(2024, 1, 1, tzinfo=_NoOffset()))
    with pytest.raises(ValueError, match="0 or more"):
        Candidate(0, "u", -1, NOW)
    east = NOW.astimezone(timezone(timedelta(hours=2)))
    made = Candidate(3, "u", 1, east, hidden=True)
    assert (made.index, made.uid, made.size, made.first_seen, made.hidden, made.headers) == (
        3,
        "u",
        1,
        east,
        True,
        None,
    )
    with pytest.raises(AttributeError):
        made.size = 2  # type: ignore[misc]


_ZONES = (UTC, timezone(timedelta(hours=2)), _NoOffset(), None)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-1, 3),
            st.sampled_from(_ZONES),
            st.booleans(),
            st.none() | st.just(Headers({"subject": ["hi"]})),
        ),
        max_size=6,
    ),
    st.booleans(),
)
def test_a_listing_of_candidates_is_each_candidate_built_alone(
    rows: list[tuple[int, tzinfo | None, bool, Headers | None]], with_headers: bool
) -> None:
    """``Candidate.listing`` (checked over the whole listing, built in C) gives what
    ``Candidate`` gives row by row, and refuses what it refuses, with the same error."""
    uids = [f"u{n}" for n in range(len(rows))]
    sizes = [size for size, _zone, _hidden, _headers in rows]
    first_seen = [datetime(2024, 1, 1, tzinfo=zone) for _size, zone, _hidden, _headers in rows]
    hidden = [flag for _size, _zone, flag, _headers in rows]
    headers = [each for _size, _zone, _hidden, each in rows] if with_headers else None
    try:
        each = headers or [None] * len(rows)
        expected: list[Candidate] | str = [
            Candidate(n, uids[n], sizes[n], first_seen[n], hidden[n], each[n])
            for n in range(len(rows))
        ]
    except ValueError as exc:
        expected = str(exc)
    try:
        got: list[Candidate] | str = Candidate.listing(uids, sizes, first_seen, hidden, headers)
    except ValueError as exc:
        got = str(exc)
    assert got == expected
    if isinstance(got, list):
        assert all(type(each) is Candidate for each in got)
        assert [each.headers for each in got] == (headers or [None] * len(rows))


def test_a_listing_of_candidates_needs_columns_of_one_length() -> None:
    with pytest.raises(ValueError, match="length"):
        Candidate.listing(["a", "b"], [1], [NOW, NOW], [False, False])
    with pytest.raises(ValueError, match="length"):
        Candidate.listing(["a"], [1], [NOW], [False], [None, None])


def test_candidates_alike_share_one_decision_and_others_do_not() -> None:
    """view() decides once per kind of candidate: under the defaults every visible
    message shares a Decision, and the hidden ones another; with rules on age, expiry
    or size each distinct age or size is decided on its own, as one by one."""
    plain = account()
    many = [candidate(i, days_old=i % 7, size=100 + i) for i in range(50)]
    many.append(candidate(50, hidden=True))
    view = plain.view(many, NOW)
    assert len({id(d) for d in view.decisions}) == 2
    assert view.decisions[50].hidden is not None
    ruled = account(
        rule("old", action=KEEP, older=3, continues=True),
        rule("expiring", expire=10, continues=True),
        rule("big", action=HIDE, larger=120),
    )
    view = ruled.view(many, NOW)
    for one, decision in zip(many, view.decisions, strict=True):
        assert decision == ruled.view([one], NOW).decisions[0]
    assert {d.rule for d in view.decisions} >= {"old", "big", "default"}
    assert len({d.expires_at for d in view.decisions}) == 7
