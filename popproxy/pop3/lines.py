"""Bounded line framing shared by both roles (RFC 1939 §3).

A line ends at LF; one CR before it is removed. This is the single rule for
line ends on both legs (Dovecot also accepts a bare LF from clients). A line
longer than its bound is reported once and the rest of it is discarded up to
the next LF, so memory stays bounded whatever the peer sends.
"""

from __future__ import annotations

from dataclasses import dataclass

_CR = 0x0D


@dataclass(frozen=True, slots=True)
class Overlong:
    """A line exceeded its bound; it has been (or is being) discarded."""


class LineBuffer:
    """Accumulates received octets and hands out complete lines."""

    __slots__ = ("_discarding", "buffer", "eof")

    def __init__(self) -> None:
        # The unconsumed octets, shared with the body decoders. A plain attribute, not
        # a property: the cores test it for emptiness on every event (issue 15). It is
        # only ever changed in place, so a reference to it stays current.
        self.buffer = bytearray()
        self._discarding = False
        self.eof = False

    def receive(self, data: bytes | bytearray) -> None:
        """Append received octets; ``b""`` marks end of stream."""
        if not data:
            self.eof = True
        else:
            self.buffer += data

    def __len__(self) -> int:
        return len(self.buffer)

    def next_line(self, max_octets: int) -> bytes | Overlong | None:
        """Return the next line without its line end, Overlong, or None if incomplete.

        ``max_octets`` counts the line end too, as RFC 2449 §4 does.
        """
        buf = self.buffer
        while True:
            if self._discarding:
                newline = buf.find(b"\n")
                if newline == -1:
                    buf.clear()
                    return None
                del buf[: newline + 1]
                self._discarding = False
                continue
            newline = buf.find(b"\n", 0, max_octets)
            if newline == -1:
                if len(buf) >= max_octets:
                    self._discarding = True
                    return Overlong()
                return None
            end = newline - 1 if newline and buf[newline - 1] == _CR else newline
            line = bytes(buf[:end])
            del buf[: newline + 1]
            return line

    def peek_line(self, max_octets: int) -> bytes | None:
        """Return the next complete line (without its end) without consuming it."""
        newline = self.buffer.find(b"\n", 0, max_octets)
        if newline == -1 or self._discarding:
            return None
        line = bytes(self.buffer[:newline])
        return line[:-1] if line.endswith(b"\r") else line
