"""The safe set of login names (RFC 1939 §7 USER, RFC 4616 §2 authcid).

A login name reaches routing, logs and metrics decisions, so it is restricted
before anything looks it up: printable ASCII from ``!`` to ``~`` (0x21-0x7E,
the octets RFC 1939 §7 allows in a UIDL, which every POP3 peer handles), and
beyond ASCII only letters, marks, digits, punctuation and symbols (Unicode
general categories L, M, N, P, S), so internationalized names such as
``jürgen`` or ``用户`` work. Spaces and every kind of control, format
(bidirectional overrides, zero-width characters), separator, surrogate,
private-use or unassigned code point are outside the set. Names are compared
as given, without Unicode normalization (as Dovecot does).

The config loader checks every configured name with the same function, so a
configured user can always log in.
"""

from __future__ import annotations

import unicodedata

from popproxy.pop3.limits import MAX_LOGIN_NAME_OCTETS

# Unicode general categories (first letter) allowed beyond ASCII: letters, marks,
# numbers, punctuation, symbols. Not Z (separators) nor C (control, format,
# surrogate, private use, unassigned).
_SAFE_CATEGORIES = frozenset("LMNPS")


def _safe_char(ch: str) -> bool:
    if ch.isascii():
        return 0x21 <= ord(ch) <= 0x7E
    return unicodedata.category(ch)[0] in _SAFE_CATEGORIES


def login_name_problem(name: str) -> str | None:
    """Why ``name`` is outside the safe set of login names, or None if it is inside."""
    if not name:
        return "a user name must not be empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_LOGIN_NAME_OCTETS:
        return f"a user name must be at most {MAX_LOGIN_NAME_OCTETS} octets of UTF-8"
    if name.isascii() and name.isprintable() and " " not in name:
        return None  # the usual name: every character 0x21-0x7E, checked in C
    if not all(_safe_char(ch) for ch in name):
        return (
            "a user name may hold only printable ASCII (no space) and, beyond ASCII,"
            " letters, marks, digits, punctuation and symbols"
        )
    return None
