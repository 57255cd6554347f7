"""Pure parsers of what an upstream server answers the client role (RFC 1939, 2449, 3206).

The client core (``client.py``) frames replies into status lines and body
chunks; this module gives those bodies and statuses a meaning: the CAPA list
(RFC 2449 §5), the UIDL and LIST listings (RFC 1939 §5, §7), the multi-line body
split into bounded lines, and the mapping of a login's ``-ERR`` to what the
local client hears (RFC 3206). No I/O: the upstream connection module
(``maildrop/connection.py``) feeds them, and each parser is tested here with
hypothesis (tests/pop3/test_client_replies.py). A reply that breaks a rule
raises ``ListingError`` (a ``ValueError``) whose text is the logged reason.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.limits import MAX_UIDL_OCTETS
from popproxy.pop3.replies import Err, ResponseCode

# A CAPA listing longer than this many lines is an upstream fault (RFC 2449 §5 lists
# a dozen capabilities; real servers send fewer than 20).
MAX_CAPABILITY_LINES = 64
# A maildrop with more messages than this is refused: its listing alone would hold
# tens of megabytes per session. Far above any POP3 mailbox in practice.
MAX_UPSTREAM_MESSAGES = 200_000
# Bound on the octets of one listing (UIDL or LIST): every message's line at its
# longest ("NNNNNN " and a 70-octet UID, RFC 1939 §7, with CRLF) fits.
MAX_LISTING_OCTETS = MAX_UPSTREAM_MESSAGES * 80

# A CAPA reply: each capability's tag, upper-cased, and its arguments (RFC 2449 §5).
Capabilities = Mapping[str, tuple[str, ...]]


class ListingError(ValueError):
    """A multi-line reply or a listing breaks RFC 1939 or a bound; the text is the reason."""


def parse_capabilities(lines: Sequence[bytes]) -> dict[str, tuple[str, ...]]:
    """CAPA lines as ``{TAG: (arguments...)}``, tags upper-cased (RFC 2449 §5)."""
    out: dict[str, tuple[str, ...]] = {}
    for raw in lines:
        words = raw.decode("ascii", "replace").split()
        if words:
            out[words[0].upper()] = tuple(words[1:])
    return out


class BodyLines:
    """Splits a multi-line reply's body, fed in chunks, into bounded lines (RFC 1939 §3).

    At most ``max_lines`` lines and ``max_octets`` in all, each no longer than
    ``max_line_octets`` line end included (RFC 2449 §4): checked as chunks arrive,
    so memory stays bounded whatever the upstream sends.
    """

    __slots__ = ("_lines", "_max_line_octets", "_max_lines", "_max_octets", "_partial", "_total")

    def __init__(self, *, max_lines: int, max_line_octets: int, max_octets: int) -> None:
        self._max_lines = max_lines
        self._max_line_octets = max_line_octets
        self._max_octets = max_octets
        self._lines: list[bytes] = []
        self._partial = bytearray()
        self._total = 0

    def feed(self, data: bytes | bytearray) -> None:
        """Take the next chunk of the (un-stuffed) body; raises ``ListingError``."""
        self._partial += data
        partial = self._partial
        end = partial.rfind(b"\n") + 1  # the octets of the lines this chunk completed
        rest = partial[end:]
        if end:
            # The complete lines at once, not one by one (a listing of 100,000 lines
            # arrives in about 100 chunks): split at CRLF when every line ends so (the
            # usual case), else at LF, taking one CR off each line. ``longest`` is the
            # longest line with its end.
            done = bytes(partial[:end])
            lines: list[bytes]
            if done.count(b"\n") == done.count(b"\r\n"):
                lines = done[:-2].split(b"\r\n")
                longest = max(map(len, lines)) + 2
            else:
                raw = done[:-1].split(b"\n")
                longest = max(map(len, raw)) + 1
                lines = [line.removesuffix(b"\r") for line in raw]
            if longest > self._max_line_octets:
                raise ListingError("listing line too long")
            self._total += end
            self._lines += lines
        if len(rest) >= self._max_line_octets:
            raise ListingError("listing line too long")
        if len(self._lines) > self._max_lines or self._total > self._max_octets:
            raise ListingError("listing too long")
        self._partial = rest

    def finish(self) -> list[bytes]:
        """The lines without their ends, once the body has ended."""
        if self._partial:  # the unstuffer ends every body with a line end
            raise ListingError("listing ends inside a line")
        return self._lines


class ListedMessage(NamedTuple):
    """One message of an upstream's listing: its number, UID and size (RFC 1939 §5, §7).

    A named tuple, not a frozen dataclass: a listing may have 100,000 of them, and a
    tuple is built in C (about half the time of a frozen dataclass here).
    """

    number: int
    uid: str
    size: int


def _parse_listing(lines: Sequence[bytes]) -> dict[int, bytes]:
    """``n value`` lines of a LIST or UIDL listing (RFC 1939 §5, §7) as ``{n: value}``."""
    out: dict[int, bytes] = {}
    for line in lines:
        words = line.split()
        if len(words) != 2 or not words[0].isdigit():
            raise ListingError("malformed listing line")
        out[int(words[0])] = words[1]
    if len(out) != len(lines):  # a number listed twice
        raise ListingError("malformed listing line")
    return out


# The octets a unique-id may hold (RFC 1939 §7: 0x21..0x7E).
_UID_OCTETS = bytes(range(0x21, 0x7F))


def _valid_uid(uid: bytes) -> bool:
    """RFC 1939 §7: 1 to 70 octets in 0x21..0x7E (deleting those leaves nothing)."""
    return 0 < len(uid) <= MAX_UIDL_OCTETS and not uid.translate(None, _UID_OCTETS)


def parse_listings(uidl: Sequence[bytes], sizes: Sequence[bytes]) -> list[ListedMessage]:
    """The messages of a UIDL and a LIST listing together, in upstream order.

    Raises ``ListingError`` when the listings disagree or break RFC 1939 §5/§7:
    the same numbers in both, positive, each UID valid and unique, each size a number.
    """
    numbers: Sequence[int]
    texts: Sequence[str]
    uid_words = _in_order(uidl, _UID_OCTETS)
    size_words = _in_order(sizes, _DIGITS)
    if uid_words is not None and size_words is not None and len(uid_words) == len(size_words):
        # Numbered 1..n, every UID's octets and every size's digits already checked.
        numbers = range(1, len(uid_words) + 1)
        texts = uid_words
        octets: Sequence[str | bytes] = size_words
        if texts and (max(map(len, texts)) > MAX_UIDL_OCTETS or len(set(texts)) != len(texts)):
            raise ListingError("invalid listing entry")
    else:
        uids = _parse_listing(uidl)
        lengths = _parse_listing(sizes)
        if uids.keys() != lengths.keys():
            raise ListingError("UIDL and LIST list different messages")
        numbers = sorted(uids)
        values = [uids[number] for number in numbers]
        raw_sizes = [lengths[number] for number in numbers]
        if not values:
            return []
        # Checked over the whole listing at once (a listing may have 100,000 entries):
        # joined by spaces, which a UID cannot hold, so deleting the octets a UID may
        # hold leaves the spaces alone.
        joined = b" ".join(values)
        if (
            numbers[0] == 0
            or max(map(len, values)) > MAX_UIDL_OCTETS
            or len(joined.translate(None, _UID_OCTETS)) != len(values) - 1
            or len(set(values)) != len(values)
            or not all(map(bytes.isdigit, raw_sizes))
        ):
            raise ListingError("invalid listing entry")
        texts = joined.decode("ascii").split(" ")
        octets = raw_sizes
    # Each (number, uid, size) made a ListedMessage by tuple.__new__ itself, as the named
    # tuple's own constructor does, without a Python call per message.
    fields = zip(numbers, texts, map(int, octets), strict=True)
    return list(map(_new_tuple, repeat(ListedMessage), fields))


_new_tuple = tuple.__new__

# The octets a size may hold.
_DIGITS = b"0123456789"


def _in_order(lines: Sequence[bytes], octets: bytes) -> list[str] | None:
    """The values of a listing whose lines are ``1 value``, ``2 value``... in order,
    each one space between number and value, no other white space, and every octet
    of the lines one of ``octets`` (digits among them), as text: what servers send,
    checked over the whole listing at once. None for any other listing, which
    ``_parse_listing`` then parses (or refuses) line by line."""
    count = len(lines)
    if not count:
        return []
    joined = b"\n".join(lines)
    # Deleting the octets a number or value may hold leaves each line's one space and
    # the line ends, exactly, if nothing else is there (a line holds no LF of its own).
    if joined.translate(None, octets) != _skeleton(count):
        return None
    words = joined.decode("ascii").split()  # each line's number and value
    if len(words) != 2 * count or " ".join(words[0::2]) != _decimals(count):
        return None  # an empty number or value, or numbers out of order
    return words[1::2]


@functools.lru_cache(maxsize=1)  # a login asks twice (UIDL, LIST); the next login again
def _skeleton(count: int) -> bytes:
    """``count`` lines of one space each, joined by LF (at most MAX_UPSTREAM_MESSAGES)."""
    return b" \n" * (count - 1) + b" "


@functools.lru_cache(maxsize=1)  # a login asks twice (UIDL, LIST); the next login again
def _decimals(count: int) -> str:
    """``"1 2 3 ... count"`` (at most MAX_UPSTREAM_MESSAGES numbers: 1.3 MB)."""
    return " ".join(map(str, range(1, count + 1)))


@dataclass(frozen=True, slots=True)
class ClientReply:
    """What the local client hears for an upstream failure (RFC 3206), and why."""

    failure: UpstreamFailure
    code: ResponseCode | None
    text: str


# RFC 3206 mapping, from the client's point of view: its own password was right.
UNAVAILABLE = "The mail provider is unavailable, try again later."
CREDENTIALS_REJECTED = (
    "The mail provider rejected popproxy's stored credentials; contact your administrator."
)


def login_refusal(reply: Err) -> ClientReply:
    """Map an upstream login ``-ERR`` to the client's reply (RFC 3206, RFC 2449 §8.1)."""
    match reply.code:
        case ResponseCode.IN_USE:
            return ClientReply(
                UpstreamFailure.IN_USE, ResponseCode.IN_USE, "The mailbox is in use upstream."
            )
        case ResponseCode.LOGIN_DELAY:
            return ClientReply(
                UpstreamFailure.LOGIN_DELAY,
                ResponseCode.LOGIN_DELAY,
                "The mail provider asks to wait before logging in again.",
            )
        case ResponseCode.SYS_TEMP:
            return ClientReply(UpstreamFailure.REJECTED, ResponseCode.SYS_TEMP, UNAVAILABLE)
        case _:
            # [AUTH], [SYS/PERM] or no code: the stored credentials do not work, and
            # asking the client for its own (correct) password again would not help.
            return ClientReply(
                UpstreamFailure.AUTH_REJECTED, ResponseCode.SYS_PERM, CREDENTIALS_REJECTED
            )
