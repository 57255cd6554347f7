"""Bounded line framing shared by both roles (RFC 1939 §3).

A line ends at LF; one CR before it is removed. This is the single rule for
line ends on both legs (Dovecot also accepts a bare LF from clients). A line
longer than its bound is reported once and the rest of it is discarded up to
the next LF, so memory stays bounded whatever the peer sends.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Overlong:
    """A line exceeded its bound; it has been (or is being) discarded."""


class LineBuffer:
    """Accumulates received octets and hands out complete lines."""

    __slots__ = ("_buf", "_discarding", "eof")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._discarding = False
        self.eof = False

    @property
    def buffer(self) -> bytearray:
        """The unconsumed octets (for body decoders that share the buffer)."""
        return self._buf

    def receive(self, data: bytes | bytearray) -> None:
        """Append received octets; ``b""`` marks end of stream."""
        if not data:
            self.eof = True
        else:
            self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def next_line(self, max_octets: int) -> bytes | Overlong | None:
        """Return the next line without its line end, Overlong, or None if incomplete.

        ``max_octets`` counts the line end too, as RFC 2449 §4 does.
        """
        while True:
            newline = self._buf.find(b"\n", 0, max_octets if not self._discarding else None)
            if self._discarding:
                if newline == -1:
                    self._buf.clear()
                    return None
                del self._buf[: newline + 1]
                self._discarding = False
                continue
            if newline == -1:
                if len(self._buf) >= max_octets:
                    self._discarding = True
                    return Overlong()
                return None
            line = bytes(self._buf[:newline])
            del self._buf[: newline + 1]
            return line[:-1] if line.endswith(b"\r") else line

    def peek_line(self, max_octets: int) -> bytes | None:
        """Return the next complete line (without its end) without consuming it."""
        newline = self._buf.find(b"\n", 0, max_octets)
        if newline == -1 or self._discarding:
            return None
        line = bytes(self._buf[:newline])
        return line[:-1] if line.endswith(b"\r") else line
