"""The typed getters shared by the config and the rule files, and keys taken from dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

from popproxy.config import LimitsConfig, UpstreamConfig, UserConfig
from popproxy.policy.fields import Issues, Section, keys_of, read_from
from popproxy.policy.rules import Match, Rule


@dataclass(frozen=True, slots=True)
class Example:
    name: str = field(metadata=read_from())
    size_bytes: int = 0
    secret: str = field(default="", metadata=read_from("secret_file", "secret_env"))
    wait_seconds: float = 1.0


def test_keys_follow_the_fields_in_order_unless_the_metadata_says_otherwise() -> None:
    assert keys_of(Example) == ("size_bytes", "secret_file", "secret_env", "wait_seconds")


def test_config_sections_take_their_keys_from_their_fields() -> None:
    limits = keys_of(LimitsConfig)
    assert limits[0] == "idle_timeout_seconds"
    assert limits[-1] == "auth_cache_ttl_seconds"
    assert "name" not in keys_of(UpstreamConfig)
    assert keys_of(UserConfig)[-5:-1] == (
        "upstream_password_file",
        "upstream_password_env",
        "upstream_refresh_token_file",
        "fetch",
    )


def test_rule_keys_name_continue_and_not_the_source_file() -> None:
    assert keys_of(Rule) == (
        "name",
        "match",
        "action",
        "expire_after_days",
        "max_size_bytes",
        "continue",
    )
    assert "headers" in keys_of(Match)


def test_an_unknown_key_names_the_closest_known_one() -> None:
    issues = Issues("x.yaml")
    section = Section.of(issues, "limits", {"size_byte": 1, "wait_seconds": 2}, keys_of(Example))
    assert section is not None
    assert section.seconds("wait_seconds", positive=True) == 2.0
    assert [str(issue) for issue in issues.items] == [
        "x.yaml: limits.size_byte: unknown key; did you mean 'size_bytes'?"
        " (expected one of: size_bytes, secret_file, secret_env, wait_seconds)"
    ]


def test_a_value_of_the_wrong_type_is_described_and_not_returned() -> None:
    issues = Issues("x.yaml")
    section = Section(issues, "", {"size_bytes": "0755", "flag": "on"}, ("size_bytes", "flag"))
    assert section.integer("size_bytes", lo=0, hi=10) is None
    assert section.boolean("flag") is None
    assert [issue.message for issue in issues.items] == [
        "expected an integer 0..10, got the string '0755'"
        " (no leading zeros: YAML 1.1 would read this as octal)",
        "expected true or false, got the string 'on' (write true or false: 'on' is a YAML 1.1"
        " boolean that popproxy reads as a string)",
    ]
