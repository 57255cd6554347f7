"""The example rules in rules/ load, and do what their comments say."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from policy_helpers import NOW, candidate

from popproxy.auth.passwords import hash_password
from popproxy.config import load_config
from popproxy.policy import AccountPolicy, Hidden, Policy, Reason
from popproxy.secret import Secret

REPO = Path(__file__).resolve().parents[2]
HASH = hash_password(Secret.from_str("pw"), ln=4)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    """The users of docs/proxy.md's example, plus an ERP system, with rules/ as rules_dir."""
    config = tmp_path_factory.mktemp("examples") / "popproxy.yaml"

    def user(name: str, upstream: str) -> str:
        return (
            f'  {name}: {{password_hash: "{HASH}", upstream: {upstream},'
            " upstream_password_env: HOME}\n"
        )

    config.write_text(
        textwrap.dedent(f"""\
        listen: [{{address: 127.0.0.1, port: 0, tls: none}}]
        upstreams:
          provider: {{host: pop.example.net}}
          office: {{host: pop.office.example}}
        rules_dir: {REPO / "rules"}
        users:
        """)
        + user("alice", "provider")
        + user("alice-phone", "provider")
        + user("scanner-1", "office")
        + user("erp", "office")
        + f'  demo: {{password_hash: "{HASH}", maildir: {REPO / "examples/maildir/demo"}}}\n',
        encoding="utf-8",
    )
    return load_config(config).policy


def test_every_file_loads(policy: Policy) -> None:
    assert sorted({rule.source for rule in policy.rules}) == sorted(
        path.name for path in (REPO / "rules").glob("*.yaml")
    )
    assert policy.expire_before_login() == "0 USER"


def test_scanners_keep(policy: Policy) -> None:
    scanner = policy.for_user("scanner-1", "office")
    assert scanner.expire == "30"
    assert [rule.name for rule in scanner.rules] == ["scanners-keep"]
    view = scanner.view([candidate(0, days_old=31), candidate(1, days_old=2)], NOW)
    plan = scanner.plan(view, {0, 1}, {0, 1}, NOW)
    # The DELE of message 1 only hides it for the scanner; message 0 is over 30 days.
    assert [(p.index, p.reason) for p in plan.hide] == [(1, Reason.HIDDEN)]
    assert [(p.index, p.reason) for p in plan.delete_upstream] == [(0, Reason.EXPIRED)]


def test_erp_drain(policy: Policy) -> None:
    erp = policy.for_user("erp", "office")
    assert erp.expire == "0"
    view = erp.view([candidate(0), candidate(1), candidate(2)], NOW)
    plan = erp.plan(view, set(), {0, 1}, NOW)
    assert [(p.index, p.reason) for p in plan.delete_upstream] == [
        (0, Reason.RETRIEVED),
        (1, Reason.RETRIEVED),
    ]
    assert plan.hide == ()


def expired_after_90_days(account: AccountPolicy) -> None:
    view = account.view([candidate(0, days_old=90), candidate(1, days_old=91)], NOW)
    assert [p.index for p in account.plan(view, set(), set(), NOW).delete_upstream] == [1]
    assert view.decisions[0].expires_at == NOW  # exactly 90 days: not yet


def test_everyone_else_expires_after_90_days_and_dele_deletes(policy: Policy) -> None:
    alice = policy.for_user("alice", "provider")
    assert alice.expire == "90"
    assert not alice.needs_headers
    expired_after_90_days(alice)
    view = alice.view([candidate(0)], NOW)
    assert alice.plan(view, {0}, set(), NOW).delete_upstream[0].reason is Reason.DELETED


def test_phones_do_not_see_large_or_list_mail(policy: Policy) -> None:
    phone = policy.for_user("alice-phone", "provider")
    assert phone.needs_headers
    assert phone.expire == "90"
    view = phone.view(
        [
            candidate(0, size=10_000_001, headers={}),
            candidate(1, size=10_000_000, headers={}),
            candidate(2, headers={"List-Id": "<news.example.net>"}),
            candidate(3, days_old=91, headers={"List-Id": "<news.example.net>"}),
        ],
        NOW,
    )
    assert view.visible == (1,)
    assert [d.hidden for d in view.decisions] == [
        Hidden.TOO_LARGE,
        None,
        Hidden.HIDE_RULE,
        Hidden.HIDE_RULE,
    ]
    # Hidden messages stay upstream, and still expire after 90 days.
    plan = phone.plan(view, set(), set(), NOW)
    assert [(p.index, p.reason) for p in plan.delete_upstream] == [(3, Reason.EXPIRED)]


def test_maildir_users_are_not_subject_to_rules(policy: Policy) -> None:
    assert policy.accounts["demo"] is None
