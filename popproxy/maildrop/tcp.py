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

The literal's ``connect`` is trio's minus one pass through the scheduler: a
non-blocking connect says "in progress" even where the kernel completes it within
the call (loopback, the same host), and trio then waits for the socket to become
writable, which it already is. Here a connect found established at once
(``getpeername`` answers) goes on without waiting; one still in progress waits
for writability as trio's does and reads its outcome from ``SO_ERROR``.
"""

from __future__ import annotations

import errno
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
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await _connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """``connect`` a non-blocking ``sock`` (see the module docstring); OSError if it fails."""
    await trio.lowlevel.checkpoint_if_cancelled()
    error = sock.connect_ex(address)
    if error == errno.EINPROGRESS:
        if _established(sock):
            return
        await trio.lowlevel.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, f"Error connecting to {address!r}: {os.strerror(error)}")


def _established(sock: socket.socket) -> bool:
    """Whether a connect in progress has already completed (it has a peer)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def connect_failure(exc: OSError) -> str:
    """Why a connection could not be made, for an operator: the system's reason
    ("Connection refused"), also when every address of a host name failed alike
    (trio words its errors "Error connecting to ...: reason")."""
    errors = [exc]
    if exc.errno is None and isinstance(exc.__cause__, ExceptionGroup):
        errors = [e for e in exc.__cause__.exceptions if isinstance(e, OSError)]
    reasons = {os.strerror(e.errno) if e.errno else str(e) for e in errors}
    return reasons.pop() if len(reasons) == 1 else str(exc)
