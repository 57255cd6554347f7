"""Loading rules_dir with the config: every error names the file, the rule and the key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from popproxy.auth.passwords import hash_password
from popproxy.config import (
    MAX_RULE_FILE_BYTES,
    MAX_RULE_FILES,
    MAX_RULES_DIR_ENTRIES,
    ConfigError,
    load_config,
)
from popproxy.policy import Action, Policy
from popproxy.policy.patterns import MAX_HEADER_PATTERN_CHARS
from popproxy.secret import Secret

HASH = hash_password(Secret.from_str("pw"), ln=4)

CONFIG = f"""\
listen:
  - {{address: 127.0.0.1, port: 0, tls: none}}
upstreams:
  provider: {{host: pop.example.net}}
  office: {{host: pop.office.example}}
users:
  alice: {{password_hash: "{HASH}", upstream: provider, upstream_password_env: PW}}
  scanner-1: {{password_hash: "{HASH}", upstream: office, upstream_password_env: PW}}
  demo: {{password_hash: "{HASH}", maildir: mail/demo}}
rules_dir: rules
"""


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PW", "upstream-secret")
    Path("rules").mkdir()
    Path("popproxy.yaml").write_text(CONFIG, encoding="utf-8")


def rules_file(name: str, text: str) -> None:
    Path("rules", name).write_text(textwrap.dedent(text), encoding="utf-8")


def problems() -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(Path("popproxy.yaml"))
    return [str(issue) for issue in info.value.issues]


def only_problem() -> str:
    found = problems()
    assert len(found) == 1, found
    return found[0]


def test_rules_load_in_file_name_then_list_order() -> None:
    rules_file("50-b.yaml", "rules:\n  - {name: b1, expire_after_days: 9}\n")
    rules_file(
        "10-a.yaml",
        """\
        rules:
          - name: a1
            match: {users: ["scanner-*"], upstreams: [office], older_than_days: 3}
            action: keep
            continue: true
          - name: a2
            match:
              newer_than_days: 10
              larger_than_bytes: 5
              smaller_than_bytes: 100
              headers: {Subject: "(?i)invoice", X-Spam-Flag: "^YES$"}
            action: delete_after_retrieve
            max_size_bytes: 1000
        """,
    )
    Path("rules", "README").write_text("not a rule file")
    Path("rules", "10-a.yaml~").write_text("an editor's backup")
    config = load_config(Path("popproxy.yaml"))
    policy = config.policy
    assert policy.rule_names == ("a1", "a2", "b1")
    a1, a2, b1 = policy.rules
    assert (a1.source, a1.action, a1.continues) == ("10-a.yaml", Action.KEEP, True)
    assert a1.match.users == ("scanner-*",)
    assert a1.match.upstreams == ("office",)
    assert a1.match.older_than_days == 3
    assert (a2.match.newer_than_days, a2.match.larger_than_bytes) == (10, 5)
    assert a2.match.smaller_than_bytes == 100
    assert [(h.field, h.pattern.source) for h in a2.match.headers] == [
        ("subject", "(?i)invoice"),
        ("x-spam-flag", "^YES$"),
    ]
    assert (a2.action, a2.max_size_bytes, a2.continues) == (
        Action.DELETE_AFTER_RETRIEVE,
        1000,
        False,
    )
    assert (b1.source, b1.expire_after_days, b1.action) == ("50-b.yaml", 9, None)
    assert dict(policy.accounts) == {"alice": "provider", "scanner-1": "office", "demo": None}
    assert policy.expire_before_login() == "0 USER"


def test_no_rules_dir_is_the_empty_policy() -> None:
    Path("popproxy.yaml").write_text(CONFIG.replace("rules_dir: rules\n", ""), encoding="utf-8")
    config = load_config(Path("popproxy.yaml"))
    assert config.policy == Policy.empty()
    assert config.policy.expire_before_login() == "NEVER"


def test_an_empty_rules_dir_is_no_rules() -> None:
    assert load_config(Path("popproxy.yaml")).policy.rules == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "rules:\n  - {name: k, action: keep, expire_after_day: 3}\n",
            "rules/10-x.yaml: rules[0] (k).expire_after_day: unknown key; did you mean"
            " 'expire_after_days'? (expected one of: name, match, action, expire_after_days,"
            " max_size_bytes, continue)",
        ),
        (
            "rules:\n  - {name: k, action: kept}\n",
            "rules/10-x.yaml: rules[0] (k).action: expected one of keep, delete,"
            " delete_after_retrieve, hide, got the string 'kept'; did you mean 'keep'?",
        ),
        (
            "rules:\n  - {name: k, expire_after_days: 0}\n",
            "rules/10-x.yaml: rules[0] (k).expire_after_days: expected an integer 1..3650, got 0",
        ),
        (
            'rules:\n  - {name: k, expire_after_days: "30"}\n',
            "rules/10-x.yaml: rules[0] (k).expire_after_days: expected an integer 1..3650, got"
            " the string '30' (write the number without quotes or underscores)",
        ),
        (
            "rules:\n  - {name: k, max_size_bytes: -1}\n",
            "rules/10-x.yaml: rules[0] (k).max_size_bytes: expected an integer"
            " 0..1000000000000, got -1",
        ),
        (
            "rules:\n  - {name: k, action: keep, continue: yes}\n",
            "rules/10-x.yaml: rules[0] (k).continue: expected true or false, got the string"
            " 'yes' (write true or false: 'yes' is a YAML 1.1 boolean that popproxy reads as"
            " a string)",
        ),
        (
            "rules:\n  - {name: k}\n",
            "rules/10-x.yaml: rules[0] (k): sets nothing: give action, expire_after_days or"
            " max_size_bytes",
        ),
        (
            "rules:\n  - {action: keep}\n",
            "rules/10-x.yaml: rules[0].name: missing; expected a rule name",
        ),
        (
            "rules:\n  - {name: default, action: keep}\n",
            "rules/10-x.yaml: rules[0].name: 'default' is reserved for messages no rule decided",
        ),
        (
            'rules:\n  - {name: "two words", action: keep}\n',
            "rules/10-x.yaml: rules[0].name: expected a rule name of 1-64 letters, digits, '.',"
            " '_' or '-', starting with a letter or digit",
        ),
        (
            "rules:\n  - {name: k, action: keep, match: {users: alice}}\n",
            "rules/10-x.yaml: rules[0] (k).match.users: expected a list of user name globs, got"
            " the string 'alice' (write [alice])",
        ),
        (
            "rules:\n  - {name: k, action: keep, match: {users: [alcie]}}\n",
            "rules/10-x.yaml: rules[0] (k).match.users[0]: 'alcie' matches no configured user;"
            " did you mean 'alice'?",
        ),
        (
            'rules:\n  - {name: k, action: keep, match: {upstreams: ["prov*", offce]}}\n',
            "rules/10-x.yaml: rules[0] (k).match.upstreams[1]: 'offce' matches no configured"
            " upstream; did you mean 'office'?",
        ),
        (
            "rules:\n  - {name: k, action: keep, match: {users: [demo]}}\n",
            "rules/10-x.yaml: rules[0] (k).match: the rule applies to no configured user: no"
            " user routed to an upstream or fetching from one matches both users and upstreams"
            " (plain Maildir users are not subject to rules)",
        ),
        (
            "rules:\n  - {name: k, action: keep, match: {users: [alice], upstreams: [office]}}\n",
            "rules/10-x.yaml: rules[0] (k).match: the rule applies to no configured user: no"
            " user routed to an upstream or fetching from one matches both users and upstreams"
            " (plain Maildir users are not subject to rules)",
        ),
        (
            "rules:\n  - {name: k, action: keep,"
            " match: {older_than_days: 10, newer_than_days: 10}}\n",
            "rules/10-x.yaml: rules[0] (k).match.newer_than_days: no message is older than 10"
            " and newer than 10 days",
        ),
        (
            "rules:\n  - {name: k, action: hide,"
            " match: {larger_than_bytes: 9, smaller_than_bytes: 10}}\n",
            "rules/10-x.yaml: rules[0] (k).match.smaller_than_bytes: no message is larger than 9"
            " and smaller than 10 bytes",
        ),
        (
            'rules:\n  - {name: k, action: hide, match: {headers: {Subject: "(unclosed"}}}\n',
            "rules/10-x.yaml: rules[0] (k).match.headers.Subject: not a valid RE2 regular"
            " expression: missing ): (unclosed (docs/rules.md, Header patterns)",
        ),
        (
            # Python re syntax that RE2 does not have: a backreference, a lookahead.
            "rules:\n  - {name: k, action: hide, match: {headers: {Subject: '(a)\\1'}}}\n",
            "rules/10-x.yaml: rules[0] (k).match.headers.Subject: not a valid RE2 regular"
            r" expression: invalid escape sequence: \1 (docs/rules.md, Header patterns)",
        ),
        (
            'rules:\n  - {name: k, action: hide, match: {headers: {Subject: "x(?=y)"}}}\n',
            "rules/10-x.yaml: rules[0] (k).match.headers.Subject: not a valid RE2 regular"
            " expression: invalid perl operator: (?= (docs/rules.md, Header patterns)",
        ),
        (
            "rules:\n  - {name: k, action: hide,"
            " match: {headers: {Subject: '[\\p{L}\\p{N}]{1,20}'}}}\n",
            "rules/10-x.yaml: rules[0] (k).match.headers.Subject: the regular expression"
            " compiles to 26863 RE2 instructions, more than 2000; use fewer or smaller counted"
            " repetitions (docs/rules.md, Header patterns)",
        ),
        (
            'rules:\n  - {name: k, action: hide, match: {headers: {Subject: "'
            + "a" * (MAX_HEADER_PATTERN_CHARS + 1)
            + '"}}}\n',
            "rules/10-x.yaml: rules[0] (k).match.headers.Subject: expected a regular"
            f" expression of at most {MAX_HEADER_PATTERN_CHARS} characters",
        ),
        (
            'rules:\n  - {name: k, action: hide, match: {headers: {"Sub ject": x}}}\n',
            "rules/10-x.yaml: rules[0] (k).match.headers.Sub ject: expected a header field"
            " name (printable ASCII, no ':' or space)",
        ),
        (
            "rules:\n  - {name: k, action: hide, match: {headers: {Subject: x, subject: y}}}\n",
            "rules/10-x.yaml: rules[0] (k).match.headers.subject: the same field twice (field"
            " names are case-insensitive)",
        ),
        (
            "rules:\n  - {name: k, action: hide, match: {headers: {Subject: 5}}}\n",
            "rules/10-x.yaml: rules[0] (k).match.headers.Subject: expected a regular"
            " expression, got the number 5",
        ),
        (
            "rules:\n  - {name: k, action: hide, match: {older_than: 3}}\n",
            "rules/10-x.yaml: rules[0] (k).match.older_than: unknown key; did you mean"
            " 'older_than_days'? (expected one of: users,"
            " upstreams, older_than_days, newer_than_days, larger_than_bytes,"
            " smaller_than_bytes, headers)",
        ),
        ("rules: []\n", "rules/10-x.yaml: rules: expected a non-empty list of rules, got a list"),
        (
            "- {name: k, action: keep}\n",
            "rules/10-x.yaml: (top level): expected a mapping with the key rules, got a list"
            " (the rules need rules: above them); expected a rule file's top level to be the"
            " single key rules, holding a list of rules: 'rules:' then one '- name: ...'"
            " item per rule",
        ),
        ("", "rules/10-x.yaml: (top level): expected a mapping of settings, got an empty file"),
        (
            "rules:\n  - {name: k, action: keep, action: hide}\n",
            "rules/10-x.yaml: rules[0].action:"
            " duplicate key (first at line 2, again at line 2); give each key once",
        ),
        (
            "rules: [\n",
            "rules/10-x.yaml: line 2, column 1: not valid YAML: expected the node content,"
            " but found '<stream end>'",
        ),
    ],
)
def test_each_kind_of_mistake_names_file_rule_and_key(text: str, expected: str) -> None:
    rules_file("10-x.yaml", text)
    assert only_problem() == expected


def test_a_badly_named_rule_file_is_an_error_not_skipped() -> None:
    rules_file("scanners.yaml", "rules:\n  - {name: k, action: keep}\n")
    rules_file("5-x.yml", "rules:\n  - {name: j, action: keep}\n")
    found = problems()
    assert found == [
        "rules/5-x.yml: (file): not loaded: a rule file is named NN-name.yaml (two digits, a"
        " dash, a name of letters, digits, '.', '_' or '-'); rename it",
        "rules/scanners.yaml: (file): not loaded: a rule file is named NN-name.yaml (two"
        " digits, a dash, a name of letters, digits, '.', '_' or '-'); rename it",
    ]


def test_rule_names_are_unique_across_files() -> None:
    rules_file("10-a.yaml", "rules:\n  - {name: same, action: keep, match: {older_than_days: 1}}\n")
    rules_file(
        "20-b.yaml", "rules:\n  - {name: other, action: keep}\n  - {name: same, action: hide}\n"
    )
    assert only_problem() == (
        "rules/20-b.yaml: rules[1] (same).name: 'same' is already the name of rules[0] (same)"
        " in 10-a.yaml"
    )


def test_every_problem_of_every_file_is_reported_with_the_configs() -> None:
    Path("popproxy.yaml").write_text(CONFIG + "limits: {max_sesions: 3}\n", encoding="utf-8")
    rules_file("10-a.yaml", "rules:\n  - {name: a, action: kep}\n  - {name: b}\n")
    rules_file("20-b.yaml", "rules:\n  - {name: c, expire_after_days: 99999}\n")
    found = problems()
    assert [line.split(": ")[0] + ": " + line.split(": ")[1] for line in found] == [
        "popproxy.yaml: limits.max_sesions",
        "rules/10-a.yaml: rules[0] (a).action",
        "rules/10-a.yaml: rules[1] (b)",
        "rules/20-b.yaml: rules[0] (c).expire_after_days",
    ]


def test_a_rule_of_users_with_mistakes_of_their_own_gets_no_second_error() -> None:
    broken = CONFIG.replace(f'alice: {{password_hash: "{HASH}"', 'alice: {password_hash: "x"')
    Path("popproxy.yaml").write_text(broken, encoding="utf-8")
    rules_file("10-a.yaml", "rules:\n  - {name: a, action: keep, match: {users: [alice]}}\n")
    assert [problem.split(": ")[1] for problem in problems()] == ["users.alice.password_hash"]


def test_rules_need_an_upstream_user() -> None:
    maildir_only = CONFIG.split("upstreams:", maxsplit=1)[0] + (
        f'users:\n  demo: {{password_hash: "{HASH}", maildir: mail/demo}}\nrules_dir: rules\n'
    )
    Path("popproxy.yaml").write_text(maildir_only, encoding="utf-8")
    rules_file("10-a.yaml", "rules:\n  - {name: a, expire_after_days: 5}\n")
    assert only_problem().startswith("rules/10-a.yaml: rules[0] (a).match: the rule applies to no")


def test_rule_files_and_rules_dir_entries_are_bounded() -> None:
    rules_file("10-big.yaml", "# padding\n" * (MAX_RULE_FILE_BYTES // 10 + 1))
    assert only_problem() == (
        f"rules/10-big.yaml: (file): expected a rule file of at most {MAX_RULE_FILE_BYTES} bytes"
    )
    Path("rules", "10-big.yaml").unlink()
    for number in range(MAX_RULE_FILES + 1):
        rules_file(
            f"{number % 100:02d}-r{number}.yaml", f"rules:\n  - {{name: r{number}, action: keep}}\n"
        )
    assert (
        only_problem() == f"popproxy.yaml: rules_dir: expected at most {MAX_RULE_FILES} rule files"
    )
    for number in range(MAX_RULES_DIR_ENTRIES):
        Path("rules", f"note-{number}.txt").touch()
    assert only_problem() == (
        f"popproxy.yaml: rules_dir: expected at most {MAX_RULES_DIR_ENTRIES} entries in"
        f" {Path.cwd() / 'rules'}"
    )


def test_an_unreadable_rule_file_is_reported() -> None:
    Path("rules", "10-dir.yaml").mkdir()
    assert only_problem().startswith("rules/10-dir.yaml: (file): cannot read the rule file")


# -- issue 16, item 6: messages that say how to fix the mistake ----------------------------


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("kep", "keep"),
        ("delete-after-retrieve", "delete_after_retrieve"),
        ("Delete", "delete"),
        ("hidde", "hide"),
    ],
)
def test_a_mistyped_action_gets_a_did_you_mean(written: str, meant: str) -> None:
    rules_file("10-x.yaml", f"rules:\n  - {{name: k, action: {written}}}\n")
    assert only_problem() == (
        "rules/10-x.yaml: rules[0] (k).action: expected one of keep, delete,"
        f" delete_after_retrieve, hide, got the string {written!r}; did you mean {meant!r}?"
    )


def test_an_action_far_from_any_gets_no_guess() -> None:
    rules_file("10-x.yaml", "rules:\n  - {name: k, action: archive}\n")
    assert only_problem().endswith("got the string 'archive'")


def test_a_rule_at_the_top_level_says_what_the_top_level_must_look_like() -> None:
    rules_file("10-x.yaml", "name: k\naction: keep\n")
    assert only_problem() == (
        "rules/10-x.yaml: (top level): missing rules: the top level holds the keys of a rule"
        " (action, name) instead of a list of rules under rules; expected a rule file's top"
        " level to be the single key rules, holding a list of rules: 'rules:' then one"
        " '- name: ...' item per rule"
    )


def test_a_misspelt_rules_key_gets_a_did_you_mean_and_the_shape() -> None:
    rules_file("10-x.yaml", "rulez:\n  - {name: k, action: keep}\n")
    assert problems() == [
        "rules/10-x.yaml: rulez: unknown key; did you mean 'rules'? (expected one of: rules)",
        "rules/10-x.yaml: rules: missing; expected a rule file's top level to be the single"
        " key rules, holding a list of rules: 'rules:' then one '- name: ...' item per rule",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # a key indented less than its siblings: PyYAML's mark is on that line
            "rules:\n  - name: k\n    action: keep\n   match: {users: [alice]}\n",
            "rules/10-x.yaml: line 4, column 4: not valid YAML: expected <block end>, but found"
            " '<block mapping start>' (hint: this line is indented differently from the lines"
            " above it: the keys of one mapping, and the '- ' items of one list, start in the"
            " same column)",
        ),
        (  # a key indented deeper than its siblings
            "rules:\n  - name: k\n     action: keep\n",
            "rules/10-x.yaml: line 3, column 12: not valid YAML: mapping values are not allowed"
            " here (hint: a 'key:' where a value was expected: this line is indented deeper"
            " than the key above it, or a value that holds ': ' needs quotes)",
        ),
        (
            "rules:\n\t- name: k\n",
            "rules/10-x.yaml: line 2, column 1: not valid YAML: found character '\\t' that"
            " cannot start any token (hint: indent with spaces: YAML does not allow tabs there)",
        ),
    ],
)
def test_a_yaml_indentation_error_points_at_the_line_with_a_hint(text: str, expected: str) -> None:
    rules_file("10-x.yaml", text)
    assert only_problem() == expected
