"""A TCP relay between popproxy and a real upstream that can stop a QUIT half way.

Crash tests need popproxy to be killed at an exact point of its QUIT: after it sent
its DELEs but before the upstream got QUIT, or after the upstream committed (its
QUIT ``+OK`` is on the way) but before popproxy heard of it. The relay forwards
bytes both ways on loopback and, when told, holds one direction at that point
and sets ``holding``. It only ever delays bytes, never changes them: the upstream
is still the real Dovecot. Plain upstream leg only (it reads the commands).
"""

from __future__ import annotations

import contextlib
import enum
import socket
import threading
from types import TracebackType

from .harness import LOOPBACK, SOCKET_TIMEOUT_SECONDS

RELAY_CHUNK_BYTES = 64 * 1024
QUIT_LINE = b"QUIT\r\n"


class Hold(enum.Enum):
    NOTHING = "nothing"
    QUIT = "quit"  # popproxy's QUIT never reaches the upstream (DELEs before it do)
    QUIT_REPLY = "quit_reply"  # the upstream's answer to QUIT never reaches popproxy


class HoldingRelay:
    """Relay 127.0.0.1:port <-> ``target``; see the module docstring."""

    def __init__(self, target: tuple[str, int], hold: Hold) -> None:
        self._target = target
        self._hold = hold
        self.holding = threading.Event()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(SOCKET_TIMEOUT_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target, timeout=SOCKET_TIMEOUT_SECONDS)
            self._sockets += [client, upstream]
            quit_sent = threading.Event()
            for args in ((client, upstream, True, quit_sent), (upstream, client, False, quit_sent)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        to_upstream: bool,
        quit_sent: threading.Event,
    ) -> None:
        tail = b""
        try:
            while not self._closed:
                try:
                    data = source.recv(RELAY_CHUNK_BYTES)
                except TimeoutError:
                    continue
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                if to_upstream:
                    seen = tail + data
                    at = seen.find(QUIT_LINE)
                    if at != -1:
                        if self._hold is Hold.QUIT:
                            sink.sendall(seen[len(tail) : at] if at >= len(tail) else b"")
                            self.holding.set()
                            return  # nothing more reaches the upstream
                        quit_sent.set()
                    tail = seen[-len(QUIT_LINE) :]
                elif quit_sent.is_set() and self._hold is Hold.QUIT_REPLY:
                    self.holding.set()  # the upstream answered QUIT: it has committed
                    return
                sink.sendall(data)
        except OSError:
            return

    def pass_quits(self) -> None:
        """Hold nothing more: a connection's QUIT from now on reaches the upstream (one
        already held stays held)."""
        self._hold = Hold.NOTHING

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv
            sock.close()

    def __enter__(self) -> HoldingRelay:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
