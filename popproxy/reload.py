"""What a config reload (SIGHUP) changes, and what it cannot: pure functions on ``Config``.

A reload replaces everything a *new session* reads: users, upstreams, TLS
certificates, ``allow_plaintext_auth``, ``rules_dir`` and the rules read from it
(``policy``), the limits and ``trusted_proxies``. What was bound or opened once at
start (the listening sockets, the metrics exporter, the state store) stays as it is
until a restart; a reload logs those keys as ``restart_required`` and applies the
rest. ``popproxy check-config --against`` uses the same functions, so it predicts
exactly what a reload will do.

No I/O here: the server (serve.py) loads files and TLS contexts, this module
only compares values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeGuard

from popproxy.config import Config, TlsMode
from popproxy.policy import Rule
from popproxy.secret import Secret

# Top-level config keys that only take effect at start: sockets bound, the exporter
# started and the state store opened once. Every other key is reloadable.
RESTART_KEYS = frozenset({"listen", "metrics", "state"})
# Top-level keys a reload applies (tests/test_reload.py checks that every Config
# field is in exactly one of these sets, so a new key needs a decision).
RELOADABLE_KEYS = frozenset(
    {
        "tls",
        "allow_plaintext_auth",
        "upstreams",
        "users",
        "rules_dir",
        "policy",
        "limits",
        "trusted_proxies",
        "gateway",
        "snapshot_dir",
    }
)
# Not settings: where the config was read from, and the files as read.
IGNORED_KEYS = frozenset({"source", "sources"})

# A blocking function that reads and validates the config (raises ConfigError); the
# server runs it in a worker thread on each reload.
ConfigLoader = Callable[[], Config]


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """How the last config load went: for metrics (``popproxy_config_last_reload_*``).

    ``at`` is wall-clock time (``time.time()``), as a Prometheus timestamp gauge wants.
    The initial load at start counts as a successful reload, as in Prometheus itself.
    ``config`` is the config new sessions get after this load: the new one if it
    succeeded, the running one if not (to re-declare upstream names, the session limit).
    """

    ok: bool
    at: float
    config: Config = field(repr=False)
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class NamedChanges:
    """Entries of a named mapping (users, upstreams) added, removed or changed."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


@dataclass(frozen=True, slots=True)
class ConfigChanges:
    """The key paths that differ between two configs, split by what a reload can apply.

    Paths are written as in config errors: ``limits.max_sessions``, ``listen[0].port``,
    ``users.alice.maildir``; an entry added or removed is its own path (``users.bob``).
    """

    reloadable: tuple[str, ...] = ()
    restart_required: tuple[str, ...] = ()
    users: NamedChanges = NamedChanges()
    upstreams: NamedChanges = NamedChanges()

    def __bool__(self) -> bool:
        return bool(self.reloadable or self.restart_required)

    @property
    def sections(self) -> tuple[str, ...]:
        """The reloadable paths with each user and upstream folded into one word (for logs)."""
        out: list[str] = []
        for path in self.reloadable:
            folded = next((k for k in ("users", "upstreams") if path.startswith(k + ".")), path)
            if folded not in out:
                out.append(folded)
        return tuple(out)


def config_changes(old: Config, new: Config) -> ConfigChanges:
    """Which keys of ``new`` differ from ``old``, and which of those need a restart."""
    reloadable: list[str] = []
    restart: list[str] = []
    for key in dataclasses.fields(Config):
        name = key.name
        if name in IGNORED_KEYS:
            continue
        paths = _diff(name, getattr(old, name), getattr(new, name))
        (restart if name in RESTART_KEYS else reloadable).extend(paths)
    return ConfigChanges(
        reloadable=tuple(reloadable),
        restart_required=tuple(restart),
        users=_named_changes(old.users, new.users),
        upstreams=_named_changes(old.upstreams, new.upstreams),
    )


def effective_config(running: Config, new: Config) -> Config:
    """``new`` as a reload applies it: the restart-only keys keep their running values."""
    return dataclasses.replace(new, **{key: getattr(running, key) for key in RESTART_KEYS})


def reload_problem(effective: Config) -> str | None:
    """Why ``effective`` (see :func:`effective_config`) cannot be applied, or None if it can.

    The running listeners stay, so a config that drops the certificate they need
    cannot be applied without a restart.
    """
    tls_listeners = [lst for lst in effective.listen if lst.tls is not TlsMode.NONE]
    if tls_listeners and effective.tls is None:
        return (
            "tls: the running listeners use TLS and need the tls section"
            " (changing listeners needs a restart)"
        )
    if any(lst.proxy_protocol for lst in effective.listen) and not effective.trusted_proxies:
        return (
            "trusted_proxies: the running listeners take PROXY protocol headers and need"
            " trusted proxies (changing listeners needs a restart)"
        )
    return None


def _diff(path: str, old: object, new: object) -> list[str]:
    """Key paths under ``path`` whose values differ (dataclass fields, list items, map keys)."""
    if old == new:
        return []
    if isinstance(old, Secret):
        return [path]  # a value, not a section: never look inside
    if dataclasses.is_dataclass(old) and not isinstance(old, type) and type(old) is type(new):
        out: list[str] = []
        for attribute in dataclasses.fields(old):
            if not attribute.compare:
                continue  # derived from other fields, not a setting of its own
            name = attribute.name
            out += _diff(f"{path}.{name}", getattr(old, name), getattr(new, name))
        return out or [path]
    if _all_rules(old) and _all_rules(new):
        return _diff_rules(path, old, new)
    if isinstance(old, tuple) and isinstance(new, tuple):
        out = []
        for index in range(max(len(old), len(new))):
            item = f"{path}[{index}]"
            if index >= len(old) or index >= len(new):
                out.append(item)
            else:
                out += _diff(item, old[index], new[index])
        return out
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(old.keys() | new.keys(), key=str):
            item = f"{path}.{key}"
            if key not in old or key not in new:
                out.append(item)
            else:
                out += _diff(item, old[key], new[key])
        return out
    return [path]


def _all_rules(value: object) -> TypeGuard[tuple[Rule, ...]]:
    return isinstance(value, tuple) and all(isinstance(item, Rule) for item in value)


def _diff_rules(path: str, old: tuple[Rule, ...], new: tuple[Rule, ...]) -> list[str]:
    """Rules matched by name, each written as check-config writes it: ``rules[0] (erp-drain)``.

    A rule's position is the one in ``new`` (in ``old`` for a removed rule); a rule that
    moved is a change of its own, as the order decides which rule applies.
    """
    old_at = {rule.name: index for index, rule in enumerate(old)}
    new_at = {rule.name: index for index, rule in enumerate(new)}
    out: list[str] = []
    for index, rule in enumerate(new):
        label = f"{path}[{index}] ({rule.name})"
        before = old_at.get(rule.name)
        if before is None:
            out.append(f"{label} (added)")
            continue
        if before != index:
            out.append(f"{label} (was rules[{before}])")
        out += _diff(label, old[before], rule)
    out += [
        f"{path}[{i}] ({rule.name}) (removed)"
        for i, rule in enumerate(old)
        if rule.name not in new_at
    ]
    return out


def _named_changes(old: Mapping[str, object], new: Mapping[str, object]) -> NamedChanges:
    return NamedChanges(
        added=tuple(sorted(new.keys() - old.keys())),
        removed=tuple(sorted(old.keys() - new.keys())),
        changed=tuple(sorted(k for k in old.keys() & new.keys() if old[k] != new[k])),
    )
