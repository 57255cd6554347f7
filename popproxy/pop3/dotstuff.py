"""Dot-stuffing as streaming transforms (RFC 1939 §3).

A multi-line body is sent with a ``.`` added before every line that starts with
``.``, and ends with ``CRLF.CRLF``. Both directions work on chunks of any size
and carry "at start of line" across chunk boundaries, so a dot that starts a
chunk is handled like any other, and no body is ever held whole.

The relay's scanner makes one C-level pass per chunk (a compiled pattern for a
line-initial dot ended by a line end), not a Python loop over lines.

A poisoned dot line. A line that is a single ``.`` ended by a bare LF cannot occur
in a body a server keeps to RFC 1939 §3 (a line starting with ``.`` is stuffed,
every line ends with CRLF): it comes from a server that stuffs nothing, or only
after CRLF. Strictly it is not the terminator (that is ``.CRLF``), but a client
that ends lines at LF, as many do, would take it for one, so passing it on as it
came would let the upstream end a message early for such a client and inject what
follows as replies. Both decoders therefore take it as content, a dot and a line
end, never as the end of the body: ``DotUnstuffer`` hands out ``.\n`` (the octets
the upstream sent, so a size the upstream counted on what it sends stays exact), and
``StuffedBodyScanner`` hands out ``..\n``, stuffed, which every client un-stuffs to
that same ``.\n`` and none can read as the terminator. Each counts such lines in
``poisoned_dot_lines``; ``ClientConnection`` reports them once per reply. A store
that keeps a decoded copy (the gateway's Maildir) gets the same ``.\n`` content and
stuffs it again when serving it.
"""

from __future__ import annotations

import re

from popproxy.pop3.errors import LocalProtocolError

TERMINATOR = b".\r\n"
_DOT = 0x2E
_LF = 0x0A
# A line-initial dot followed by a line end: the terminator (".\r\n") or a poisoned dot
# line (".\n"). One search for both is the scanner's single pass over a chunk.
_DOT_LINE = re.compile(rb"\n\.\r?\n")
# Tails that may be the start of a terminator or a poisoned dot line once more
# octets arrive.
_UNDECIDED = (b".", b".\r")
_STUFFING_DOT = b"."


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
    A poisoned dot line (module docstring) is content ``.\n``, counted in
    ``poisoned_dot_lines``.
    """

    __slots__ = ("_at_line_start", "done", "poisoned_dot_lines")

    def __init__(self) -> None:
        self._at_line_start = True
        self.done = False
        self.poisoned_dot_lines = 0

    def feed(self, buf: bytearray) -> bytes:
        """Decode as much of ``buf`` as can be decided, deleting what was consumed."""
        out = bytearray()
        pos = 0
        end = len(buf)
        while pos < end:
            if self._at_line_start and buf[pos] == _DOT:
                if end - pos < 3 and (end - pos < 2 or buf[pos + 1] == 0x0D):
                    break  # ".", ".\r": cannot tell the terminator from a stuffed line yet
                if buf[pos : pos + 3] == TERMINATOR:
                    pos += 3
                    self.done = True
                    break
                if buf[pos + 1] == _LF:
                    self.poisoned_dot_lines += 1  # content: the dot stays
                else:
                    pos += 1  # RFC 1939 §3: drop the stuffed dot
            hit = buf.find(b"\n.", pos)
            if hit == -1:
                out += buf[pos:end]
                self._at_line_start = buf[end - 1] == _LF
                pos = end
            else:
                out += buf[pos : hit + 1]
                pos = hit + 1
                self._at_line_start = True
        del buf[:pos]
        return bytes(out)


class StuffedBodyScanner:
    """Finds the end of a multi-line body without decoding it (client role, relays).

    ``feed`` consumes from the front of a buffer owned by the caller and returns
    the body octets still dot-stuffed, exactly as received, up to but not
    including the terminator line; ``done`` turns true once the terminator has
    been consumed. A tail that may begin the terminator is held back until it can
    be decided. The one change to the octets: a poisoned dot line (module
    docstring) gets a stuffing dot, ``..\n``, and is counted in
    ``poisoned_dot_lines``. The terminator rule is the same as ``DotUnstuffer``'s,
    and un-stuffing the scanner's output gives the unstuffer's content, so both
    agree on where every body ends and what it holds (RFC 1939 §3).
    """

    __slots__ = ("_at_line_start", "done", "poisoned_dot_lines")

    def __init__(self) -> None:
        self._at_line_start = True
        self.done = False
        self.poisoned_dot_lines = 0

    def feed(self, buf: bytearray) -> bytes:
        """Return the stuffed body octets that can be decided, deleting what was consumed.

        One pass of ``_DOT_LINE`` over the buffer finds both the terminator and every
        poisoned dot line; the octets between them are handed out with one copy.
        """
        if self.done or not buf:
            return b""
        # Cuts: where a stuffing dot goes in before a poisoned dot line (rare).
        cuts: list[int] = []
        search_from = 0
        if self._at_line_start and buf[0] == _DOT:
            head = bytes(buf[:3])
            if head == TERMINATOR:
                del buf[:3]
                self.done = True
                return b""
            if head in _UNDECIDED:
                return b""  # ".", ".\r": wait for the next octet
            if head[1] == _LF:
                cuts.append(0)
                search_from = 1
        while (found := _DOT_LINE.search(buf, search_from)) is not None:
            dot = found.start() + 1
            if found.end() - dot == len(TERMINATOR):
                self.poisoned_dot_lines += len(cuts)
                body = _take(buf, dot, cuts)
                del buf[: len(TERMINATOR)]
                self.done = True
                return body
            cuts.append(dot)
            search_from = dot + 1  # the LF that ends it may begin the next dot line
        end = len(buf)
        last_newline = buf.rfind(b"\n", max(0, end - len(TERMINATOR)))
        if last_newline != -1 and bytes(buf[last_newline + 1 :]) in _UNDECIDED:
            end = last_newline + 1
        self.poisoned_dot_lines += len(cuts)
        body = _take(buf, end, cuts)
        self._at_line_start = body[-1] == _LF
        return body

    def take_whole(self, data: bytes) -> bool:
        """Whether ``data``, the next octets after all that was fed, is body to pass on
        exactly as received: all of it decided now, no terminator, no poisoned dot
        line, no undecided tail. Then it counts as consumed (``feed`` would have
        returned it whole) and the caller hands ``data`` itself on, without copying it
        through a buffer; otherwise nothing changes and the caller feeds it.
        """
        if self.done or not data:
            return False
        if self._at_line_start and data[0] == _DOT:
            return False  # a dot line, stuffed or not, at the start: ``feed`` decides
        if _DOT_LINE.search(data) is not None:
            return False
        last_newline = data.rfind(b"\n", max(0, len(data) - len(TERMINATOR)))
        if last_newline != -1 and data[last_newline + 1 :] in _UNDECIDED:
            return False
        self._at_line_start = data[-1] == _LF
        return True


def _take(buf: bytearray, end: int, cuts: list[int]) -> bytes:
    """The first ``end`` octets of ``buf`` as bytes, deleted from it, with a stuffing
    dot inserted at each of ``cuts`` (ascending). One copy, where ``bytes(buf[:end])``
    makes two (the slice of a bytearray is a bytearray)."""
    with memoryview(buf) as view:
        if not cuts:
            taken = bytes(view[:end])
        else:
            pieces: list[bytes | memoryview] = []
            start = 0
            for cut in cuts:
                pieces += (view[start:cut], _STUFFING_DOT)
                start = cut
            pieces.append(view[start:end])
            taken = b"".join(pieces)
            pieces.clear()  # release the slices before the buffer shrinks
    del buf[:end]
    return taken
