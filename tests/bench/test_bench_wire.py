"""bench/wire.py: where a reply ends, un-stuffing (RFC 1939 §3) and the scripts."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from bench.wire import (
    Step,
    body_digest,
    body_of,
    first_error,
    reply_end,
    session_steps,
)


def test_single_line_reply_ends_at_its_crlf() -> None:
    assert reply_end(b"+OK 2 320\r\nextra", multiline=False) == len(b"+OK 2 320\r\n")
    assert reply_end(b"+OK 2 320", multiline=False) is None


def test_multiline_reply_ends_after_the_terminator() -> None:
    reply = b"+OK\r\n1 120\r\n2 200\r\n.\r\n"
    assert reply_end(reply + b"+OK next", multiline=True) == len(reply)
    assert reply_end(reply[:-1], multiline=True) is None
    assert reply_end(b"+OK\r\n.\r\n", multiline=True) == 8  # empty body


def test_err_to_a_multiline_command_is_one_line() -> None:
    assert reply_end(b"-ERR no such message\r\n", multiline=True) == 22


def test_a_stuffed_dot_line_does_not_end_the_reply() -> None:
    reply = b"+OK\r\n..\r\n...x\r\n.\r\n"
    assert reply_end(reply, multiline=True) == len(reply)
    assert reply_end(reply[:9], multiline=True) is None


@st.composite
def stuffed_replies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(body with CRLF line ends, its multi-line reply dot-stuffed)."""
    lines = draw(
        st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
    )
    body = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return body, b"+OK\r\n" + stuffed + b".\r\n"


@given(stuffed_replies(), st.data())
def test_replies_end_and_unstuff_exactly_whatever_the_pieces(
    case: tuple[bytes, bytes], data: st.DataObject
) -> None:
    body, reply = case
    assert body_of(reply) == body
    assert body_digest(reply) == (len(body), hashlib.sha256(body).hexdigest())
    # Fed in pieces with a resumed search, the end is found exactly when all is there.
    cut = data.draw(st.integers(0, len(reply)))
    searched = max(0, cut - 5)
    assert reply_end(reply[:cut], multiline=True) == (len(reply) if cut == len(reply) else None)
    assert reply_end(reply, multiline=True, start=searched) == len(reply)


def test_session_script_and_verbs_never_show_the_password() -> None:
    steps = session_steps("alice", "s3cret")
    assert [s.verb for s in steps] == ["USER", "PASS", "STAT", "LIST", "UIDL", "RETR", "QUIT"]
    assert [s.multiline for s in steps] == [False, False, False, True, True, True, False]
    assert all(s.line.endswith(b"\r\n") for s in steps)
    assert first_error(steps, [b"+OK\r\n", b"-ERR [AUTH] no\r\n"]) == "PASS: -ERR [AUTH] no"
    assert first_error(steps[:1], [b"+OK\r\n"]) is None
    assert Step(b"NOOP\r\n").verb == "NOOP"
