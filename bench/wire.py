"""Pure POP3 helpers of the load generator: where a reply ends, un-stuffing, scripts.

The load generator never parses a reply line by line: it only finds where a reply
ends (the status line's CRLF, or the terminator of a multi-line reply, RFC 1939 §3)
and keeps the octets, which are checked after the timed part.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

TERMINATOR = b"\r\n.\r\n"


@dataclass(frozen=True, slots=True)
class Step:
    """One command of a script and the shape of its reply (RFC 1939 §3)."""

    line: bytes  # the command, CRLF included
    multiline: bool = False

    @property
    def verb(self) -> str:
        """The command's verb, for error messages (never the argument: a password)."""
        return self.line.split(b" ", 1)[0].strip().decode("ascii")


def login_steps(user: str, password: str) -> list[Step]:
    """USER and PASS (RFC 1939 §7)."""
    return [Step(f"USER {user}\r\n".encode()), Step(f"PASS {password}\r\n".encode())]


def session_steps(user: str, password: str) -> list[Step]:
    """The sessions scenario: USER, PASS, STAT, LIST, UIDL, RETR 1, QUIT (issue 7)."""
    return [
        *login_steps(user, password),
        Step(b"STAT\r\n"),
        Step(b"LIST\r\n", multiline=True),
        Step(b"UIDL\r\n", multiline=True),
        Step(b"RETR 1\r\n", multiline=True),
        Step(b"QUIT\r\n"),
    ]


def reply_end(buf: bytes | bytearray, multiline: bool, start: int = 0) -> int | None:
    """The length of the complete reply at the start of ``buf``, or None if incomplete.

    A ``-ERR`` is one line even for a multi-line command (RFC 1939 §3). ``start``
    is where to resume looking for the terminator (what was searched before, less
    four octets), so that a reply arriving in many pieces is scanned once.
    """
    eol = buf.find(b"\r\n")
    if eol < 0:
        return None
    if not multiline or buf.startswith(b"-"):
        return eol + 2
    end = buf.find(TERMINATOR, max(eol, start))
    return None if end < 0 else end + len(TERMINATOR)


def body_of(reply: bytes) -> bytes:
    """The un-stuffed body of a complete multi-line reply, CRLF line ends kept
    (RFC 1939 §3: the terminator dropped, a leading dot removed from each line)."""
    eol = reply.index(b"\r\n") + 2
    body = reply[eol : len(reply) - 3]  # keeps the CRLF before the terminating ".\r\n"
    if body.startswith(b"."):
        body = body[1:]
    return body.replace(b"\r\n.", b"\r\n")


def body_digest(reply: bytes) -> tuple[int, str]:
    """(octets, sha256) of a multi-line reply's un-stuffed body (see ``body_of``)."""
    body = body_of(reply)
    return len(body), hashlib.sha256(body).hexdigest()


def status_ok(reply: bytes) -> bool:
    """Whether a reply's status line is ``+OK``."""
    return reply.startswith(b"+OK")


def first_error(steps: Sequence[Step], replies: Sequence[bytes]) -> str | None:
    """The first reply that is not ``+OK``, as ``VERB: -ERR ...``; None if all are."""
    for step, reply in zip(steps, replies, strict=False):
        if not status_ok(reply):
            line = reply.split(b"\r\n", 1)[0].decode("utf-8", "replace")
            return f"{step.verb}: {line}"
    return None
