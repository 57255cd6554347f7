"""Rules built from a rule file's parsed content, without YAML (the loader reads the files)."""

from __future__ import annotations

from popproxy.policy import Action, Match
from popproxy.policy.fields import Issues
from popproxy.policy.schema import DeclaredAccounts, RuleSchema

KNOWN = DeclaredAccounts.written(
    {"alice": {"upstream": "provider"}, "demo": {"maildir": "mail/demo"}},
    {"provider": {"host": "pop.example.net"}},
)


def test_a_rule_is_built_from_plain_data() -> None:
    issues = Issues("10-keep.yaml")
    data = {"rules": [{"name": "keep-alice", "match": {"users": ["al*"]}, "action": "keep"}]}
    (rule,) = RuleSchema(KNOWN).rules_of(data, issues, "10-keep.yaml")
    assert issues.items == []
    assert rule.match == Match(users=("al*",))
    assert rule.action is Action.KEEP
    assert rule.source == "10-keep.yaml"


def test_a_rule_name_is_unique_over_the_files_of_one_schema() -> None:
    schema = RuleSchema(KNOWN)
    first, second = Issues("10-a.yaml"), Issues("20-b.yaml")
    data = {"rules": [{"name": "same", "action": "keep"}]}
    assert len(schema.rules_of(data, first, "10-a.yaml")) == 1
    assert schema.rules_of(data, second, "20-b.yaml") == []
    assert [str(issue) for issue in second.items] == [
        "20-b.yaml: rules[0] (same).name: 'same' is already the name of rules[0] (same)"
        " in 10-a.yaml"
    ]


def test_globs_are_checked_against_the_accounts_as_written() -> None:
    issues = Issues("10-x.yaml")
    data = {"rules": [{"name": "x", "match": {"users": ["demo"]}, "action": "hide"}]}
    assert RuleSchema(KNOWN).rules_of(data, issues, "10-x.yaml") == []
    assert [str(issue) for issue in issues.items] == [
        "10-x.yaml: rules[0] (x).match: the rule applies to no configured user: no user routed"
        " to an upstream or fetching from one matches both users and upstreams (plain Maildir"
        " users are not subject to rules)"
    ]
