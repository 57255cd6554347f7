"""Streaming transforms of a message file for POP3: LF to CRLF (RFC 1939 §3) and TOP (§7).

Pure (no I/O): the Maildir maildrop feeds them the chunks it reads in worker threads.
"""

from __future__ import annotations

_LF = 0x0A


class CrlfConverter:
    """Streaming LF→CRLF conversion of a message file (RFC 1939 §3).

    Every LF not preceded by CR becomes CRLF, an existing CRLF stays, a bare CR
    stays, and ``finish`` adds a CRLF if the output did not end with one (an empty
    file becomes one empty line). A CR that ends a chunk is held back until the
    next chunk shows whether an LF follows, so a CRLF split across chunks stays CRLF.
    """

    __slots__ = ("_ends_with_lf", "_pending_cr")

    def __init__(self) -> None:
        self._pending_cr = False
        self._ends_with_lf = False

    def feed(self, data: bytes) -> bytes:
        """Convert the next chunk of the file; may return less (a held-back CR)."""
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._pending_cr = True
        if not data:
            return b""
        out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self._ends_with_lf = out[-1] == _LF
        return out

    def finish(self) -> bytes:
        """The rest of the output at end of file: a held CR and the final CRLF if missing."""
        out = b""
        if self._pending_cr:
            out = b"\r"
            self._pending_cr = False
            self._ends_with_lf = False
        if not self._ends_with_lf:
            out += b"\r\n"
            self._ends_with_lf = True
        return out


class TopFilter:
    """Streaming cut of CRLF output for TOP (RFC 1939 §7).

    Passes the header, the blank line after it, then ``body_lines`` body lines,
    and sets ``done``. A message without a blank line is all header and passes whole.
    """

    __slots__ = ("_in_body", "_remaining", "_tail", "done")

    def __init__(self, body_lines: int) -> None:
        if body_lines < 0:
            raise ValueError("body_lines must be >= 0")
        self._remaining = body_lines
        self._in_body = False
        # The last two octets seen in the header; a virtual LF before the message start
        # lets a blank first line match the same pattern as any other blank line.
        self._tail = b"\n"
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Return the part of ``data`` TOP sends; nothing once ``done``."""
        if self.done:
            return b""
        start = 0
        if not self._in_body:
            hay = self._tail + data
            hit = hay.find(b"\n\r\n")
            if hit == -1:
                self._tail = hay[-2:]
                return data
            start = hit + 3 - len(self._tail)
            self._in_body = True
        pos = start
        if self._remaining > 0:
            lines = data.count(b"\n", start)
            if lines < self._remaining:
                self._remaining -= lines
                return data
        while self._remaining > 0:
            pos = data.index(b"\n", pos) + 1
            self._remaining -= 1
        self.done = True
        return data[:pos]
