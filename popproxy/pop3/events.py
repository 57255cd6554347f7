"""Events that are not commands: body data, SASL challenges, end of stream.

Status replies (``Ok``, ``Err``) live in ``replies``; commands in ``commands``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Data:
    """Content of a multi-line reply, not dot-stuffed (RFC 1939 §3)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StuffedData:
    """Content of a multi-line reply as it is on the wire: already dot-stuffed, without
    the terminator (RFC 1939 §3). A relay passes it on without unstuffing and restuffing.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfData:
    """The end of a multi-line reply (the ``.`` line, RFC 1939 §3)."""


@dataclass(frozen=True, slots=True)
class PoisonedDotLines:
    """The multi-line reply being read held ``count`` lines of a single ``.`` ended by a
    bare LF. They were delivered as content (``.\n`` in ``Data``, stuffed ``..\n`` in
    ``StuffedData``), never as the end (RFC 1939 §3; pop3/dotstuff.py says why). Comes
    once per reply, just before its ``EndOfData``.
    """

    count: int


@dataclass(frozen=True, slots=True)
class SaslChallenge:
    """A ``+ base64`` server challenge in an AUTH exchange (RFC 5034 §4), decoded."""

    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side of the connection."""


class NeedData(enum.Enum):
    """Sentinel: ``next_event`` needs more octets (as in h11)."""

    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA
