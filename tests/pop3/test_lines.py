"""Bounded line framing (popproxy.pop3.lines)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pop3_helpers import FAST, byte_chunks

from popproxy.pop3.lines import LineBuffer, Overlong


def lines_of(chunks: list[bytes], max_octets: int) -> list[bytes | Overlong]:
    buf = LineBuffer()
    out: list[bytes | Overlong] = []
    for chunk in chunks:
        buf.receive(chunk)
        while (line := buf.next_line(max_octets)) is not None:
            out.append(line)
        assert len(buf) < max_octets
    return out


CASES = [
    (b"a\r\nb\r\n", [b"a", b"b"]),
    (b"a\nb\n", [b"a", b"b"]),
    (b"a\r\r\n", [b"a\r"]),  # only one CR is removed
    (b"\r\n\n", [b"", b""]),
    (b"a\rb\r\n", [b"a\rb"]),
    (b"partial", []),
    (b"x" * 9 + b"\r\n", [b"x" * 9]),  # 11 octets with CRLF: not over a bound of 11
    (b"x" * 10 + b"\r\n", [Overlong()]),
    (b"x" * 10 + b"\r\nok\r\n", [Overlong(), b"ok"]),
    (b"x" * 50 + b"\r\nok\r\n" + b"y" * 50, [Overlong(), b"ok", Overlong()]),
    (b"x" * 10 + b"\n", [b"x" * 10]),  # 11 octets with a bare LF
]


@pytest.mark.parametrize(("data", "lines"), CASES)
def test_lines_whole_and_byte_by_byte(data: bytes, lines: list[bytes | Overlong]) -> None:
    assert lines_of([data], 11) == lines
    assert lines_of(list(byte_chunks(data)), 11) == lines


@FAST
@given(
    st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=10),
    st.lists(st.integers(1, 40), min_size=1),
)
def test_any_chunking_gives_the_same_lines(raw: list[bytes], sizes: list[int]) -> None:
    data = b"".join(line + b"\r\n" for line in raw)
    chunks: list[bytes] = []
    pos = 0
    while pos < len(data):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(data[pos : pos + size])
        pos += size
    assert lines_of(chunks, 64) == raw  # only the CR of each CRLF is removed


def test_eof_is_an_empty_receive() -> None:
    buf = LineBuffer()
    buf.receive(b"x")
    assert not buf.eof
    buf.receive(b"")
    assert buf.eof
    assert len(buf) == 1


def test_discarding_clears_the_buffer_until_lf() -> None:
    buf = LineBuffer()
    buf.receive(b"x" * 100)
    assert buf.next_line(10) == Overlong()
    assert buf.next_line(10) is None
    assert len(buf) == 0
    buf.receive(b"y" * 100)
    assert buf.next_line(10) is None
    assert len(buf) == 0
    buf.receive(b"y\r\nnext\r\n")
    assert buf.next_line(10) == b"next"


def test_peek_line_does_not_consume() -> None:
    buf = LineBuffer()
    buf.receive(b"one\r\ntwo")
    assert buf.peek_line(10) == b"one"
    assert buf.peek_line(10) == b"one"
    assert buf.next_line(10) == b"one"
    assert buf.peek_line(10) is None
    assert buf.buffer == bytearray(b"two")


def test_peek_line_respects_the_bound_and_discarding() -> None:
    buf = LineBuffer()
    buf.receive(b"x" * 20 + b"\r\n")
    assert buf.peek_line(10) is None
    assert buf.next_line(10) == Overlong()
    buf.receive(b"ok\r\n")
    assert buf.peek_line(10) is None  # still inside the discarded line


@FAST
@given(
    st.binary(max_size=80),
    st.integers(1, 100),
    st.integers(1, 100),
    st.booleans(),
)
def test_a_buffer_shorter_than_both_bounds_reads_the_same_under_either(
    data: bytes, one: int, other: int, discarding: bool
) -> None:
    """What lets the server role skip choosing between its two bounds while its buffer is
    shorter than both (pop3/server.py, ``next_event``): the result is the same."""
    results = []
    for bound in (one, other):
        buf = LineBuffer()
        if discarding:
            buf.receive(b"x" * 200)
            assert buf.next_line(100) == Overlong()
        buf.receive(data)
        results.append([buf.next_line(bound), bytes(buf.buffer)])
    if len(data) < min(one, other):
        assert results[0] == results[1]
