"""popproxy.reload: which keys differ between two configs and which need a restart."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from popproxy.config import (
    Config,
    LimitsConfig,
    ListenerConfig,
    MetricsConfig,
    StateConfig,
    TlsConfig,
    TlsMode,
    UpstreamConfig,
    UserConfig,
)
from popproxy.policy import Action, Policy, Rule
from popproxy.reload import (
    IGNORED_KEYS,
    RELOADABLE_KEYS,
    RESTART_KEYS,
    ConfigChanges,
    NamedChanges,
    config_changes,
    effective_config,
    reload_problem,
)
from popproxy.secret import Secret

HASH = "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43


def user(name: str, **fields: Any) -> UserConfig:
    return replace(UserConfig(name, HASH, maildir=Path(f"/mail/{name}")), **fields)


def base_config(**fields: Any) -> Config:
    config = Config(
        source=Path("/etc/popproxy/popproxy.yaml"),
        listen=(ListenerConfig("127.0.0.1", 1110, TlsMode.STARTTLS),),
        tls=TlsConfig(Path("/tls/cert.pem"), Path("/tls/key.pem")),
        allow_plaintext_auth=False,
        upstreams=MappingProxyType(
            {"prov": UpstreamConfig("prov", "pop.example.net", 995, TlsMode.IMPLICIT)}
        ),
        users=MappingProxyType({"alice": user("alice")}),
        state=StateConfig("sqlite:////var/lib/popproxy/state.db"),
        rules_dir=None,
        metrics=MetricsConfig(),
        limits=LimitsConfig(),
    )
    return replace(config, **fields)


def with_users(config: Config, *users: UserConfig) -> Config:
    return replace(config, users=MappingProxyType({u.name: u for u in users}))


def test_every_config_key_is_either_reloadable_or_needs_a_restart() -> None:
    """A new top-level key fails here until someone decides whether a reload applies it."""
    names = {field.name for field in dataclasses.fields(Config)}
    assert names == RESTART_KEYS | RELOADABLE_KEYS | IGNORED_KEYS
    assert not RESTART_KEYS & RELOADABLE_KEYS
    assert not (RESTART_KEYS | RELOADABLE_KEYS) & IGNORED_KEYS


def test_the_same_config_has_no_changes() -> None:
    changes = config_changes(base_config(), base_config())
    assert changes == ConfigChanges()
    assert not changes
    assert not changes.users


def test_a_new_source_path_alone_is_no_change() -> None:
    assert not config_changes(base_config(), base_config(source=Path("/tmp/copy.yaml")))


def test_users_added_removed_and_changed() -> None:
    old = with_users(base_config(), user("alice"), user("carol"))
    new = with_users(base_config(), user("alice", maildir=Path("/elsewhere")), user("bob"))
    changes = config_changes(old, new)
    assert changes.reloadable == ("users.alice.maildir", "users.bob", "users.carol")
    assert changes.restart_required == ()
    assert changes.users == NamedChanges(added=("bob",), removed=("carol",), changed=("alice",))
    assert changes.sections == ("users",)


def test_limits_are_reloadable_field_by_field() -> None:
    new = base_config(limits=LimitsConfig(max_sessions=5, idle_timeout_seconds=700))
    changes = config_changes(base_config(), new)
    assert changes.reloadable == ("limits.idle_timeout_seconds", "limits.max_sessions")
    assert changes.restart_required == ()


@pytest.mark.parametrize(
    ("new_fields", "paths"),
    [
        ({"allow_plaintext_auth": True}, ("allow_plaintext_auth",)),
        ({"rules_dir": Path("/etc/popproxy/rules")}, ("rules_dir",)),
        (
            {"policy": Policy((Rule("scanners", action=Action.KEEP),))},
            ("policy.rules[0] (scanners) (added)",),
        ),
        ({"tls": TlsConfig(Path("/tls/new.pem"), Path("/tls/key.pem"))}, ("tls.cert_file",)),
        ({"tls": None}, ("tls",)),
        (
            {
                "upstreams": MappingProxyType(
                    {"prov": UpstreamConfig("prov", "pop.example.net", 110, TlsMode.STARTTLS)}
                )
            },
            ("upstreams.prov.port", "upstreams.prov.tls"),
        ),
        ({"upstreams": MappingProxyType({})}, ("upstreams.prov",)),
    ],
)
def test_reloadable_keys(new_fields: dict[str, Any], paths: tuple[str, ...]) -> None:
    changes = config_changes(base_config(), base_config(**new_fields))
    assert changes.reloadable == paths
    assert changes.restart_required == ()


def test_rules_are_named_as_check_config_names_them() -> None:
    """A reload's changed= and check-config --against name rules, not positions (issue 16)."""
    scan = Rule("scanners", action=Action.KEEP, source="10-scanners.yaml")
    erp = Rule("erp-drain", action=Action.DELETE_AFTER_RETRIEVE, source="20-erp.yaml")
    old_rule = Rule("old", action=Action.HIDE, source="90-old.yaml")
    old = base_config(policy=Policy((scan, erp, old_rule)))
    new = base_config(
        policy=Policy(
            (
                Rule("new", action=Action.KEEP, source="05-new.yaml"),
                scan,
                Rule("erp-drain", action=Action.KEEP, source="20-erp.yaml"),
            )
        )
    )
    changes = config_changes(old, new)
    assert changes.reloadable == (
        "policy.rules[0] (new) (added)",
        "policy.rules[1] (scanners) (was rules[0])",
        "policy.rules[2] (erp-drain) (was rules[1])",
        "policy.rules[2] (erp-drain).action",
        "policy.rules[2] (old) (removed)",
    )
    assert changes.sections == changes.reloadable


@pytest.mark.parametrize(
    ("new_fields", "paths"),
    [
        ({"listen": (ListenerConfig("127.0.0.1", 2110, TlsMode.STARTTLS),)}, ("listen[0].port",)),
        (
            {"listen": (ListenerConfig("0.0.0.0", 1110, TlsMode.IMPLICIT),)},
            ("listen[0].address", "listen[0].tls"),
        ),
        (
            {
                "listen": (
                    ListenerConfig("127.0.0.1", 1110, TlsMode.STARTTLS),
                    ListenerConfig("127.0.0.1", 1995, TlsMode.IMPLICIT),
                )
            },
            ("listen[1]",),
        ),
        ({"metrics": MetricsConfig(port=9111)}, ("metrics.port",)),
        ({"metrics": None}, ("metrics",)),
        ({"state": StateConfig("sqlite:////srv/state.db")}, ("state.url",)),
    ],
)
def test_keys_that_need_a_restart(new_fields: dict[str, Any], paths: tuple[str, ...]) -> None:
    changes = config_changes(base_config(), base_config(**new_fields))
    assert changes.restart_required == paths
    assert changes.reloadable == ()
    assert changes


def test_a_mixed_change_is_split() -> None:
    new = with_users(
        base_config(
            listen=(ListenerConfig("127.0.0.1", 110, TlsMode.STARTTLS),),
            limits=LimitsConfig(max_sessions=10),
        ),
        user("alice"),
        user("bob"),
    )
    changes = config_changes(base_config(), new)
    assert changes.reloadable == ("users.bob", "limits.max_sessions")
    assert changes.restart_required == ("listen[0].port",)
    assert changes.sections == ("users", "limits.max_sessions")


def test_a_changed_upstream_password_names_the_key_not_the_value() -> None:
    old = with_users(base_config(), user("alice", upstream_password=Secret(b"old-secret")))
    new = with_users(base_config(), user("alice", upstream_password=Secret(b"new-secret")))
    changes = config_changes(old, new)
    assert changes.reloadable == ("users.alice.upstream_password",)
    assert "secret" not in repr(changes)


def test_the_effective_config_keeps_what_needs_a_restart() -> None:
    running = base_config()
    new = with_users(
        base_config(
            listen=(ListenerConfig("0.0.0.0", 110, TlsMode.NONE),),
            metrics=None,
            state=StateConfig("sqlite:////srv/other.db"),
            limits=LimitsConfig(max_sessions=3),
        ),
        user("bob"),
    )
    effective = effective_config(running, new)
    assert effective.listen == running.listen
    assert effective.metrics == running.metrics
    assert effective.state == running.state
    assert effective.limits.max_sessions == 3
    assert set(effective.users) == {"bob"}
    assert not config_changes(new, effective).reloadable


def test_a_config_without_tls_cannot_be_applied_to_tls_listeners() -> None:
    running = base_config()
    new = base_config(listen=(ListenerConfig("127.0.0.1", 1110, TlsMode.NONE),), tls=None)
    problem = reload_problem(effective_config(running, new))
    assert problem is not None
    assert problem.startswith("tls: ")
    assert reload_problem(effective_config(running, base_config())) is None
    plain = base_config(listen=(ListenerConfig("127.0.0.1", 1110, TlsMode.NONE),))
    assert reload_problem(effective_config(plain, replace(plain, tls=None))) is None


def test_trusted_proxies_reload_but_cannot_be_emptied_under_proxy_protocol_listeners() -> None:
    listener = ListenerConfig("127.0.0.1", 1110, TlsMode.NONE, proxy_protocol=True)
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    running = base_config(listen=(listener,), trusted_proxies=trusted)
    moved = replace(running, trusted_proxies=(ipaddress.ip_network("192.0.2.0/24"),))
    assert reload_problem(effective_config(running, moved)) is None
    assert config_changes(running, moved).reloadable == ("trusted_proxies[0]",)
    # a new file without the proxy listener or the trusted list: the listener stays
    emptied = replace(
        running, listen=(replace(listener, proxy_protocol=False),), trusted_proxies=()
    )
    problem = reload_problem(effective_config(running, emptied))
    assert problem is not None
    assert problem.startswith("trusted_proxies: ")
