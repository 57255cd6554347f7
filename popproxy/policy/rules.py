"""The rule model: what a rule matches and what it sets (docs/rules.md).

Values only, built from a rule file's content by ``schema.py`` (the config loader
reads ``rules/*.yaml``) or by tests; a rule file's keys are the fields' names unless
a field's metadata says otherwise. Header patterns are RE2 expressions compiled once,
when a rule is made (``patterns.py`` says why, and why a pattern is refused).
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from popproxy.policy.fields import read_from
from popproxy.policy.headers import Headers
from popproxy.policy.patterns import HeaderPattern

# A rule name is a metrics label value and a log field (DESIGN.md, Metrics): short,
# and from a small alphabet so it needs no quoting anywhere.
MAX_RULE_NAME_CHARS = 64
RULE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The name a decision carries when no rule set its action.
DEFAULT_RULE = "default"
# Rules loaded at once, over all files: each login evaluates the ones that can apply
# to its account for every message, so the bound keeps a login's work small.
MAX_RULES = 1000
# Globs per users/upstreams list and header patterns per rule: a few in practice.
MAX_MATCH_ITEMS = 100
# RFC 2449 §6.7 advertises retention in whole days; ten years is past any real policy,
# and keeps first_seen + N days far from datetime's year-9999 limit.
MAX_DAYS = 3650
# A size bound in a rule: 1 TB is past any mail message (RFC 1939 LIST sizes are
# unbounded); a bigger number is a typo.
MAX_SIZE_BYTES = 10**12


class Action(enum.Enum):
    """What happens to a message and to the client's DELE of it (docs/rules.md, Actions)."""

    KEEP = "keep"  # stays upstream; the client's DELE hides it for this local user
    DELETE = "delete"  # the client's DELE deletes it upstream (RFC 1939 §6 semantics)
    DELETE_AFTER_RETRIEVE = "delete_after_retrieve"  # RETR'd: deleted upstream at QUIT
    HIDE = "hide"  # not shown to the client at all; stays upstream


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A header field whose body (any of its bodies, unfolded) matches ``pattern`` (an RE2
    search, linear in the body's length)."""

    field: str  # lower-cased field name
    pattern: HeaderPattern

    def matches(self, headers: Headers) -> bool:
        """Whether some body of ``field`` in ``headers`` matches; a missing field does not."""
        bodies = headers.get(self.field, ())
        return any(self.pattern.search(body) for body in bodies)


@dataclass(frozen=True, slots=True)
class Match:
    """The conditions of a rule; all that are given must hold. Nothing given: everything.

    ``users`` and ``upstreams`` are globs (fnmatch, case-sensitive) on the local user
    name and the upstream's name in config. Age is the time since the message was
    first seen (the state store's ``first_seen``), size the upstream's LIST size.
    Bounds are strict: ``older_than_days: 30`` matches messages first seen more than
    30 days ago.
    """

    users: tuple[str, ...] = ()
    upstreams: tuple[str, ...] = ()
    older_than_days: int | None = None
    newer_than_days: int | None = None
    larger_than_bytes: int | None = None
    smaller_than_bytes: int | None = None
    headers: tuple[HeaderMatch, ...] = ()

    def applies_to(self, user: str, upstream: str) -> bool:
        """Whether the rule can apply to this local user on this upstream account."""
        return _any_glob(self.users, user) and _any_glob(self.upstreams, upstream)

    @property
    def per_message(self) -> bool:
        """Whether the rule looks at the message (age, size or headers), not only the account."""
        return (
            self.older_than_days is not None
            or self.newer_than_days is not None
            or self.larger_than_bytes is not None
            or self.smaller_than_bytes is not None
            or bool(self.headers)
        )

    def matches_message(self, age: timedelta, size: int, headers: Headers | None) -> bool:
        """Whether the message conditions hold; ``headers`` is None only if no header is asked."""
        if self.older_than_days is not None and not age > timedelta(days=self.older_than_days):
            return False
        if self.newer_than_days is not None and not age < timedelta(days=self.newer_than_days):
            return False
        if self.larger_than_bytes is not None and not size > self.larger_than_bytes:
            return False
        if self.smaller_than_bytes is not None and not size < self.smaller_than_bytes:
            return False
        if self.headers:
            if headers is None:
                raise ValueError("a header rule applies but the candidate has no headers")
            return all(header.matches(headers) for header in self.headers)
        return True


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a rule file: a match and the settings it names (None: not named).

    ``source`` is the file it came from (for check-config and explain). A rule with
    ``continues`` set (``continue: true`` in its file) lets evaluation go on after it
    matches (docs/rules.md, Order).
    """

    name: str
    match: Match = field(default_factory=Match)
    action: Action | None = None
    expire_after_days: int | None = None
    max_size_bytes: int | None = None
    continues: bool = field(default=False, metadata=read_from("continue"))
    source: str = field(default="", metadata=read_from())  # not a key of the rule file

    def __post_init__(self) -> None:
        problem = rule_name_problem(self.name)
        if problem is not None:
            raise ValueError(problem)
        if self.action is None and self.expire_after_days is None and self.max_size_bytes is None:
            raise ValueError(f"rule {self.name!r} sets nothing")

    def summary(self) -> str:
        """One line: the conditions, then the settings (check-config, explain)."""
        match = self.match
        parts = [f"users={','.join(match.users)}"] if match.users else []
        if match.upstreams:
            parts.append(f"upstreams={','.join(match.upstreams)}")
        bounds = (
            ("older_than_days", match.older_than_days),
            ("newer_than_days", match.newer_than_days),
            ("larger_than_bytes", match.larger_than_bytes),
            ("smaller_than_bytes", match.smaller_than_bytes),
        )
        parts.extend(f"{key}={value}" for key, value in bounds if value is not None)
        parts.extend(f"{h.field}=/{h.pattern.source}/" for h in match.headers)
        conditions = " ".join(parts) or "every message"
        settings = [f"action={self.action.value}"] if self.action is not None else []
        if self.expire_after_days is not None:
            settings.append(f"expire_after_days={self.expire_after_days}")
        if self.max_size_bytes is not None:
            settings.append(f"max_size_bytes={self.max_size_bytes}")
        if self.continues:
            settings.append("continue")
        return f"{conditions} -> {' '.join(settings)}"

    def names(self, setting: Setting) -> bool:
        """Whether this rule names ``setting``."""
        return self.setting(setting) is not None

    def setting(self, setting: Setting) -> Action | int | None:
        """The value this rule gives ``setting``, or None if it does not name it."""
        match setting:
            case Setting.ACTION:
                return self.action
            case Setting.EXPIRE_AFTER_DAYS:
                return self.expire_after_days
            case Setting.MAX_SIZE_BYTES:
                return self.max_size_bytes


class Setting(enum.Enum):
    """The settings a rule can name; each message gets one value of each."""

    ACTION = "action"
    EXPIRE_AFTER_DAYS = "expire_after_days"
    MAX_SIZE_BYTES = "max_size_bytes"


def rule_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a rule, or None if it can."""
    if name == DEFAULT_RULE:
        return f"{DEFAULT_RULE!r} is reserved for messages no rule decided"
    if len(name) > MAX_RULE_NAME_CHARS or not RULE_NAME_RE.fullmatch(name):
        return (
            f"expected a rule name of 1-{MAX_RULE_NAME_CHARS} letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return None


def glob_problem(glob: str) -> str | None:
    """Why ``glob`` cannot be a user or upstream glob, or None if it can."""
    if not glob or not glob.isprintable():
        return "expected a non-empty glob of printable characters"
    return None


def _any_glob(globs: Sequence[str], name: str) -> bool:
    return not globs or any(fnmatch.fnmatchcase(name, glob) for glob in globs)
