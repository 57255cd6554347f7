"""A raw POP3 login over loopback for the throttling tests: the exact reply and its time.

The server is a real ``popproxy run`` (tests/integration/harness.py). Times are taken
around the PASS (or AUTH) line only, with ``time.monotonic``; tests compare them with
each other or check lower bounds that the server's own delays guarantee.
"""

from __future__ import annotations

import base64
import socket
import time
from dataclasses import dataclass
from typing import BinaryIO

from integration.harness import LOOPBACK, SOCKET_TIMEOUT_SECONDS


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one login attempt got: the USER reply, the final reply, seconds it took."""

    user_reply: bytes
    reply: bytes
    seconds: float


def _line(file: BinaryIO) -> bytes:
    raw = file.readline()
    assert raw.endswith(b"\r\n"), raw
    return raw[:-2]


def login(port: int, user: str, password: str, *, plain: bool = False) -> Attempt:
    """One connection, USER/PASS (or AUTH PLAIN with an initial response), then closed."""
    # The file is closed too: a socket with an open makefile() is not really closed.
    with (
        socket.create_connection((LOOPBACK, port), timeout=SOCKET_TIMEOUT_SECONDS) as sock,
        sock.makefile("rb") as file,
    ):
        assert _line(file).startswith(b"+OK")
        if plain:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            user_reply = b""
            start = time.monotonic()
            sock.sendall(f"AUTH PLAIN {token}\r\n".encode())
        else:
            sock.sendall(f"USER {user}\r\n".encode())
            user_reply = _line(file)
            start = time.monotonic()
            sock.sendall(f"PASS {password}\r\n".encode())
        reply = _line(file)
        return Attempt(user_reply, reply, time.monotonic() - start)
