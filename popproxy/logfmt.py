"""Log formatters: logfmt (one ``key=value`` line per record) and JSON lines.

Callers attach structured fields with ``extra={"fields": {...}}``::

    log.info("session_end", extra={"fields": {"session": sid, "user": "demo"}})

renders as one line (wrapped here)::

    ts=2026-11-26T18:00:00.123Z level=info logger=popproxy.session msg=session_end
    session=ab12 user=demo

Values come from peers (user names, commands), so they are escaped: every control
character, DEL, and the Unicode line and paragraph separators are written as
backslash escapes, so no value can start a new log line or fake a field. A
:class:`~popproxy.secret.Secret` renders as ``***``.
"""

from __future__ import annotations

import datetime
import enum
import functools
import json
import logging
import math
import re
import unicodedata
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import PurePath

from popproxy.secret import Secret

# The keys every line starts with, in this order; a caller's field with one of these
# names is written as "field_<name>" so it cannot overwrite them.
BASE_KEYS = ("ts", "level", "logger", "msg")

# logfmt has no spec; this follows the Go logfmt package (github.com/go-logfmt/logfmt):
# a value is quoted when it is empty or contains a space, '=', '"' or a control
# character. Keys are restricted to a safe alphabet instead of being escaped.
_KEY_RE = re.compile(r"[^A-Za-z0-9_.\-]")
_BARE_VALUE_RE = re.compile(r'[^\s"=\\]+')
_ASCII_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# The common case decided by one match: printable ASCII but for space, quote, '=' and
# backslash is a bare value (no whitespace, nothing to escape).
_PLAIN_BARE_RE = re.compile(r"[!#-<>-\[\]-~]+")
# Keys come from the code (a few dozen names), so their sanitised forms are kept.
KEYS_CACHED = 1024
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}
# Unicode categories escaped even though they are not ASCII controls: C1 controls and
# the rest of Cc, format characters (bidi overrides), line/paragraph separators,
# surrogates (from undecodable bytes), private use and unassigned code points.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def logfmt_pairs(fields: Mapping[str, object]) -> str:
    """Render ``fields`` as ``key=value`` pairs separated by single spaces, in order."""
    # An int, or a str that is one plain bare word, is written as it is without a call
    # to ``_value`` (which gives the same): most of a session_end line's values.
    plain = _PLAIN_BARE_RE.fullmatch
    return " ".join(
        [
            f"{_key(key)}={value}"
            if type(value) is int or (type(value) is str and plain(value))
            else f"{_key(key)}={_value(value)}"
            for key, value in fields.items()
        ]
    )


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The base keys and the caller's ``extra={"fields": ...}`` of ``record``, in output order."""
    out: dict[str, object] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields = getattr(record, "fields", None)
    if isinstance(fields, Mapping):
        for key, value in fields.items():
            name = str(key)
            out[f"field_{name}" if name in BASE_KEYS else name] = value
    if record.exc_info and record.exc_info[0] is not None:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    if record.stack_info:
        out["stack"] = record.stack_info
    return out


# The session a line is about, for every line logged while that session's task runs
# (the upstream connection, the login, the retention steps it drives): set by
# ``Session.run``, inherited by nothing but that task and the worker threads it waits
# on (trio copies the context into both).
SESSION_ID: ContextVar[str | None] = ContextVar("popproxy_session_id", default=None)


class SessionFilter(logging.Filter):
    """Adds ``session=`` to every line logged on a session's behalf that lacks one, so a
    line of a lower layer (``upstream_tls_failed``) is traced to its session and user."""

    def filter(self, record: logging.LogRecord) -> bool:
        session = SESSION_ID.get()
        if session is not None:
            fields = getattr(record, "fields", None)
            fields = fields if isinstance(fields, Mapping) else {}
            if "session" not in fields:
                record.fields = {"session": session, **fields}
        return True


class LogfmtFormatter(logging.Formatter):
    """Format a record as one logfmt line: ``ts=... level=... logger=... msg=... fields...``."""

    def format(self, record: logging.LogRecord) -> str:
        return logfmt_pairs(record_fields(record))


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object on one line, with the same keys as logfmt."""

    def format(self, record: logging.LogRecord) -> str:
        data = {key: _json_value(value) for key, value in record_fields(record).items()}
        # ensure_ascii escapes every non-ASCII character, so U+2028 and friends cannot
        # break a line either; json escapes all ASCII control characters.
        return json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


# The fraction of a second past which ``fromtimestamp`` may round up to the next
# second (it keeps microseconds): such a time takes the uncached path.
_ROUNDS_UP = 0.999999


def _timestamp(record: logging.LogRecord) -> str:
    created = record.created
    second = int(created)
    if created - second < _ROUNDS_UP:
        return _second(second) + f".{int(record.msecs):03d}Z"
    when = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"


@functools.lru_cache(maxsize=1)
def _second(second: int) -> str:
    """The ISO 8601 text of a whole second (lines come in bursts within one second)."""
    when = datetime.datetime.fromtimestamp(second, tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S")


@functools.lru_cache(maxsize=KEYS_CACHED)
def _key(key: str) -> str:
    return _KEY_RE.sub("_", key) or "_"


def _text(value: object) -> str:
    match value:
        case None:
            return "-"
        case bool():
            return "true" if value else "false"
        case Secret():
            return "***"
        case bytes() | bytearray():
            return bytes(value).decode("utf-8", "backslashreplace")
        case enum.Enum():
            return str(value.value)
        case float():
            return repr(value) if math.isfinite(value) else str(value)
        case _:
            return str(value)


def _value(value: object) -> str:
    kind = type(value)
    if kind is int:  # digits and a sign: always bare (not bool, not an enum)
        return str(value)
    # Exactly a str (a str-valued Enum is a str too, and renders as its value).
    text = value if kind is str and isinstance(value, str) else _text(value)
    if _PLAIN_BARE_RE.fullmatch(text):
        return text
    if _BARE_VALUE_RE.fullmatch(text) and not _needs_escape(text):
        return text
    return '"' + "".join(_escape_char(ch) for ch in text) + '"'


def _needs_escape(text: str) -> bool:
    if _ASCII_CONTROL_RE.search(text):
        return True
    return not text.isascii() and any(
        not ch.isascii() and unicodedata.category(ch) in _ESCAPED_CATEGORIES for ch in text
    )


def _escape_char(ch: str) -> str:
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if (
        code < 0x20
        or code == 0x7F
        or (code >= 0x80 and unicodedata.category(ch) in _ESCAPED_CATEGORIES)
    ):
        if code <= 0xFF:
            return f"\\x{code:02x}"
        if code <= 0xFFFF:
            return f"\\u{code:04x}"
        return f"\\U{code:08x}"
    return ch


def _json_value(value: object) -> object:
    match value:
        case None | bool() | int() | str():
            return value
        case float():
            return value if math.isfinite(value) else str(value)
        case PurePath():
            return str(value)
        case _:
            return _text(value)
