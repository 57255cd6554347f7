"""The upstream's TCP connection: a socket of its own for an IP literal.

``trio.open_tcp_stream`` resolves the host and races the addresses it gets
(RFC 8305, "happy eyeballs") in a nursery of its own: for a host name that is what
it should do, but for an upstream configured as an IP address there is one
address and nothing to race, and the resolution, the nursery and its cancel
scopes are a noticeable part of a short session's CPU (issue 15). An IP literal
(``inet_pton``'s strict forms: dotted quad, or IPv6 without a zone) gets one
socket and one ``connect``; anything else goes through ``open_tcp_stream``. Both
give a ``trio.SocketStream``, which sets ``TCP_NODELAY`` on it. The caller's
deadline and error mapping apply to both alike.
"""

from __future__ import annotations

import functools
import os
import socket

import trio

# Upstream hosts whose literal-or-not answer is remembered (one per configured upstream).
LITERAL_HOSTS_REMEMBERED = 256


@functools.lru_cache(maxsize=LITERAL_HOSTS_REMEMBERED)
def literal_family(host: str) -> socket.AddressFamily | None:
    """``AF_INET`` or ``AF_INET6`` when ``host`` is an IP address, else None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host``:``port``; OSError if it cannot be made.

    Cancellable: the caller's deadline bounds it (the socket is closed then)."""
    family = literal_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def connect_failure(exc: OSError) -> str:
    """Why a connection could not be made, for an operator: the system's reason
    ("Connection refused"), also when every address of a host name failed alike
    (trio words its errors "Error connecting to ...: reason")."""
    errors = [exc]
    if exc.errno is None and isinstance(exc.__cause__, ExceptionGroup):
        errors = [e for e in exc.__cause__.exceptions if isinstance(e, OSError)]
    reasons = {os.strerror(e.errno) if e.errno else str(e) for e in errors}
    return reasons.pop() if len(reasons) == 1 else str(exc)
