"""Status line formatting and parsing (popproxy.pop3.wire)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pop3_helpers import FAST

from popproxy.pop3.errors import LocalProtocolError
from popproxy.pop3.limits import MAX_REPLY_LINE_OCTETS
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.pop3.wire import format_challenge, format_status, parse_status

FORMATS = [
    (Ok(), b"+OK\r\n"),
    (Ok("2 320"), b"+OK 2 320\r\n"),
    (Err("no"), b"-ERR no\r\n"),
    (Err("", ResponseCode.AUTH), b"-ERR [AUTH]\r\n"),
    (Err("locked", ResponseCode.IN_USE), b"-ERR [IN-USE] locked\r\n"),
    (Err("later", ResponseCode.LOGIN_DELAY), b"-ERR [LOGIN-DELAY] later\r\n"),
    (Err("x", ResponseCode.SYS_TEMP), b"-ERR [SYS/TEMP] x\r\n"),
    (Err("x", ResponseCode.SYS_PERM), b"-ERR [SYS/PERM] x\r\n"),
    (Ok("grüß"), "+OK grüß\r\n".encode()),
]


@pytest.mark.parametrize(("reply", "wire"), FORMATS)
def test_format_and_parse(reply: Ok | Err, wire: bytes) -> None:
    assert format_status(reply) == wire
    assert parse_status(wire[:-2]) == reply


@pytest.mark.parametrize("text", ["a\r\nb", "a\nb", "nul\x00", "tab\t", "del\x7f"])
def test_control_characters_are_not_sendable(text: str) -> None:
    with pytest.raises(LocalProtocolError):
        format_status(Ok(text))
    with pytest.raises(LocalProtocolError):
        format_status(Err(text, ResponseCode.AUTH))


def test_status_line_limit() -> None:
    longest = Ok("x" * (MAX_REPLY_LINE_OCTETS - len(b"+OK \r\n")))
    assert len(format_status(longest)) == MAX_REPLY_LINE_OCTETS
    with pytest.raises(LocalProtocolError):
        format_status(Ok(longest.text + "x"))


PARSES = [
    (b"+OK", Ok("")),
    (b"+OK  two spaces", Ok(" two spaces")),
    (b"-ERR", Err("")),
    (b"-ERR [in-use] lower case code", Err("lower case code", ResponseCode.IN_USE)),
    (b"-ERR [SYS/TEMP]no space", Err("no space", ResponseCode.SYS_TEMP)),
    (b"-ERR [UNKNOWN] kept", Err("[UNKNOWN] kept")),
    (b"-ERR [SYS/TEMP/SUB] kept", Err("[SYS/TEMP/SUB] kept")),
    (b"-ERR [AUTH", Err("[AUTH")),
    (b"-ERR \xff", Err("\ufffd")),
    (b"+OKAY", None),
    (b"-ERROR", None),
    (b"+ok", None),
    (b"OK", None),
    (b"", None),
    (b"+ abc", None),
]


@pytest.mark.parametrize(("line", "status"), PARSES)
def test_parse_status(line: bytes, status: Ok | Err | None) -> None:
    assert parse_status(line) == status


@FAST
@given(st.binary(max_size=100))
def test_parse_status_never_raises(line: bytes) -> None:
    assert parse_status(line) is None or line[:1] in (b"+", b"-")


def test_format_challenge() -> None:
    assert format_challenge(b"") == b"+ \r\n"
    assert format_challenge(b"\x00\xff") == b"+ AP8=\r\n"
