"""Dot-stuffing as streaming transforms (RFC 1939 §3).

A multi-line body is sent with a ``.`` added before every line that starts with
``.``, and ends with ``CRLF.CRLF``. Both directions work on chunks of any size
and carry "at start of line" across chunk boundaries, so a dot that starts a
chunk is handled like any other, and no body is ever held whole.

The hot path is two C-level passes per chunk (``bytes.replace`` or ``find`` for
``\\n.``), not a Python loop over lines.
"""

from __future__ import annotations

from popproxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from popproxy.pop3.replies import Err

TERMINATOR = b".\r\n"
# A line that is a dot and a bare LF. It cannot occur in a body a server keeps to
# RFC 1939 §3 (a line starting with "." is stuffed, every line ends with CRLF), and a
# client that ends lines at LF, as many do, would take it for the terminator: a relay
# that passed it on would let the upstream end the message early for the client and
# inject what follows as replies. Both decoders refuse it.
_BARE_LF_DOT_LINE = b".\n"


def _ambiguous_terminator() -> RemoteProtocolError:
    return RemoteProtocolError(
        Err("A line of a multi-line reply is a dot and a bare LF"), fatal=True
    )


class DotStuffer:
    """Encoder: content chunks in, wire chunks out (server role, RFC 1939 §3)."""

    __slots__ = ("_at_line_start", "_finished")

    def __init__(self) -> None:
        self._at_line_start = True
        self._finished = False

    def stuff(self, chunk: bytes) -> bytes:
        """Return ``chunk`` with every line-initial ``.`` doubled."""
        if self._finished:
            raise LocalProtocolError("data after the end of a multi-line body")
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and out[0] == 0x2E:
            out = b"." + out
        self._at_line_start = out[-1] == 0x0A
        return out

    def pass_stuffed(self, chunk: bytes) -> bytes:
        """Return ``chunk``, which the peer has already dot-stuffed, unchanged.

        Only the "at start of line" state is tracked, so ``finish`` still knows
        whether the body ended a line.
        """
        if self._finished:
            raise LocalProtocolError("data after the end of a multi-line body")
        if chunk:
            self._at_line_start = chunk[-1] == 0x0A
        return chunk

    def finish(self) -> bytes:
        """Return the terminator, preceded by CRLF if the body did not end a line."""
        if self._finished:
            raise LocalProtocolError("multi-line body already finished")
        self._finished = True
        return TERMINATOR if self._at_line_start else b"\r\n" + TERMINATOR


class DotUnstuffer:
    """Decoder: wire chunks in, content out, until ``CRLF.CRLF`` (client role).

    ``feed`` consumes from the front of a buffer owned by the caller and
    returns the content it could decode; ``done`` turns true once the
    terminator has been consumed. Bytes after the terminator stay in the buffer.
    """

    __slots__ = ("_at_line_start", "done")

    def __init__(self) -> None:
        self._at_line_start = True
        self.done = False

    def feed(self, buf: bytearray) -> bytes:
        """Decode as much of ``buf`` as can be decided, deleting what was consumed."""
        out = bytearray()
        pos = 0
        end = len(buf)
        while pos < end:
            if self._at_line_start and buf[pos] == 0x2E:
                if end - pos < 3 and (end - pos < 2 or buf[pos + 1] == 0x0D):
                    break  # ".", ".\r": cannot tell the terminator from a stuffed line yet
                if buf[pos : pos + 3] == TERMINATOR:
                    pos += 3
                    self.done = True
                    break
                if buf[pos + 1] == 0x0A:
                    raise _ambiguous_terminator()
                pos += 1  # RFC 1939 §3: drop the stuffed dot
            hit = buf.find(b"\n.", pos)
            if hit == -1:
                out += buf[pos:end]
                self._at_line_start = buf[end - 1] == 0x0A
                pos = end
            else:
                out += buf[pos : hit + 1]
                pos = hit + 1
                self._at_line_start = True
        del buf[:pos]
        return bytes(out)


# The end of a multi-line body as seen from anywhere but its first line: a line
# that is exactly ``.`` (RFC 1939 §3).
_LINE_END_TERMINATOR = b"\n" + TERMINATOR
# Tails that may be the start of a terminator once more octets arrive.
_TERMINATOR_PREFIXES = (b".", b".\r")


class StuffedBodyScanner:
    """Finds the end of a multi-line body without decoding it (client role, relays).

    ``feed`` consumes from the front of a buffer owned by the caller and returns
    the body octets still dot-stuffed, exactly as received, up to but not
    including the terminator line; ``done`` turns true once the terminator has
    been consumed. A tail that may begin the terminator is held back until it can
    be decided. The terminator rule is the same as ``DotUnstuffer``'s, so both
    agree on where every body ends (RFC 1939 §3).
    """

    __slots__ = ("_at_line_start", "done")

    def __init__(self) -> None:
        self._at_line_start = True
        self.done = False

    def feed(self, buf: bytearray) -> bytes:
        """Return the stuffed body octets that can be decided, deleting what was consumed."""
        if self.done or not buf:
            return b""
        if self._at_line_start and buf[:1] == b".":
            if buf[:3] == TERMINATOR:
                del buf[:3]
                self.done = True
                return b""
            if bytes(buf[:3]) in _TERMINATOR_PREFIXES:
                return b""  # ".", ".\r": wait for the next octet
            if buf[:2] == _BARE_LF_DOT_LINE:
                raise _ambiguous_terminator()
        hit = buf.find(_LINE_END_TERMINATOR)
        if hit != -1:
            if buf.find(b"\n" + _BARE_LF_DOT_LINE, 0, hit + 1) != -1:
                raise _ambiguous_terminator()
            body = _take(buf, hit + 1)
            del buf[: len(TERMINATOR)]
            self.done = True
            return body
        end = len(buf)
        last_newline = buf.rfind(b"\n", max(0, end - len(TERMINATOR)))
        if last_newline != -1 and bytes(buf[last_newline + 1 :]) in _TERMINATOR_PREFIXES:
            end = last_newline + 1
        # A dot line cut after its dot was held back above, so it is checked whole.
        if buf.find(b"\n" + _BARE_LF_DOT_LINE, 0, end) != -1:
            raise _ambiguous_terminator()
        body = _take(buf, end)
        self._at_line_start = body[-1] == 0x0A
        return body


def _take(buf: bytearray, end: int) -> bytes:
    """The first ``end`` octets of ``buf`` as bytes, deleted from it: one copy, where
    ``bytes(buf[:end])`` makes two (the slice of a bytearray is a bytearray)."""
    with memoryview(buf) as view:
        taken = bytes(view[:end])
    del buf[:end]
    return taken
