"""The load generator: raw sockets, large reads, nothing parsed while timed.

Two clients:

- ``Client``, blocking, one connection: bulk and latency (one round trip at a time,
  where a blocking ``recv`` is the cheapest wait there is).
- ``Driver``, many non-blocking connections on one ``selectors`` loop: the sessions
  and idle scenarios. Each connection runs a script of ``Step`` s, one command at a
  time, and keeps every reply for checking afterwards.

Both speak implicit TLS when given a client context (RFC 8314 §3.3). Replies are
kept whole and checked (status lines, sha256 of bodies) after the timed part.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench.wire import TERMINATOR, Step, reply_end

# One recv: large, so that a 10 MiB RETR costs few system calls (TLS reads return at
# most one 16 KiB record each whatever is asked, RFC 8446 §5.1).
READ_BYTES = 1 << 20
# Blocking socket operations and whole scripts give up after this (the harness must
# end even when a server hangs).
IO_TIMEOUT_SECONDS = 120.0
# Connections the driver opens at once: below the listen backlog of both servers, so
# the kernel never drops a SYN (a dropped SYN costs a 1 s retransmit and skews p99).
MAX_CONNECTING = 256


class BenchError(Exception):
    """A server answered wrongly or not at all; the message says which and how."""


Address = tuple[str, int]


def _connect(address: Address, tls: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(address, IO_TIMEOUT_SECONDS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        return tls.wrap_socket(sock, server_hostname=address[0])
    return sock


class Client:
    """One blocking connection: greeting read, then commands one at a time."""

    def __init__(self, address: Address, tls: ssl.SSLContext | None = None) -> None:
        self.sock = _connect(address, tls)
        self._buf = bytearray()
        self.greeting = self.call(Step(b""))

    def call(self, step: Step) -> bytes:
        """Send ``step`` (nothing for the greeting) and return its whole reply."""
        if step.line:
            self.sock.sendall(step.line)
        buf = self._buf
        searched = 0
        while (end := reply_end(buf, step.multiline, searched)) is None:
            searched = max(0, len(buf) - len(TERMINATOR))
            chunk = self.sock.recv(READ_BYTES)
            if not chunk:
                raise BenchError(f"{step.verb or 'greeting'}: connection closed")
            buf += chunk
        reply = bytes(buf[:end])
        del buf[:end]
        return reply

    def login(self, user: str, password: str) -> None:
        """USER and PASS; BenchError unless both answer +OK (RFC 1939 §7)."""
        for line in (f"USER {user}\r\n", f"PASS {password}\r\n"):
            reply = self.call(Step(line.encode()))
            if not reply.startswith(b"+OK"):
                raise BenchError(f"login as {user}: {reply[:80]!r}")

    def retr_chunks(self, msg: int) -> list[bytes]:
        """RETR ``msg``, returned as the chunks read (status line included): the
        terminator is found from the last five octets only, nothing else is looked at."""
        if self._buf:
            raise BenchError("octets before RETR that no command asked for")
        self.sock.sendall(b"RETR %d\r\n" % msg)
        chunks: list[bytes] = []
        tail = b""
        while not tail.endswith(TERMINATOR):
            chunk = self.sock.recv(READ_BYTES)
            if not chunk:
                raise BenchError("connection closed inside a message")
            chunks.append(chunk)
            tail = (tail + chunk[-len(TERMINATOR) :])[-len(TERMINATOR) :]
            if len(chunks) == 1 and chunk.startswith(b"-"):
                raise BenchError(f"RETR {msg}: {chunk[:80]!r}")
        return chunks

    def close(self, *, quit_first: bool = True) -> None:
        """QUIT (nothing is marked, so nothing is deleted) and close."""
        with contextlib.suppress(OSError, BenchError):
            if quit_first:
                self.call(Step(b"QUIT\r\n"))
        self.sock.close()


@dataclass(slots=True)
class Conn:
    """One scripted connection of the ``Driver``."""

    address: Address
    steps: list[Step]
    sock: socket.socket | None = None
    replies: list[bytes] = field(default_factory=list)
    started: float = 0.0  # perf_counter at connect
    ended: float = 0.0  # perf_counter when the script's last reply was read
    error: str | None = None
    greeted: bool = False
    _step: int = 0  # the next step to send
    _buf: bytearray = field(default_factory=bytearray)
    _searched: int = 0
    _handshaking: bool = False

    @property
    def done(self) -> bool:
        """Every step has its reply (or the connection failed)."""
        return self.error is not None or (self.greeted and len(self.replies) == len(self.steps))

    @property
    def seconds(self) -> float:
        """Connect to the last reply."""
        return self.ended - self.started

    def extend(self, steps: Iterable[Step]) -> None:
        """More steps for an open connection (the idle scenario's NOOP round)."""
        self.steps.extend(steps)


class Driver:
    """Runs many ``Conn`` scripts on one selector loop, ``concurrency`` at a time."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._selector = selectors.DefaultSelector()

    def close(self) -> None:
        """Close the selector (not the connections: ``Conn.sock`` are the caller's)."""
        self._selector.close()

    def run(
        self,
        conns: Sequence[Conn],
        *,
        concurrency: int,
        timeout: float = IO_TIMEOUT_SECONDS,
    ) -> None:
        """Run each connection's remaining steps; new connections are opened as others
        finish, at most ``concurrency`` live and ``MAX_CONNECTING`` connecting at once.

        A connection whose script ends with QUIT is closed; others stay open (idle).
        Failures are recorded in ``Conn.error``; BenchError if the deadline passes.
        """
        deadline = time.monotonic() + timeout
        waiting = list(reversed(conns))
        live = 0
        while waiting or live:
            while waiting and live < concurrency:
                conn = waiting.pop()
                live += 1
                if conn.sock is None:
                    self._open(conn)
                else:
                    self._send_next(conn)
                if conn.done:
                    live -= 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{live} connections still busy after {timeout:g} s")
            for key, _events in self._selector.select(min(remaining, 1.0)):
                conn = key.data
                self._on_ready(conn)
                if conn.done:
                    self._selector.unregister(key.fileobj)
                    live -= 1
                    self._finish(conn)

    def _open(self, conn: Conn) -> None:
        conn.started = time.perf_counter()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        if self._tls is not None:
            # Wrapped before connecting: Python creates the TLS state only for a socket
            # that connects through the wrapper.
            sock = self._tls.wrap_socket(
                sock, server_hostname=conn.address[0], do_handshake_on_connect=False
            )
            conn._handshaking = True
        err = sock.connect_ex(conn.address)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            conn.error = f"connect: {os.strerror(err)}"
            return
        conn.sock = sock
        self._selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _on_ready(self, conn: Conn) -> None:
        sock = conn.sock
        assert sock is not None
        if conn._handshaking:
            assert isinstance(sock, ssl.SSLSocket)
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                self._selector.modify(sock, selectors.EVENT_READ, conn)
                return
            except ssl.SSLWantWriteError:
                return
            except OSError as exc:
                conn.error = f"TLS handshake: {exc}"
                return
            conn._handshaking = False
        self._selector.modify(sock, selectors.EVENT_READ, conn)
        try:
            while True:  # drain: TLS may hold decrypted octets the selector cannot see
                chunk = sock.recv(READ_BYTES)
                if not chunk:
                    conn.error = f"closed by the server after {len(conn.replies)} replies"
                    return
                conn._buf += chunk
                if not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                    break
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError as exc:
            conn.error = f"recv: {exc}"
            return
        self._read_replies(conn)

    def _read_replies(self, conn: Conn) -> None:
        while not conn.done:
            multiline = conn.greeted and conn.steps[len(conn.replies)].multiline
            end = reply_end(conn._buf, multiline, conn._searched)
            if end is None:
                conn._searched = max(0, len(conn._buf) - len(TERMINATOR))
                return
            reply = bytes(conn._buf[:end])
            del conn._buf[:end]
            conn._searched = 0
            if not conn.greeted:
                conn.greeted = True
            else:
                conn.replies.append(reply)
            if not reply.startswith(b"+OK"):
                conn.error = f"reply {len(conn.replies)}: {reply[:80]!r}"
                return
            if len(conn.replies) == len(conn.steps):
                conn.ended = time.perf_counter()
                return
            self._send_next(conn)

    def _send_next(self, conn: Conn) -> None:
        sock = conn.sock
        assert sock is not None
        step = conn.steps[conn._step]
        conn._step += 1
        try:
            sent = sock.send(step.line)  # a command is tiny: the socket buffer takes it
        except OSError as exc:
            conn.error = f"send {step.verb}: {exc}"
            return
        if sent != len(step.line):
            conn.error = f"send {step.verb}: short write"
            return
        if sock not in self._selector.get_map():
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _finish(self, conn: Conn) -> None:
        last = conn.steps[-1].line if conn.steps else b""
        if conn.error is not None or last.startswith(b"QUIT"):
            assert conn.sock is not None
            conn.sock.close()
            conn.sock = None


def close_all(conns: Iterable[Conn]) -> None:
    """Close every connection still open (without QUIT: nothing is committed)."""
    for conn in conns:
        if conn.sock is not None:
            conn.sock.close()
            conn.sock = None
