"""A message's header section, as ``TOP n 0`` returns it (RFC 1939 §7), for header rules.

Pure: bytes in, an immutable :class:`Headers` out. Lines end in CRLF (a bare LF is
accepted too); the header section ends at the first empty line. A line that starts
with a space or a tab continues the field before it, and unfolding removes the line
break in front of it (RFC 5322 §2.2.3). Octets that are not UTF-8 are decoded with
U+FFFD in their place; RFC 2047 encoded words (``=?utf-8?q?...?=``) are decoded, so
a rule matches the text a mail client shows. What lies past :data:`MAX_HEADER_OCTETS`
or :data:`MAX_HEADER_FIELDS` is ignored.
"""

from __future__ import annotations

import email.errors
import email.header
import re
from collections.abc import Iterable, Iterator, Mapping

# Postfix's header_size_limit (102400 octets): the whole header section a mail server
# commonly accepts. Octets past it are not parsed.
MAX_HEADER_OCTETS = 102_400
# Fields kept per message. A header field is at least a name, a colon and CRLF, so
# 102400 octets could hold about 25000 of them; real messages have tens, and a few
# hundred Received lines on a mail loop. Fields past this bound are not parsed.
MAX_HEADER_FIELDS = 1000

# RFC 5322 §3.6.8: a field name is one or more printable US-ASCII characters but ":".
_FIELD_NAME_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_ENCODED_WORD_MARK = "=?"


class Headers(Mapping[str, tuple[str, ...]]):
    """Header fields by lower-cased name; each value is a tuple of unfolded field bodies.

    Immutable and hashable. ``headers["Subject"]`` and ``headers["subject"]`` are the
    same; a field given several times (``Received``) keeps every body, in order.
    """

    __slots__ = ("_fields",)

    _fields: dict[str, tuple[str, ...]]

    def __init__(self, fields: Mapping[str, Iterable[str]] | None = None) -> None:
        collected: dict[str, list[str]] = {}
        for name, values in (fields or {}).items():
            collected.setdefault(name.lower(), []).extend(values)
        object.__setattr__(self, "_fields", {k: tuple(v) for k, v in collected.items()})

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Headers is immutable")

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._fields[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __hash__(self) -> int:
        return hash(frozenset(self._fields.items()))

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


def parse_headers(data: bytes) -> Headers:
    """Parse the header section of a message (the output of ``TOP n 0``, RFC 1939 §7).

    Fields are unfolded (RFC 5322 §2.2.3), decoded as UTF-8 with replacement and
    RFC 2047 encoded words decoded; leading and trailing white space of each body is
    removed. Lines that are neither a field nor a continuation are skipped. Parsing
    stops at the first empty line, after :data:`MAX_HEADER_OCTETS` octets or after
    :data:`MAX_HEADER_FIELDS` fields.
    """
    if len(data) > MAX_HEADER_OCTETS:
        # Only whole lines: a field cut short could match a rule its whole body does not.
        data = data[: data.rfind(b"\n", 0, MAX_HEADER_OCTETS) + 1]
    fields: list[tuple[str, bytearray]] = []
    for raw_line in data.split(b"\n"):
        line = raw_line.removesuffix(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].extend(line)
            continue
        name, colon, body = line.partition(b":")
        name = name.rstrip(b" \t")  # RFC 5322 §4.5.3 obsolete syntax: WSP before ":"
        if not colon or not _FIELD_NAME_RE.fullmatch(name):
            continue
        if len(fields) == MAX_HEADER_FIELDS:
            break
        fields.append((name.decode("ascii"), bytearray(body)))
    out: dict[str, list[str]] = {}
    for field_name, folded in fields:
        out.setdefault(field_name.lower(), []).append(_decode(bytes(folded)))
    return Headers(out)


def _decode(body: bytes) -> str:
    """A field body as text: UTF-8 with replacement, then RFC 2047 encoded words."""
    text = body.decode("utf-8", errors="replace").strip(" \t")
    if _ENCODED_WORD_MARK not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return text  # a malformed or unknown-charset encoded word: match the raw text
