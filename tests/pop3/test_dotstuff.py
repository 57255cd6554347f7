"""Dot-stuffing both ways as streaming transforms (RFC 1939 §3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pop3_helpers import CONTENT, FAST, byte_chunks, expected_content, split_at

from popproxy.pop3.dotstuff import TERMINATOR, DotStuffer, DotUnstuffer, StuffedBodyScanner
from popproxy.pop3.errors import LocalProtocolError, RemoteProtocolError


def stuff(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.stuff(c) for c in chunks) + stuffer.finish()


def unstuff(chunks: list[bytes]) -> tuple[bytes, bytearray, int]:
    """Feed chunks into one buffer; returns content, what is left, and how often done flipped."""
    unstuffer = DotUnstuffer()
    buf = bytearray()
    out = bytearray()
    done_seen = 0
    for chunk in chunks:
        if unstuffer.done:
            buf += chunk
            continue
        buf += chunk
        out += unstuffer.feed(buf)
        done_seen += unstuffer.done
    return bytes(out), buf, done_seen


@FAST
@given(content=CONTENT, cuts=st.lists(st.integers(0, 400)), wire_cuts=st.lists(st.integers(0, 500)))
def test_round_trip_under_any_chunking(
    content: bytes, cuts: list[int], wire_cuts: list[int]
) -> None:
    wire = stuff(split_at(content, cuts))
    assert wire == stuff([content])  # the stuffed form does not depend on chunking
    trailer = b".\r\n+OK next reply\r\n"  # a second terminator is not consumed
    decoded, rest, done_seen = unstuff(split_at(wire + trailer, wire_cuts))
    assert decoded == expected_content(content)
    assert done_seen == 1
    assert bytes(rest) == trailer


@FAST
@given(content=CONTENT)
def test_byte_by_byte_round_trip(content: bytes) -> None:
    wire = stuff(list(byte_chunks(content)))
    decoded, rest, _ = unstuff([*byte_chunks(wire), b"X"])
    assert decoded == expected_content(content)
    assert rest == b"X"


@FAST
@given(content=CONTENT)
def test_stuffed_wire_has_exactly_one_terminator_line(content: bytes) -> None:
    wire = stuff([content])
    assert wire.endswith(b"\n" + TERMINATOR) or wire == TERMINATOR
    lines = wire.split(b"\n")
    # No line but the last one is a lone "." line: every other one got a second dot.
    assert [i for i, line in enumerate(lines) if line == b".\r"] == [len(lines) - 2]


CASES = [
    (b"", b".\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
    (b"a\n.b\n", b"a\n..b\n.\r\n"),  # bare LF ends a line too
    (b"a\r.b\r\n", b"a\r.b\r\n.\r\n"),  # a lone CR does not
    (b"x\r", b"x\r\r\n.\r\n"),
]


@pytest.mark.parametrize(("content", "wire"), CASES)
def test_stuffing_cases_whole_and_byte_by_byte(content: bytes, wire: bytes) -> None:
    assert stuff([content]) == wire
    assert stuff(list(byte_chunks(content))) == wire
    assert unstuff([wire])[0] == expected_content(content)
    assert unstuff(list(byte_chunks(wire)))[0] == expected_content(content)


def test_dot_that_starts_a_chunk_is_stuffed() -> None:
    stuffer = DotStuffer()
    assert stuffer.stuff(b"a\r\n") == b"a\r\n"
    assert stuffer.stuff(b".b") == b"..b"
    assert stuffer.stuff(b".c") == b".c"  # not at line start
    assert stuffer.stuff(b"\n") == b"\n"
    assert stuffer.stuff(b"") == b""
    assert stuffer.stuff(b".") == b".."


def test_stuffer_misuse_is_a_local_error() -> None:
    stuffer = DotStuffer()
    stuffer.finish()
    with pytest.raises(LocalProtocolError):
        stuffer.stuff(b"x")
    with pytest.raises(LocalProtocolError):
        stuffer.finish()


UNSTUFF_CASES = [
    # (wire so far, content handed out, done, left in the buffer)
    (b".", b"", False, b"."),
    (b".\r", b"", False, b".\r"),
    (b".\r\n", b"", True, b""),
    (b"..", b".", False, b""),
    (b"a\r\n.", b"a\r\n", False, b"."),
    (b"a\r\n.\r\nb", b"a\r\n", True, b"b"),
    (b".x\r\n", b"x\r\n", False, b""),  # an unstuffed dot line is taken leniently
    (b".\rx", b"\rx", False, b""),
    (b"a.\r\n", b"a.\r\n", False, b""),  # a dot inside a line is data
]


@pytest.mark.parametrize(("wire", "content", "done", "rest"), UNSTUFF_CASES)
def test_unstuffer_decides_only_what_it_can(
    wire: bytes, content: bytes, done: bool, rest: bytes
) -> None:
    unstuffer = DotUnstuffer()
    buf = bytearray(wire)
    assert unstuffer.feed(buf) == content
    assert unstuffer.done is done
    assert buf == rest


def test_unstuffer_carries_line_start_across_feeds() -> None:
    unstuffer = DotUnstuffer()
    buf = bytearray(b"a\r\n")
    assert unstuffer.feed(buf) == b"a\r\n"
    buf += b"..b\r"
    assert unstuffer.feed(buf) == b".b\r"
    buf += b"\n"
    assert unstuffer.feed(buf) == b"\n"
    buf += b".\r\n.\r\n"
    assert unstuffer.feed(buf) == b""
    assert unstuffer.done
    assert buf == b".\r\n"  # only the first terminator is consumed


def test_unstuffer_buffer_stays_small_for_a_long_body() -> None:
    unstuffer = DotUnstuffer()
    buf = bytearray()
    total = 0
    for _ in range(200):
        buf += b"x" * 5000 + b"\r\n."
        total += len(unstuffer.feed(buf))
        assert len(buf) <= 2  # at most an undecided "." or ".\r"
    buf += b"\r\n"
    unstuffer.feed(buf)
    assert unstuffer.done
    assert total == 200 * 5002


# -- StuffedBodyScanner: the relay's view of a body ------------------------------------------


def scan(chunks: list[bytes]) -> tuple[bytes, bytearray, int]:
    """Feed chunks into one buffer; returns the stuffed body, what is left, done flips."""
    scanner = StuffedBodyScanner()
    buf = bytearray()
    out = bytearray()
    done_seen = 0
    for chunk in chunks:
        buf += chunk
        if scanner.done:
            continue
        out += scanner.feed(buf)
        done_seen += scanner.done
    return bytes(out), buf, done_seen


@FAST
@given(content=CONTENT, wire_cuts=st.lists(st.integers(0, 500)))
def test_scanner_passes_the_stuffed_body_unchanged_under_any_chunking(
    content: bytes, wire_cuts: list[int]
) -> None:
    wire = stuff([content])
    trailer = b".\r\n+OK next reply\r\n"
    body, rest, done_seen = scan(split_at(wire + trailer, wire_cuts))
    assert body + TERMINATOR == wire  # exactly the wire octets, terminator removed
    assert done_seen == 1
    assert bytes(rest) == trailer


@FAST
@given(wire=st.binary(max_size=300), wire_cuts=st.lists(st.integers(0, 300)))
def test_scanner_and_unstuffer_agree_on_where_any_body_ends(
    wire: bytes, wire_cuts: list[int]
) -> None:
    """Even on hostile input, relaying and decoding end the body at the same octet, or
    both refuse it."""
    chunks = split_at(wire, wire_cuts)
    try:
        body, scan_rest, scan_done = scan(chunks)
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            unstuff(chunks)
        return
    decoded, unstuff_rest, unstuff_done = unstuff(chunks)
    assert scan_done == unstuff_done
    if scan_done:
        assert scan_rest == unstuff_rest
        assert unstuff([body + TERMINATOR])[0] == decoded


@pytest.mark.parametrize(
    ("wire", "body", "done", "rest"),
    [
        (b".\r\n", b"", True, b""),
        (b".", b"", False, b"."),
        (b".\r", b"", False, b".\r"),
        (b"..x\r\n.\r\nNEXT", b"..x\r\n", True, b"NEXT"),
        (b"a\r\n.", b"a\r\n", False, b"."),
        (b"a\r\n.\r", b"a\r\n", False, b".\r"),
        (b"a\r\n.x", b"a\r\n.x", False, b""),
        (b"a\r", b"a\r", False, b""),
    ],
)
def test_scanner_decides_only_what_it_can(
    wire: bytes, body: bytes, done: bool, rest: bytes
) -> None:
    scanner = StuffedBodyScanner()
    buf = bytearray(wire)
    assert scanner.feed(buf) == body
    assert scanner.done is done
    assert bytes(buf) == rest


def test_stuffer_tracks_line_start_through_stuffed_chunks() -> None:
    stuffer = DotStuffer()
    assert stuffer.pass_stuffed(b"..dot\r\nno end") == b"..dot\r\nno end"
    assert stuffer.finish() == b"\r\n" + TERMINATOR
    stuffer = DotStuffer()
    stuffer.pass_stuffed(b"line\r\n")
    assert stuffer.finish() == TERMINATOR
    with pytest.raises(LocalProtocolError):
        stuffer.pass_stuffed(b"late")


BARE_LF_DOT_LINES = [
    b".\n",  # the body's first line
    b"a\r\n.\nFAKE\r\n.\r\n",  # a lenient client's terminator, then an injected reply
    b"a\n.\n.\r\n",
    b"a\r\n..\r\n.\n",
]


@pytest.mark.parametrize("wire", BARE_LF_DOT_LINES)
def test_a_dot_and_bare_lf_line_is_refused_whole_and_byte_by_byte(wire: bytes) -> None:
    """RFC 1939 §3 has no such line; a client that ends lines at LF would read it as the
    terminator, so a relay must not pass it on."""
    for chunks in ([wire], list(byte_chunks(wire))):
        with pytest.raises(RemoteProtocolError) as scanned:
            scan(chunks)
        assert scanned.value.fatal
        with pytest.raises(RemoteProtocolError):
            unstuff(chunks)


@pytest.mark.parametrize("wire", [b"..\n.\r\n", b"a\n..\n.\r\n", b".x\n.\r\n", b"a.\n.\r\n"])
def test_stuffed_dots_before_a_bare_lf_are_fine(wire: bytes) -> None:
    for chunks in ([wire], list(byte_chunks(wire))):
        body, _, done = scan(chunks)
        assert done == 1
        assert body + TERMINATOR == wire
        assert unstuff(chunks)[2] == 1
