"""Overlong lines and line ends from a client: answered or closed, memory bounded, and
the server still serves (RFC 2449 §4, RFC 1939 §3; limits in docs/security.md)."""

from __future__ import annotations

from integration.harness import PASSWORD, RssSampler

from .probe import LOCAL_USER, Target

LINE_TOO_LONG = b"-ERR Line too long"
KIB = 1024
MIB = 1024 * KIB
# Sent in pieces of this size, so the 10 MB line is never one buffer in the test either.
SEND_CHUNK_BYTES = 64 * KIB
# What ten megabytes without a line end may add to the server's resident memory at its
# peak. The server keeps at most one line (8 KiB) and one read (16 KiB) per session;
# the bound is generous so that allocator noise cannot fail the test, and still far
# below the 10 MB a server that buffered the line would need.
TEN_MB_RSS_GROWTH_BOUND_KIB = 4 * KIB


def test_a_100_kb_line_gets_one_err_and_the_session_goes_on(target: Target) -> None:
    with target.connect() as pop:
        pop.send(b"USER " + b"a" * (100 * KIB) + b"\r\nCAPA\r\n")
        assert pop.line() == LINE_TOO_LONG
        assert pop.line().startswith(b"+OK")
        assert b"USER" in pop.body()
        # In a SASL exchange and after login too.
        pop.send(b"AUTH PLAIN " + b"A" * (100 * KIB) + b"\r\n")
        assert pop.line() == LINE_TOO_LONG
        assert pop.login(LOCAL_USER, PASSWORD).startswith(b"+OK Logged in")
        pop.send(b"NOOP " + b"x" * (100 * KIB) + b"\r\nNOOP\r\n")
        assert pop.line() == LINE_TOO_LONG
        assert pop.line() == b"+OK"
        assert pop.cmd(b"QUIT").startswith(b"+OK")
    target.still_serves()


def test_ten_megabytes_without_a_line_end_cost_no_memory_and_the_session_goes_on(
    target: Target,
) -> None:
    target.still_serves()  # the server has served a session before it is measured
    before_kib = target.server.rss_kib()
    with target.connect() as pop, RssSampler(target.server.pid) as rss:
        sent = 0
        chunk = b"x" * SEND_CHUNK_BYTES
        while sent < 10 * MIB:
            pop.send(chunk)
            sent += len(chunk)
        # One -ERR for the whole line, sent as soon as it was over the limit.
        assert pop.line() == LINE_TOO_LONG
        pop.send(b"\r\nCAPA\r\n")
        assert pop.line().startswith(b"+OK")
        assert pop.body()
    growth_kib = rss.peak_kib - before_kib
    assert growth_kib < TEN_MB_RSS_GROWTH_BOUND_KIB, f"RSS grew by {growth_kib} KiB"
    target.still_serves()


def test_line_ends_follow_one_rule(target: Target) -> None:
    """A line ends at LF; one CR before it is removed; a CR anywhere else is a control
    character (docs/security.md, Input)."""
    with target.connect() as pop:
        # Bare LF ends a line, as with Dovecot: two commands.
        pop.send(b"USER " + LOCAL_USER.encode() + b"\nCAPA\n")
        assert pop.line() == b"+OK"
        assert pop.line().startswith(b"+OK")
        assert pop.body()
        # A lone CR does not end a line and cannot smuggle a second command in.
        assert pop.cmd(b"USER " + LOCAL_USER.encode() + b"\rPASS x") == (
            b"-ERR Invalid characters in command"
        )
        # Only one CR before the LF is a line end.
        assert pop.cmd(b"CAPA\r") == b"-ERR Invalid characters in command"
        assert pop.cmd(b"QUIT") == b"+OK Logging out."
    target.still_serves()
