"""The raw POP3 client the tests talk through: `Pop3Client` over any trio stream, and
`SocketPop3`, its blocking twin over a real loopback socket.

`Pop3Client` sends exactly the octets a test gives it and reads replies line by line,
so a test can assert each reply to the byte: `line` is the next line without its CRLF,
`body` and `body_lines` read a multi-line reply to its terminator and un-stuff it
(RFC 1939 §3), checking on the way that every line-start dot was stuffed. The stream
may be one end of a `trio.testing.memory_stream_pair` (session tests) or a loopback
TCP connection (serve tests); `open_loopback` opens the latter and records it, and the
synchronous `close_client_streams` fixture in tests/conftest.py closes what is left.

`SocketPop3` does the same over a blocking socket for the tests that drive a popproxy
subprocess (tests/integration, tests/security), every read under a socket timeout, so
a test can also assert whether and when the server closed.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Self

import trio

LOOPBACK = "127.0.0.1"
# One receive_some; replies are short, bodies a few kilobytes.
RECEIVE_BYTES = 65536
# A SocketPop3 read waits at most this long: a server that neither answers nor closes
# fails the test instead of hanging it.
READ_TIMEOUT_SECONDS = 15.0
# A reply line longer than this is a failure of the server under test (RFC 2449 §4: 512).
MAX_REPLY_LINE_BYTES = 512
# How much a closing server may still send before its end of stream (a goodbye line,
# the rest of a reply).
MAX_TAIL_BYTES = 1 << 20


class Closed(AssertionError):
    """The server closed the connection where a reply line was expected."""


# The loopback streams tests opened; closed after each test (see close_opened).
_OPENED: list[trio.SocketStream] = []


async def open_loopback(port: int) -> trio.SocketStream:
    """A TCP connection to ``port`` on 127.0.0.1, closed after the test if it is not."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    _OPENED.append(stream)
    return stream


def close_opened() -> None:
    """Close every stream `open_loopback` opened and the test left open.

    Called after the test's trio run is over, so each socket is taken back from trio
    (detached) and its descriptor closed directly.
    """
    while _OPENED:
        fd = _OPENED.pop().socket.detach()
        if fd != -1:  # -1: the test closed it itself
            os.close(fd)


class Pop3Client:
    """A POP3 client that sends raw octets and reads exact reply lines.

    ``receive_timeout``: each receive waits at most this long (virtual seconds under
    autojump_clock); None for no limit of its own (the test's deadline applies).
    ``before_receive`` runs before each receive (a test may raise from it to vanish).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        receive_bytes: int = RECEIVE_BYTES,
        receive_timeout: float | None = None,
        before_receive: Callable[[], None] | None = None,
    ) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.receive_bytes = receive_bytes
        self.receive_timeout = receive_timeout
        self.before_receive = before_receive

    async def receive(self) -> bool:
        """One receive into the buffer; False at end of stream."""
        if self.before_receive is not None:
            self.before_receive()
        if self.receive_timeout is None:
            data = await self.stream.receive_some(self.receive_bytes)
        else:
            with trio.fail_after(self.receive_timeout):
                data = await self.stream.receive_some(self.receive_bytes)
        self.buf += data
        return bool(data)

    async def next_line(self) -> bytes | None:
        """The next line without its CRLF; None when the server closed between lines."""
        while (end := self.buf.find(b"\r\n")) == -1:
            if not await self.receive():
                assert not self.buf, f"the server closed inside a line: {bytes(self.buf)!r}"
                return None
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    async def line(self) -> bytes:
        """The next line without its CRLF; EOFError if the server closed first."""
        line = await self.next_line()
        if line is None:
            raise EOFError
        return line

    async def send(self, data: bytes) -> None:
        """Send octets as they are."""
        await self.stream.send_all(data)

    async def cmd(self, line: bytes | str) -> bytes:
        """Send one command line (CRLF added) and return the status line."""
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.line()

    async def next_body_lines(self) -> list[bytes] | None:
        """The lines of a multi-line body after its status line, un-stuffed (RFC 1939 §3);
        None if the server closed before the terminator."""
        lines = []
        while (line := await self.next_line()) != b".":
            if line is None:
                return None
            if line.startswith(b"."):
                assert line.startswith(b".."), f"a line-start dot not stuffed: {line[:60]!r}"
                line = line[1:]
            lines.append(line)
        return lines

    async def body_lines(self) -> list[bytes]:
        """As `next_body_lines`; EOFError if the server closed before the terminator."""
        lines = await self.next_body_lines()
        if lines is None:
            raise EOFError
        return lines

    async def body(self) -> bytes:
        """The rest of a multi-line reply, un-stuffed, each line with its CRLF."""
        return b"".join(line + b"\r\n" for line in await self.body_lines())

    async def multi(self, line: bytes | str) -> tuple[bytes, bytes]:
        """A command that must get +OK and a multi-line body: its status line and body."""
        status = await self.cmd(line)
        assert status.startswith(b"+OK"), status
        return status, await self.body()

    async def multiline(self, line: bytes | str) -> list[bytes]:
        """A command that must get +OK and a multi-line body: the body's lines."""
        status = await self.cmd(line)
        assert status.startswith(b"+OK"), status
        return await self.body_lines()

    async def login(self, user: str, password: str) -> bytes:
        """USER (which must get a bare +OK) then PASS; the reply to PASS (RFC 1939 §7)."""
        assert await self.cmd(f"USER {user}") == b"+OK"
        return await self.cmd(f"PASS {password}")

    async def at_eof(self) -> bool:
        """Whether the server has closed with nothing left unread: the buffer is empty and
        the next receive is its end of stream (a reset counts as closed)."""
        if self.buf:
            return False
        try:
            return not await self.receive()
        except trio.BrokenResourceError:
            return True

    async def rest_until_closed(self) -> bytes:
        """Everything the server still sends, up to its end of stream (which must come)."""
        while await self.receive():
            assert len(self.buf) <= MAX_TAIL_BYTES, "the server keeps sending and does not close"
        rest = bytes(self.buf)
        self.buf.clear()
        return rest

    async def start_tls(self, context: ssl.SSLContext, hostname: str = LOOPBACK) -> bytes:
        """Wrap the stream in TLS and handshake (after +OK to STLS, or at once for implicit
        TLS); return the server's leaf certificate (DER)."""
        assert not self.buf, f"octets left before the handshake: {bytes(self.buf)!r}"
        tls = trio.SSLStream(self.stream, context, server_hostname=hostname)
        await tls.do_handshake()
        self.stream = tls
        der = tls.getpeercert(binary_form=True)
        assert isinstance(der, bytes), der
        return der


class SocketPop3:
    """The blocking twin of `Pop3Client`: raw octets out, exact reply lines in.

    ``tls`` wraps the socket at once (implicit TLS); ``greet=False`` leaves the greeting
    unread; ``source`` is the local address to connect from (e.g. 127.0.0.2, another
    client as the server sees it). ``max_line_bytes`` bounds a line without its CRLF.
    """

    def __init__(
        self,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        greet: bool = True,
        host: str = LOOPBACK,
        timeout: float = READ_TIMEOUT_SECONDS,
        max_line_bytes: int = MAX_REPLY_LINE_BYTES,
        source: str | None = None,
    ) -> None:
        source_address = (source, 0) if source is not None else None
        sock = socket.create_connection((host, port), timeout, source_address)
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            self.host = host
            self.sock = sock
            self.buf = bytearray()
            self.max_line_bytes = max_line_bytes
            self.greeting = self.line() if greet else b""
        except BaseException:
            sock.close()  # a refused handshake or a missing greeting leaks no socket
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close without QUIT: a FIN."""
        self.sock.close()

    def reset(self) -> None:
        """Close with an RST: SO_LINGER on with a zero timeout, then close."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def send(self, data: bytes) -> None:
        """Send octets as they are."""
        self.sock.sendall(data)

    def receive(self) -> bool:
        """One recv into the buffer; False at end of stream."""
        data = self.sock.recv(RECEIVE_BYTES)
        self.buf += data
        return bool(data)

    def line(self) -> bytes:
        """The next line without its CRLF; `Closed` if the server closed first."""
        while (end := self.buf.find(b"\r\n")) == -1:
            assert len(self.buf) <= self.max_line_bytes, f"overlong line: {self.buf[:80]!r}"
            if not self.receive():
                raise Closed(f"closed; unterminated tail {bytes(self.buf)!r}")
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def lines(self, count: int) -> list[bytes]:
        return [self.line() for _ in range(count)]

    def cmd(self, line: bytes | str) -> bytes:
        """Send one command line (CRLF added), return the status line."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.line()

    def body(self) -> list[bytes]:
        """The lines of a multi-line body after its status line, un-stuffed (RFC 1939 §3)."""
        out = []
        while (raw := self.line()) != b".":
            out.append(raw[1:] if raw.startswith(b".") else raw)
        return out

    def login(self, user: str, password: str) -> bytes:
        """USER (which must get a bare +OK) then PASS; the reply to PASS (RFC 1939 §7)."""
        assert self.cmd(f"USER {user}") == b"+OK"
        return self.cmd(f"PASS {password}")

    def start_tls(self, context: ssl.SSLContext) -> bytes:
        """Wrap the socket in TLS (after +OK to STLS); return the server's leaf (DER)."""
        assert not self.buf, f"octets left before the handshake: {bytes(self.buf)!r}"
        plain = self.sock
        try:
            self.sock = context.wrap_socket(plain, server_hostname=self.host)
        except BaseException:
            plain.close()
            raise
        return self.peer_certificate()

    def peer_certificate(self) -> bytes:
        """The server's leaf certificate (DER); the socket must be a TLS one."""
        assert isinstance(self.sock, ssl.SSLSocket), self.sock
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return der

    def at_eof(self) -> bool:
        """Whether the server has closed with nothing left unread: the buffer is empty and
        the next read (within the timeout) is its end of stream (a reset counts too)."""
        if self.buf:
            return False
        try:
            return not self.receive()
        except ConnectionResetError:
            return True

    def rest_until_closed(self) -> bytes:
        """Everything the server still sends, up to its end of stream (which must come)."""
        while len(self.buf) <= MAX_TAIL_BYTES:
            try:
                if not self.receive():
                    break
            except ConnectionResetError:
                break
        else:
            raise AssertionError("the server keeps sending and does not close")
        rest = bytes(self.buf)
        self.buf.clear()
        return rest
