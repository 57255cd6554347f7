"""A raw POP3 login over loopback for the throttling tests: the exact reply and its time.

The server is a real ``popproxy run`` (tests/integration/harness.py), the client
tests/pop3client.py's `SocketPop3`. Times are taken around the PASS (or AUTH) line
only, with ``time.monotonic``; tests compare them with each other or check lower
bounds that the server's own delays guarantee.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from integration.harness import SOCKET_TIMEOUT_SECONDS
from pop3client import SocketPop3


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one login attempt got: the USER reply, the final reply, seconds it took."""

    user_reply: bytes
    reply: bytes
    seconds: float


def login(
    port: int,
    user: str,
    password: str,
    *,
    plain: bool = False,
    sasl_login: bool = False,
    source: str | None = None,
) -> Attempt:
    """One connection, USER/PASS (or AUTH PLAIN with an initial response, or AUTH LOGIN
    through its two prompts), then closed; from ``source`` (a loopback address) if given."""
    with SocketPop3(port, timeout=SOCKET_TIMEOUT_SECONDS, source=source) as pop:
        assert pop.greeting.startswith(b"+OK")
        if sasl_login:
            assert pop.cmd(b"AUTH LOGIN") == b"+ VXNlcm5hbWU6"  # "Username:"
            user_reply = pop.cmd(base64.b64encode(user.encode()))
            assert user_reply == b"+ UGFzc3dvcmQ6"  # "Password:"
            start = time.monotonic()
            pop.send(base64.b64encode(password.encode()) + b"\r\n")
        elif plain:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            user_reply = b""
            start = time.monotonic()
            pop.send(f"AUTH PLAIN {token}\r\n".encode())
        else:
            user_reply = pop.cmd(f"USER {user}")
            start = time.monotonic()
            pop.send(f"PASS {password}\r\n".encode())
        reply = pop.line()
        return Attempt(user_reply, reply, time.monotonic() - start)
