"""Status replies and extended response codes (RFC 1939 §3, RFC 2449 §8, RFC 3206)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ResponseCode(enum.Enum):
    """Extended response codes, sent in brackets after ``-ERR`` (RFC 2449 §8)."""

    IN_USE = "IN-USE"  # RFC 2449 §8.1.1: the maildrop is locked by another session
    LOGIN_DELAY = "LOGIN-DELAY"  # RFC 2449 §8.1.2: logging in too often
    SYS_TEMP = "SYS/TEMP"  # RFC 3206 §4: a temporary system problem
    SYS_PERM = "SYS/PERM"  # RFC 3206 §4: a permanent system problem
    AUTH = "AUTH"  # RFC 3206 §5: the credentials are wrong


@dataclass(frozen=True, slots=True)
class Ok:
    """A ``+OK`` status line; ``text`` is human-readable (RFC 1939 §3)."""

    text: str = ""


@dataclass(frozen=True, slots=True)
class Err:
    """A ``-ERR`` status line with an optional extended response code (RFC 2449 §8)."""

    text: str
    code: ResponseCode | None = None
