"""A rule file's parsed content -> :class:`Rule` objects, every problem named (docs/rules.md).

The config loader reads ``rules_dir/NN-name.yaml`` (YAML stays outside ``policy/``)
and hands each file's data to :class:`RuleSchema`, which checks it and builds the
rules. Each problem names the rule file, the rule (index and name) and the key:
``rules/10-keep.yaml: rules[0] (keep-all).match.users[0]: 'bob' matches no
configured user``. Globs are checked against the users and upstreams as written in
the config, so a user with a mistake of its own does not also make its rules fail.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from popproxy.policy.fields import Issues, Section, as_mapping, describe, keys_of
from popproxy.policy.patterns import compile_header_pattern
from popproxy.policy.rules import (
    MAX_DAYS,
    MAX_MATCH_ITEMS,
    MAX_SIZE_BYTES,
    Action,
    HeaderMatch,
    Match,
    Rule,
    glob_problem,
    rule_name_problem,
)

# RFC 5322 §3.6.8: a header field name is printable US-ASCII without ":".
_FIELD_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_RULE_KEYS = keys_of(Rule)
# What every rule file's top level looks like, for the messages of a wrong one.
RULE_FILE_SHAPE = (
    "a rule file's top level to be the single key rules, holding a list of rules:"
    " 'rules:' then one '- name: ...' item per rule"
)
_MATCH_KEYS = keys_of(Match)


@dataclass(frozen=True, slots=True)
class DeclaredAccounts:
    """Users (with the upstreams each reaches as written: its proxy upstream or its
    gateway sources' upstreams; none for a plain Maildir user) and upstream names."""

    users: Mapping[str, tuple[str, ...]]
    upstreams: frozenset[str]

    @classmethod
    def written(cls, raw_users: object, raw_upstreams: object) -> DeclaredAccounts:
        """The accounts as the config's ``users`` and ``upstreams`` write them, unchecked."""
        upstreams = (
            frozenset(str(k) for k in raw_upstreams)
            if isinstance(raw_upstreams, dict)
            else frozenset()
        )
        users: dict[str, tuple[str, ...]] = {}
        if isinstance(raw_users, dict):
            for user, item in raw_users.items():
                entry = item if isinstance(item, dict) else {}
                sources = entry.get("fetch")
                reached = [entry.get("upstream")]
                if isinstance(sources, list):
                    reached += [s.get("upstream") for s in sources if isinstance(s, dict)]
                users[str(user)] = tuple(up for up in reached if isinstance(up, str))
        return cls(users, upstreams)


class RuleSchema:
    """Builds the rules of the rule files of one rules_dir, file by file, in order.

    Rule names are unique over all the files: a second use names the first.
    """

    def __init__(self, known: DeclaredAccounts) -> None:
        self.known = known
        self._first_use: dict[str, str] = {}

    def rules_of(self, data: object, issues: Issues, file_name: str) -> list[Rule]:
        """The rules of one file's parsed content (problems go to ``issues``)."""
        shape = _top_level_problem(data)
        if shape is not None:
            issues.add("(top level)", f"{shape}; expected {RULE_FILE_SHAPE}")
            return []
        section = Section.of(issues, "", data, ("rules",))
        if section is None:
            return []
        items = section.raw("rules")
        if items is None:
            section.missing("rules", RULE_FILE_SHAPE)
            return []
        if not isinstance(items, list) or not items:
            section.error("rules", f"expected a non-empty list of rules, got {describe(items)}")
            return []
        out: list[Rule] = []
        for index, item in enumerate(items):
            rule = self._rule(issues, index, item, file_name)
            if rule is not None:
                out.append(rule)
        return out

    def _rule(self, issues: Issues, index: int, item: object, file_name: str) -> Rule | None:
        """One rule of a rule file, or None (with its problems in ``issues``)."""
        raw_name = item.get("name") if isinstance(item, dict) else None
        label = f"rules[{index}]"
        if isinstance(raw_name, str) and rule_name_problem(raw_name) is None:
            label = f"{label} ({raw_name})"
        section = Section.of(issues, label, item, _RULE_KEYS)
        if section is None:
            return None
        errors_before = len(issues.items)
        name = section.string("name", required=True, what="a rule name")
        if name is not None:
            problem = rule_name_problem(name)
            if problem is not None:
                section.error("name", problem)
            elif name in self._first_use:
                section.error("name", f"{name!r} is already the name of {self._first_use[name]}")
            else:
                self._first_use[name] = f"{label} in {file_name}"
        match = _rule_match(section, self.known)
        action = section.choice("action", Action)
        expire = section.integer("expire_after_days", lo=1, hi=MAX_DAYS)
        max_size = section.integer("max_size_bytes", lo=0, hi=MAX_SIZE_BYTES)
        continues = section.boolean("continue")
        if not any(section.has(key) for key in ("action", "expire_after_days", "max_size_bytes")):
            issues.add(label, "sets nothing: give action, expire_after_days or max_size_bytes")
        if name is None or match is None or len(issues.items) > errors_before:
            return None
        return Rule(
            name=name,
            match=match,
            action=action,
            expire_after_days=expire,
            max_size_bytes=max_size,
            continues=bool(continues),
            source=file_name,
        )


def _top_level_problem(data: object) -> str | None:
    """What is wrong with a rule file's top level when it lacks ``rules:``, or None.

    A list of rules without ``rules:`` above it, and a single rule's keys at the top
    level, are the two shapes people write by mistake; each gets its own wording.
    """
    if isinstance(data, list):
        return (
            "expected a mapping with the key rules, got a list (the rules need rules: above them)"
        )
    if not isinstance(data, dict) or "rules" in data:
        return None
    rule_keys = sorted(str(key) for key in data if str(key) in _RULE_KEYS)
    if rule_keys:
        return (
            f"missing rules: the top level holds the keys of a rule ({', '.join(rule_keys)})"
            " instead of a list of rules under rules"
        )
    return None  # unknown keys (a misspelt rules) are named, with a "did you mean", below


def _rule_match(rule: Section, known: DeclaredAccounts) -> Match | None:
    """The ``match`` mapping of a rule; a rule without one matches every message."""
    if not rule.has("match"):
        match = Match()
    else:
        section = Section.of(rule.issues, rule.at("match"), rule.raw("match"), _MATCH_KEYS)
        if section is None:
            return None
        errors_before = len(rule.issues.items)
        users = _globs(section, "users", "user", known.users)
        upstreams = _globs(section, "upstreams", "upstream", known.upstreams)
        match = Match(
            users=users,
            upstreams=upstreams,
            older_than_days=section.integer("older_than_days", lo=0, hi=MAX_DAYS),
            newer_than_days=section.integer("newer_than_days", lo=1, hi=MAX_DAYS),
            larger_than_bytes=section.integer("larger_than_bytes", lo=0, hi=MAX_SIZE_BYTES),
            smaller_than_bytes=section.integer("smaller_than_bytes", lo=1, hi=MAX_SIZE_BYTES),
            headers=_header_matches(section),
        )
        _refuse_empty_ranges(section, match)
        if len(rule.issues.items) > errors_before:
            return None
    if not any(
        match.applies_to(user, up) for user, reached in known.users.items() for up in reached
    ):
        rule.error(
            "match",
            "the rule applies to no configured user: no user routed to an upstream or"
            " fetching from one matches both users and upstreams (plain Maildir users are"
            " not subject to rules)",
        )
    return match


def _globs(section: Section, key: str, what: str, names: Collection[str]) -> tuple[str, ...]:
    value = section.raw(key)
    if value is None:
        return ()
    expected = f"a list of {what} name globs"
    if isinstance(value, str):
        section.error(key, f"expected {expected}, got {describe(value)} (write [{value}])")
        return ()
    if not isinstance(value, list) or not value or len(value) > MAX_MATCH_ITEMS:
        section.error(key, f"expected {expected} (1-{MAX_MATCH_ITEMS}), got {describe(value)}")
        return ()
    globs: list[str] = []
    for position, glob in enumerate(value):
        path = f"{key}[{position}]"
        problem = (
            glob_problem(glob)
            if isinstance(glob, str)
            else f"expected a glob, got {describe(glob)}"
        )
        if problem is not None:
            section.error(path, problem)
        elif not any(fnmatch.fnmatchcase(name, glob) for name in names):
            close = difflib.get_close_matches(glob, sorted(names), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            section.error(path, f"{glob!r} matches no configured {what}{hint}")
        else:
            globs.append(glob)
    return tuple(globs)


def _header_matches(section: Section) -> tuple[HeaderMatch, ...]:
    value = section.raw("headers")
    if value is None:
        return ()
    what = "a mapping of header field name to regular expression"
    mapping = as_mapping(section.issues, section.at("headers"), value)
    if mapping is None:
        return ()
    if not mapping or len(mapping) > MAX_MATCH_ITEMS:
        section.error("headers", f"expected {what} (1-{MAX_MATCH_ITEMS} fields)")
        return ()
    seen: set[str] = set()
    out: list[HeaderMatch] = []
    for field_name, pattern in mapping.items():
        path = f"headers.{field_name}"
        if not _FIELD_NAME_RE.fullmatch(field_name):
            section.error(path, "expected a header field name (printable ASCII, no ':' or space)")
            continue
        if field_name.lower() in seen:
            section.error(path, "the same field twice (field names are case-insensitive)")
            continue
        seen.add(field_name.lower())
        if not isinstance(pattern, str):
            section.error(path, f"expected a regular expression, got {describe(pattern)}")
            continue
        compiled = compile_header_pattern(pattern)
        if isinstance(compiled, str):
            section.error(path, compiled)
            continue
        out.append(HeaderMatch(field_name.lower(), compiled))
    return tuple(out)


def _refuse_empty_ranges(section: Section, match: Match) -> None:
    """A pair of bounds no message can meet is a mistake, not a rule."""
    older, newer = match.older_than_days, match.newer_than_days
    if older is not None and newer is not None and newer <= older:
        section.error(
            "newer_than_days",
            f"no message is older than {older} and newer than {newer} days",
        )
    larger, smaller = match.larger_than_bytes, match.smaller_than_bytes
    if larger is not None and smaller is not None and smaller <= larger + 1:
        section.error(
            "smaller_than_bytes",
            f"no message is larger than {larger} and smaller than {smaller} bytes",
        )
