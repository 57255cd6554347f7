"""A raw POP3 client over real loopback sockets, and the popproxy under attack.

`RawPop3` sends exactly the octets a test gives it and reads replies line by line
under a socket timeout, so a test can assert each reply to the byte, and whether
and when the server closed. `Target` is a popproxy subprocess routing one local
user to a Dovecot account; `Target.still_serves` is the check every test ends with:
a fresh session logs in and gets a message byte for byte.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from integration.conftest import StartServer
from integration.dovecot import DovecotServer, DovecotUser
from integration.harness import LOOPBACK, PASSWORD, Corpus, ProxyUser, ServerProcess, Upstream

# Every read waits at most this long: a server that neither answers nor closes fails
# the test instead of hanging it.
READ_TIMEOUT_SECONDS = 15.0
# One recv; replies are small, bodies a few kilobytes.
RECV_BYTES = 65536
# A reply line longer than this is a failure of the server under test (RFC 2449 §4: 512).
MAX_REPLY_LINE_BYTES = 512
# How much a closing server may still send before its end of stream (a goodbye line,
# the rest of a reply).
MAX_TAIL_BYTES = 1 << 20

UPSTREAM = "dovecot"
LOCAL_USER = "mallory"


class Closed(AssertionError):
    """The server closed the connection where a reply line was expected."""


class RawPop3:
    """A POP3 client that sends raw octets and reads exact reply lines."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None, greet: bool = True) -> None:
        sock = socket.create_connection((LOOPBACK, port), timeout=READ_TIMEOUT_SECONDS)
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=LOOPBACK)
            self.sock = sock
            self.buf = bytearray()
            self.greeting = self.line() if greet else b""
        except BaseException:
            sock.close()  # a refused handshake or a missing greeting leaks no socket
            raise

    def __enter__(self) -> RawPop3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> bool:
        data = self.sock.recv(RECV_BYTES)
        self.buf += data
        return bool(data)

    def line(self) -> bytes:
        """The next line without its CRLF; `Closed` if the server closed first."""
        while (end := self.buf.find(b"\r\n")) == -1:
            assert len(self.buf) <= MAX_REPLY_LINE_BYTES, f"overlong line: {self.buf[:80]!r}"
            if not self.receive():
                raise Closed(f"closed; unterminated tail {bytes(self.buf)!r}")
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def lines(self, count: int) -> list[bytes]:
        return [self.line() for _ in range(count)]

    def cmd(self, line: bytes) -> bytes:
        """Send one command line (CRLF added), return the status line."""
        self.send(line + b"\r\n")
        return self.line()

    def body(self) -> list[bytes]:
        """The lines of a multi-line body after its status line, un-stuffed (RFC 1939 §3)."""
        out = []
        while (raw := self.line()) != b".":
            out.append(raw[1:] if raw.startswith(b".") else raw)
        return out

    def login(self, user: str, password: str = PASSWORD) -> bytes:
        assert self.cmd(b"USER " + user.encode()) == b"+OK"
        return self.cmd(b"PASS " + password.encode())

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buf, f"octets left before the handshake: {bytes(self.buf)!r}"
        plain = self.sock
        try:
            self.sock = context.wrap_socket(plain, server_hostname=LOOPBACK)
        except BaseException:
            plain.close()
            raise

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


@dataclass
class Target:
    """A popproxy subprocess whose user LOCAL_USER is routed to a Dovecot account."""

    server: ServerProcess
    mailbox: DovecotUser
    messages: frozenset[bytes]  # the CRLF form of each message in the account

    @classmethod
    def start(
        cls,
        start: StartServer,
        dovecot: DovecotServer,
        mailbox: DovecotUser,
        corpus: Corpus,
        *,
        limits: Mapping[str, float | int] | None = None,
        allow_plaintext_auth: bool = True,
        users: tuple[ProxyUser, ...] = (),
        upstreams: Mapping[str, Upstream] | None = None,
    ) -> Target:
        host, port = dovecot.endpoint("starttls")
        server = start(
            users=[
                ProxyUser(LOCAL_USER, PASSWORD, UPSTREAM, mailbox.name, mailbox.password),
                *users,
            ],
            upstreams={
                UPSTREAM: Upstream(host, port, "starttls", ca_file=dovecot.ca_file),
                **(upstreams or {}),
            },
            allow_plaintext_auth=allow_plaintext_auth,
            limits=limits,
        )
        keys = mailbox.keys()
        expected = frozenset(m.crlf or b"" for m in corpus.small if m.key in keys)
        assert len(expected) == mailbox.count()
        return cls(server, mailbox, expected)

    def port(self, kind: str = "none") -> int:
        return self.server.port(kind)

    def connect(self, kind: str = "none", *, tls: ssl.SSLContext | None = None) -> RawPop3:
        return RawPop3(self.port(kind), tls=tls)

    def still_serves(self) -> None:
        """A fresh session logs in and retrieves message 1 byte for byte, then QUITs
        (nothing was marked, so nothing is deleted)."""
        with self.connect() as pop:
            assert pop.greeting.startswith(b"+OK"), pop.greeting
            assert pop.login(LOCAL_USER).startswith(b"+OK Logged in"), "login failed"
            assert pop.cmd(b"RETR 1").startswith(b"+OK")
            body = b"".join(line + b"\r\n" for line in pop.body())
            assert body in self.messages
            assert pop.cmd(b"QUIT").startswith(b"+OK")
        assert self.mailbox.count() == len(self.messages)
