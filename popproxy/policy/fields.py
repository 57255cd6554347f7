"""Typed getters over parsed YAML data that report every problem under its key path.

The config loader (``popproxy/config/``) and the rule schema (``schema.py``) share
these, so a key of either file is checked, and its problem worded, the same way:
``popproxy.yaml: limits.max_sessions: expected an integer 1..1000000, got -1``.
They see only plain data (dicts, lists, strings, numbers) and import only the
standard library: they live in ``policy/`` because ``policy/`` may import nothing
outside itself (tests/pop3/test_imports.py), and config may import policy.

The key names of a section come from its dataclass (:func:`keys_of`): a field is read
from the key of its own name unless its metadata names other keys (:func:`read_from`).
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self, TypeVar

_E = TypeVar("_E", bound=enum.Enum)

# YAML 1.1 words that some parsers (and PyYAML by default) read as booleans.
_YAML11_BOOLS = frozenset({"y", "yes", "n", "no", "on", "off"})
# YAML 1.1 base-60 numbers such as 22:22 (= 1342) or 1:30:00.
_SEXAGESIMAL_RE = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")

# The dataclass field metadata key that names the file keys a field is read from.
_KEYS = "popproxy.keys"


def read_from(*keys: str) -> dict[str, tuple[str, ...]]:
    """Field metadata: the field is read from ``keys`` (none: it is not a key in the file)."""
    return {_KEYS: keys}


def keys_of(cls: type[Any]) -> tuple[str, ...]:
    """The keys a section of this dataclass may hold, in field order."""
    return tuple(key for f in fields(cls) for key in f.metadata.get(_KEYS, (f.name,)))


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file: where, and what was expected."""

    file: str
    key_path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key_path}: {self.message}"


@dataclass(slots=True)
class Issues:
    """The problems found so far; several files may share one list (the config and its rules)."""

    file: str
    items: list[ConfigIssue] = field(default_factory=list)

    def add(self, key_path: str, message: str) -> None:
        """Record a problem at ``key_path`` of this file."""
        self.items.append(ConfigIssue(self.file, key_path, message))


def join(path: str, key: str) -> str:
    """The key path of ``key`` inside ``path`` (the top level is "")."""
    return f"{path}.{key}" if path else key


def describe(value: object) -> str:
    """What a parsed value is, for a message: ``the string 'x'``, ``a list``, ``null``."""
    match value:
        case None:
            return "null"
        case bool():
            return "true" if value else "false"
        case int() | float():
            return f"the number {value!r}"
        case str():
            return f"the string {value!r}"
        case list():
            return "a list"
        case dict():
            return "a mapping"
        case _:
            return type(value).__name__


def as_mapping(issues: Issues, path: str, value: object) -> dict[str, object] | None:
    """``value`` as a mapping with string keys, or None (and a problem) if it is not one."""
    if not isinstance(value, dict):
        issues.add(path or "(top level)", f"expected a mapping, got {describe(value)}")
        return None
    out: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(key, bool) or not isinstance(key, str | int):
            issues.add(join(path, str(key)), f"expected a string key, got {describe(key)}")
            continue
        out[str(key)] = item
    return out


class Section:
    """A mapping in the file, with typed getters that report problems under its path."""

    def __init__(
        self,
        issues: Issues,
        path: str,
        data: Mapping[str, object],
        allowed: tuple[str, ...],
        *,
        hints: Mapping[str, str] | None = None,
    ) -> None:
        self.issues = issues
        self.path = path
        self.data = data
        for key in data:
            if key in allowed:
                continue
            hint = (hints or {}).get(key)
            if hint is None:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                hint = f"unknown key{hint} (expected one of: {', '.join(allowed)})"
            issues.add(self.at(key), hint)

    @classmethod
    def of(
        cls,
        issues: Issues,
        path: str,
        value: object,
        allowed: tuple[str, ...],
        *,
        hints: Mapping[str, str] | None = None,
    ) -> Self | None:
        """The section at ``path``, or None (and a problem) if ``value`` is not a mapping."""
        mapping = as_mapping(issues, path, value)
        if mapping is None:
            return None
        return cls(issues, path, mapping, allowed, hints=hints)

    def at(self, key: str) -> str:
        """The key path of ``key`` in this section."""
        return join(self.path, key)

    def has(self, key: str) -> bool:
        """Whether ``key`` is given (null counts as not given)."""
        return self.data.get(key) is not None

    def error(self, key: str, message: str) -> None:
        """Record a problem with ``key`` of this section."""
        self.issues.add(self.at(key), message)

    def missing(self, key: str, what: str) -> None:
        """Record that the required ``key`` is not given."""
        self.error(key, f"missing; expected {what}")

    def raw(self, key: str) -> object:
        """The value of ``key`` as parsed, unchecked (None if not given)."""
        return self.data.get(key)

    def string(self, key: str, *, required: bool = False, what: str = "a string") -> str | None:
        """A non-empty string."""
        value = self.data.get(key)
        if value is None:
            if required:
                self.missing(key, what)
            return None
        if not isinstance(value, str) or not value:
            self.error(key, f"expected {what}, got {describe(value)}")
            return None
        return value

    def integer(self, key: str, *, lo: int, hi: int, required: bool = False) -> int | None:
        """An integer in ``lo..hi``."""
        what = f"an integer {lo}..{hi}"
        value = self.data.get(key)
        if value is None:
            if required:
                self.missing(key, what)
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"expected {what}, got {describe(value)}{_number_hint(value)}")
            return None
        if not lo <= value <= hi:
            self.error(key, f"expected {what}, got {value}")
            return None
        return value

    def seconds(self, key: str, *, positive: bool) -> float | None:
        """A finite number of seconds, 0 or more (greater than 0 if ``positive``)."""
        what = "a number of seconds " + ("greater than 0" if positive else "of 0 or more")
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(key, f"expected {what}, got {describe(value)}{_number_hint(value)}")
            return None
        number = float(value)
        if not math.isfinite(number) or number < 0 or (positive and number == 0):
            self.error(key, f"expected {what}, got {value!r}")
            return None
        return number

    def choice(self, key: str, enum_type: type[_E]) -> _E | None:
        """A value of a string Enum, written as its value."""
        what = "one of " + ", ".join(str(member.value) for member in enum_type)
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            for member in enum_type:
                if member.value == value:
                    return member
        self.error(key, f"expected {what}, got {describe(value)}{_choice_hint(value, enum_type)}")
        return None

    def boolean(self, key: str) -> bool | None:
        """``true`` or ``false`` (YAML 1.1's yes/no/on/off are refused with a hint)."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            hint = ""
            if isinstance(value, str) and value.lower() in _YAML11_BOOLS:
                hint = (
                    f" (write true or false: {value!r} is a YAML 1.1 boolean that"
                    " popproxy reads as a string)"
                )
            self.error(key, f"expected true or false, got {describe(value)}{hint}")
            return None
        return value


def _choice_hint(value: object, enum_type: type[enum.Enum]) -> str:
    """``; did you mean 'keep'?`` for a near miss (a typo, dashes for underscores, case)."""
    if not isinstance(value, str):
        return ""
    values = [str(member.value) for member in enum_type]
    normal = value.strip().lower().replace("-", "_").replace(" ", "_")
    if normal in values:
        return f"; did you mean {normal!r}?"
    close = difflib.get_close_matches(normal, values, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _number_hint(value: object) -> str:
    if not isinstance(value, str):
        return ""
    if _SEXAGESIMAL_RE.fullmatch(value):
        return (
            " (YAML 1.1 reads this as a base-60 number; popproxy does not:"
            " write a plain decimal number)"
        )
    if re.fullmatch(r"[-+]?0[0-9]+", value):
        return " (no leading zeros: YAML 1.1 would read this as octal)"
    if re.fullmatch(r"[-+]?[0-9][0-9_.eE+-]*", value):
        return " (write the number without quotes or underscores)"
    return ""
