"""Command values, their parser and serializer (popproxy.pop3.commands)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pop3_helpers import FAST

from popproxy.pop3.commands import (
    Apop,
    Auth,
    Capa,
    Command,
    Dele,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    Rset,
    SaslCancel,
    SaslEmpty,
    SaslLine,
    SaslResponse,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    Verb,
    decode_base64,
    multiline_on_ok,
    parse_command,
    parse_number,
    parse_sasl_line,
    serialize_command,
)
from popproxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from popproxy.pop3.limits import MAX_MESSAGE_NUMBER
from popproxy.secret import Secret

DIGEST = "c4c9334bac560ecc979e58001b3e22fb"
ROUND_TRIP: list[tuple[Command, bytes]] = [
    (User("alice"), b"USER alice\r\n"),
    (User("jürgen"), "USER jürgen\r\n".encode()),
    (Pass(Secret(b"p w")), b"PASS p w\r\n"),
    (Apop("alice", DIGEST), f"APOP alice {DIGEST}\r\n".encode()),
    (Auth(), b"AUTH\r\n"),
    (Auth("PLAIN"), b"AUTH PLAIN\r\n"),
    (Auth("PLAIN", Secret(b"")), b"AUTH PLAIN =\r\n"),
    (Auth("PLAIN", Secret(b"\x00a\x00b")), b"AUTH PLAIN AGEAYg==\r\n"),
    (Stls(), b"STLS\r\n"),
    (Capa(), b"CAPA\r\n"),
    (Stat(), b"STAT\r\n"),
    (List(), b"LIST\r\n"),
    (List(7), b"LIST 7\r\n"),
    (Retr(1), b"RETR 1\r\n"),
    (Dele(MAX_MESSAGE_NUMBER), b"DELE 2147483647\r\n"),
    (Noop(), b"NOOP\r\n"),
    (Rset(), b"RSET\r\n"),
    (Quit(), b"QUIT\r\n"),
    (Top(3, 0), b"TOP 3 0\r\n"),
    (Uidl(), b"UIDL\r\n"),
    (Uidl(2), b"UIDL 2\r\n"),
]


@pytest.mark.parametrize(("command", "wire"), ROUND_TRIP, ids=lambda x: repr(x)[:30])
def test_serialize_and_parse(command: Command, wire: bytes) -> None:
    assert serialize_command(command) == wire
    assert parse_command(wire[:-2]) == command


def test_every_verb_has_a_round_trip_case() -> None:
    assert {c.verb for c, _ in ROUND_TRIP} == set(Verb)


SASL: list[tuple[SaslLine, bytes]] = [
    (SaslResponse(Secret(b"")), b"=\r\n"),
    (SaslResponse(Secret(b"x")), b"eA==\r\n"),
    (SaslCancel(), b"*\r\n"),
]


def test_an_empty_sasl_line_is_sent_as_an_empty_line() -> None:
    # The client role's XOAUTH2 acknowledgement; the server role reads it as an empty
    # response, as it reads "=".
    assert serialize_command(SaslEmpty()) == b"\r\n"
    assert parse_sasl_line(b"") == SaslResponse(Secret(b""))


@pytest.mark.parametrize(("line", "wire"), SASL)
def test_sasl_lines(line: SaslLine, wire: bytes) -> None:
    assert serialize_command(line) == wire
    assert parse_sasl_line(wire[:-2]) == line


@pytest.mark.parametrize("raw", [b"!", b"eA=", b"eA== ", b"e A==", b"**"])
def test_bad_sasl_lines(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as raised:
        parse_sasl_line(raw)
    assert raised.value.reply.text == "Invalid base64 data"
    assert not raised.value.fatal


def test_decode_base64() -> None:
    assert decode_base64(b"=") == Secret(b"")
    assert decode_base64(b"") == Secret(b"")
    assert decode_base64(b"AP8=") == Secret(b"\x00\xff")


@pytest.mark.parametrize(
    ("command", "multiline"),
    [
        (Capa(), True),
        (Retr(1), True),
        (Top(1, 0), True),
        (List(), True),
        (Uidl(), True),
        (Auth(), True),
        (List(1), False),
        (Uidl(1), False),
        (Auth("PLAIN"), False),
        (Stat(), False),
        (User("a"), False),
        (Quit(), False),
        (SaslResponse(Secret(b"")), False),
        (SaslCancel(), False),
    ],
)
def test_multiline_on_ok(command: Command | SaslLine, multiline: bool) -> None:
    assert multiline_on_ok(command) is multiline


@pytest.mark.parametrize(
    ("raw", "allow_zero", "value"),
    [(b"1", False, 1), (b"0", True, 0), (b"00", True, 0), (b"2147483647", False, 2**31 - 1)],
)
def test_parse_number(raw: bytes, allow_zero: bool, value: int) -> None:
    assert parse_number(raw, allow_zero=allow_zero) == value


@FAST
@given(st.binary(max_size=12))
def test_parse_number_is_strict(raw: bytes) -> None:
    try:
        value = parse_number(raw, allow_zero=False)
    except RemoteProtocolError:
        return
    assert raw == b"%d" % value
    assert 1 <= value <= MAX_MESSAGE_NUMBER


@FAST
@given(st.binary(max_size=60))
def test_parse_command_raises_only_remote_errors(line: bytes) -> None:
    try:
        command = parse_command(line)
    except RemoteProtocolError as exc:
        assert not exc.fatal
        return
    assert isinstance(command.verb, Verb)


@pytest.mark.parametrize(
    "verb", ["STAT", "LIST", "UIDL", "QUIT", "NOOP", "RSET", "CAPA", "STLS", "AUTH"]
)
def test_a_bare_command_parses_alike_in_every_case(verb: str) -> None:
    # The upper-case line is answered from parsed instances kept once; any other case,
    # or trailing spaces, takes the general path: both give the same command.
    kept = parse_command(verb.encode())
    assert kept == parse_command(verb.lower().encode()) == parse_command(verb.encode() + b" ")
    assert type(kept) is type(parse_command(verb.title().encode()))
    assert serialize_command(kept) == verb.encode() + b"\r\n"


def test_serialize_refuses_line_breaks() -> None:
    with pytest.raises(LocalProtocolError):
        serialize_command(User("a\r\nDELE 1"))
    with pytest.raises(LocalProtocolError):
        serialize_command(Pass(Secret(b"x\nDELE 1")))


def test_pass_repr_hides_the_password() -> None:
    assert "hunter2" not in repr(parse_command(b"PASS hunter2"))
    assert "hunter2" not in repr(Auth("PLAIN", Secret(b"hunter2")))
