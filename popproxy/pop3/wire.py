"""Status line formatting and parsing, shared by both roles (RFC 1939 §3, RFC 2449 §8)."""

from __future__ import annotations

import base64
import re

from popproxy.pop3.errors import LocalProtocolError
from popproxy.pop3.limits import MAX_REPLY_LINE_OCTETS
from popproxy.pop3.replies import Err, Ok, ResponseCode

# An octet no line may hold: a control character (a line end included) or DEL.
CONTROL_OCTET = re.compile(rb"[\x00-\x1f\x7f]")


def format_status(reply: Ok | Err) -> bytes:
    """Render ``+OK text`` or ``-ERR [CODE] text`` with CRLF."""
    text = reply.text
    if type(reply) is Ok:  # every reply's path: by exact type, no f-string for the head
        line = ("+OK " + text if text else "+OK").encode("utf-8")
    else:
        code = reply.code  # type: ignore[union-attr]
        head = "-ERR" if code is None else f"-ERR [{code.value}]"
        line = (f"{head} {text}" if text else head).encode("utf-8")
    if len(line) + 2 > MAX_REPLY_LINE_OCTETS or CONTROL_OCTET.search(line) is not None:
        raise LocalProtocolError(f"status line not sendable: {line[:60]!r}")
    return line + b"\r\n"


def format_challenge(data: bytes) -> bytes:
    """Render a SASL challenge line ``+ base64`` (RFC 5034 §4)."""
    return b"+ " + base64.b64encode(data) + b"\r\n"


def parse_status(line: bytes) -> Ok | Err | None:
    """Parse a status line without its line end; None if it is not one."""
    if line == b"+OK" or line.startswith(b"+OK "):
        return Ok(line[4:].decode("utf-8", errors="replace"))  # _text, inline: every reply
    if line == b"-ERR" or line.startswith(b"-ERR "):
        text = _text(line[5:])
        if text.startswith("["):
            raw_code, bracket, rest = text[1:].partition("]")
            if bracket:
                try:
                    return Err(rest.lstrip(" "), ResponseCode(raw_code.upper()))
                except ValueError:
                    pass  # an unknown code stays part of the text
        return Err(text)
    return None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")
