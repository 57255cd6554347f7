"""Dot-stuffing both ways as streaming transforms (RFC 1939 §3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pop3_helpers import CONTENT, FAST, byte_chunks, expected_content, split_at

from popproxy.pop3.dotstuff import TERMINATOR, DotStuffer, DotUnstuffer, StuffedBodyScanner
from popproxy.pop3.errors import LocalProtocolError


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


# Hostile wire: random octets, and pieces that make poisoned dot lines (a dot and a bare
# LF at a line start) and undecided tails often, with a terminator now and then.
POISONED_WIRE = st.lists(
    st.sampled_from([b".\n", b"\n", b".", b"\r", b"a\r\n", b"..", b"x", b".\r\n"]),
    max_size=40,
).map(b"".join)
WIRE = st.binary(max_size=300) | CONTENT | POISONED_WIRE


@FAST
@given(wire=WIRE, wire_cuts=st.lists(st.integers(0, 300)))
def test_scanner_and_unstuffer_agree_on_where_any_body_ends(
    wire: bytes, wire_cuts: list[int]
) -> None:
    """Even on hostile input, relaying and decoding end the body at the same octet, and
    un-stuffing what the relay passes on gives what decoding gives."""
    chunks = split_at(wire, wire_cuts)
    body, scan_rest, scan_done = scan(chunks)
    decoded, unstuff_rest, unstuff_done = unstuff(chunks)
    assert scan_done == unstuff_done
    if scan_done:
        assert scan_rest == unstuff_rest
        assert unstuff([body + TERMINATOR])[0] == decoded


@FAST
@given(wire=POISONED_WIRE, wire_cuts=st.lists(st.integers(0, 300)))
def test_no_client_can_end_a_relayed_body_early(wire: bytes, wire_cuts: list[int]) -> None:
    """Whatever the upstream sends, no line the relay passes on is a dot followed by a
    line end, whether a client ends lines at CRLF or at LF (RFC 1939 §3): the only end
    a client can see is the terminator the relay adds."""
    body, _, _ = scan(split_at(wire, wire_cuts))
    lines = (b"\n" + body).split(b"\n")[1:]
    assert not [line for line in lines[:-1] if line in (b".", b".\r")]


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


POISONED_DOT_LINES = [
    # (wire, what the relay passes on, what decoding gives, poisoned dot lines)
    (b".\n.\r\n", b"..\n", b".\n", 1),  # the body's first line
    # A lenient client's terminator, then an injected reply, then the real end:
    (b"a\r\n.\nFAKE\r\n.\r\n", b"a\r\n..\nFAKE\r\n", b"a\r\n.\nFAKE\r\n", 1),
    (b"a\n.\n.\r\n", b"a\n..\n", b"a\n.\n", 1),
    (b"a\r\n..\r\n.\n.\r\n", b"a\r\n..\r\n..\n", b"a\r\n.\r\n.\n", 1),
    (b".\n.\n.\n.\r\n", b"..\n..\n..\n", b".\n.\n.\n", 3),  # back to back
    (b"x\r\n.\n\r\n.\r\n", b"x\r\n..\n\r\n", b"x\r\n.\n\r\n", 1),
]


@pytest.mark.parametrize(("wire", "relayed", "content", "count"), POISONED_DOT_LINES)
def test_a_poisoned_dot_line_is_stuffed_content_whole_and_byte_by_byte(
    wire: bytes, relayed: bytes, content: bytes, count: int
) -> None:
    """A line of a single dot ended by a bare LF is not in RFC 1939 §3, and a client
    that ends lines at LF would read it as the terminator. It is content: the relay
    stuffs it (``..\n``), so no client reads it as the end, and decoding keeps the
    octets the upstream sent (``.\n``). The body ends at the real terminator."""
    trailer = b"+OK next\r\n"
    for chunks in ([wire + trailer], list(byte_chunks(wire + trailer))):
        scanner = StuffedBodyScanner()
        buf = bytearray()
        out = bytearray()
        for chunk in chunks:
            buf += chunk
            out += scanner.feed(buf)
        assert (bytes(out), scanner.done, bytes(buf)) == (relayed, True, trailer)
        assert scanner.poisoned_dot_lines == count
        unstuffer = DotUnstuffer()
        buf = bytearray()
        out = bytearray()
        for chunk in chunks:
            buf += chunk
            if not unstuffer.done:
                out += unstuffer.feed(buf)
        assert (bytes(out), unstuffer.done, bytes(buf)) == (content, True, trailer)
        assert unstuffer.poisoned_dot_lines == count
        # Every client un-stuffs what the relay passes on to the same content.
        assert unstuff([relayed + TERMINATOR])[0] == content


@pytest.mark.parametrize(
    ("wire", "body", "rest"),
    [
        (b"a\r\n.", b"a\r\n", b"."),  # a dot line cut after its dot waits
        (b"a\r\n.\n", b"a\r\n..\n", b""),
        (b"a\r\n.\n.", b"a\r\n..\n", b"."),
        (b".\n", b"..\n", b""),
        (b"a\n.\r", b"a\n", b".\r"),
    ],
)
def test_scanner_hands_out_a_poisoned_dot_line_once_it_is_whole(
    wire: bytes, body: bytes, rest: bytes
) -> None:
    scanner = StuffedBodyScanner()
    buf = bytearray(wire)
    assert scanner.feed(buf) == body
    assert not scanner.done
    assert bytes(buf) == rest


def test_a_poisoned_dot_line_that_starts_a_feed_is_stuffed() -> None:
    """The line start is carried across feeds: a ``.\n`` at the front of a later buffer
    is a poisoned line after an LF, and not one after other octets."""
    scanner = StuffedBodyScanner()
    buf = bytearray(b"a\r\n")
    assert scanner.feed(buf) == b"a\r\n"
    buf += b".\nb"
    assert scanner.feed(buf) == b"..\nb"
    buf += b".\n"
    assert scanner.feed(buf) == b".\n"  # inside a line: not a dot line
    assert scanner.poisoned_dot_lines == 1


@pytest.mark.parametrize("wire", [b"..\n.\r\n", b"a\n..\n.\r\n", b".x\n.\r\n", b"a.\n.\r\n"])
def test_stuffed_dots_before_a_bare_lf_are_fine(wire: bytes) -> None:
    for chunks in ([wire], list(byte_chunks(wire))):
        body, _, done = scan(chunks)
        assert done == 1
        assert body + TERMINATOR == wire
        assert unstuff(chunks)[2] == 1
