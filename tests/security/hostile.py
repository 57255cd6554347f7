"""A hostile POP3 upstream, written for the tests: a thread serving loopback sockets.

Each connection runs a `Script`, a function of a `HostileConnection` that reads
command lines and sends whatever octets it likes. Every octet the upstream
receives is recorded (before any TLS, or after it, marked as such), so a test can
assert what popproxy never sent: no USER, PASS or AUTH in clear.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from integration.harness import LOOPBACK, TlsFiles

# The upstream waits at most this long for popproxy's next line or connection.
HOSTILE_TIMEOUT_SECONDS = 15.0
RECV_BYTES = 65536
# How often the accepting thread looks whether the upstream is being closed.
ACCEPT_POLL_SECONDS = 0.05
# The verbs that carry credentials (RFC 1939 §7, RFC 5034 §4).
CREDENTIAL_VERBS = (b"USER", b"PASS", b"AUTH", b"APOP")


@dataclass
class Received:
    """The octets received on one connection, in clear and after TLS."""

    clear: bytearray = field(default_factory=bytearray)
    secure: bytearray = field(default_factory=bytearray)

    def command_lines(self, *, secure: bool) -> list[bytes]:
        data = self.secure if secure else self.clear
        return [line.rstrip(b"\r") for line in bytes(data).split(b"\n") if line]


class HostileConnection:
    """One accepted connection, as the script sees it."""

    def __init__(self, sock: socket.socket, received: Received) -> None:
        self.sock = sock
        self.received = received
        self.secure = False
        self._buf = bytearray()

    def send(self, data: bytes) -> bool:
        """Send octets; False if popproxy has already closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def line(self) -> bytes | None:
        """The next command line without its line end; None at end of stream."""
        while (end := self._buf.find(b"\n")) == -1:
            try:
                data = self.sock.recv(RECV_BYTES)
            except (OSError, ssl.SSLError):
                return None
            if not data:
                return None
            (self.received.secure if self.secure else self.received.clear).extend(data)
            self._buf += data
        line = bytes(self._buf[:end]).rstrip(b"\r")
        del self._buf[: end + 1]
        return line

    def verb(self) -> bytes | None:
        """The next command's verb, upper-cased; None at end of stream."""
        line = self.line()
        if line is None:
            return None
        return line.split(b" ", 1)[0].upper()

    def start_tls(self, context: ssl.SSLContext) -> None:
        assert not self._buf, "popproxy pipelined octets behind STLS"
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.secure = True

    def drain(self) -> None:
        """Read until popproxy closes (recording everything it sends)."""
        while self.line() is not None:
            pass


Script = Callable[[HostileConnection], None]


class HostileUpstream:
    """Listens on a loopback port and runs `script` on each connection, one at a time.

    `implicit_tls`: wrap each connection in TLS before the script runs (the handshake
    failing is recorded in `tls_failures`).
    """

    def __init__(self, script: Script, *, implicit_tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.implicit_tls = implicit_tls
        self.connections: list[Received] = []
        self.tls_failures: list[str] = []
        self.errors: list[BaseException] = []
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(ACCEPT_POLL_SECONDS)
        self.port: int = self.listener.getsockname()[1]
        self._closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue  # to see whether close() was called
            except OSError:
                return
            received = Received()
            self.connections.append(received)
            with contextlib.closing(sock):
                sock.settimeout(HOSTILE_TIMEOUT_SECONDS)
                # Each send leaves at once (no Nagle delay), so a test knows that what
                # the script sent is on its way when the script says so.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = HostileConnection(sock, received)
                if self.implicit_tls is not None:
                    try:
                        conn.start_tls(self.implicit_tls)
                    except (OSError, ssl.SSLError) as exc:
                        self.tls_failures.append(str(exc))
                        continue
                try:
                    self.script(conn)
                except Exception as exc:  # reported by close(): a thread cannot fail a test
                    self.errors.append(exc)
                with contextlib.suppress(OSError):
                    conn.sock.close()

    def close(self) -> None:
        self._closing.set()
        self.thread.join(HOSTILE_TIMEOUT_SECONDS)
        self.listener.close()
        assert not self.thread.is_alive(), "the hostile upstream did not stop"
        assert not self.errors, self.errors

    def credentials_in_clear(self) -> list[bytes]:
        """Every command line with a credential verb that arrived without TLS."""
        return [
            line
            for received in self.connections
            for line in received.command_lines(secure=False)
            if line.split(b" ", 1)[0].upper() in CREDENTIAL_VERBS
        ]

    def all_command_lines(self) -> list[bytes]:
        return [
            line
            for received in self.connections
            for secure in (False, True)
            for line in received.command_lines(secure=secure)
        ]


@contextlib.contextmanager
def hostile_upstream(
    script: Script, *, implicit_tls: ssl.SSLContext | None = None
) -> Iterator[HostileUpstream]:
    upstream = HostileUpstream(script, implicit_tls=implicit_tls)
    try:
        yield upstream
    finally:
        upstream.close()


def server_context(tls: TlsFiles, *, tls_1_1_only: bool = False) -> ssl.SSLContext:
    """A TLS server context with the test certificate; `tls_1_1_only` offers nothing
    newer than TLS 1.1 (and accepts the old ciphers it needs)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
    if tls_1_1_only:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # as it should be
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def tls_1_1_client(tls: TlsFiles) -> ssl.SSLContext:
    """A client that offers TLS 1.0 and 1.1 only and accepts any cipher for them."""
    context = tls.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def tls_1_1_works_here(tls: TlsFiles) -> bool:
    """Whether this machine's OpenSSL can still complete a TLS 1.1 handshake (between
    `tls_1_1_client` and a `tls_1_1_only` server), so that a refusal elsewhere is the
    refusing side's doing."""
    server = server_context(tls, tls_1_1_only=True)
    client = tls_1_1_client(tls)
    a, b = socket.socketpair()
    versions: list[str | None] = []

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as s:
                versions.append(s.version())
        except (OSError, ssl.SSLError):
            versions.append(None)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname=LOOPBACK) as s:
            versions.append(s.version())
    except (OSError, ssl.SSLError):
        return False
    finally:
        thread.join(HOSTILE_TIMEOUT_SECONDS)
    return bool(versions) and all(v == "TLSv1.1" for v in versions)
