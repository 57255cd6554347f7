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

The literal's socket is made non-blocking at its creation and becomes popproxy's
``TcpStream`` (popproxy/socket_stream.py) at once, with the options
``trio.SocketStream`` would set (``TCP_NODELAY``, ``TCP_NOTSENT_LOWAT``), rather than
a trio socket, a ``trio.SocketStream`` and then a ``TcpStream`` taking the socket
over: three ``ioctl`` calls, a ``getsockname`` and two wrappers fewer per
connection. The caller's deadline is a cancel scope only around a wait: a connect
the kernel completes within the call costs none.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import socket

import trio

from popproxy.socket_stream import TcpStream, set_stream_options

# Upstream hosts whose literal-or-not answer is remembered (one per configured upstream).
LITERAL_HOSTS_REMEMBERED = 256
# A socket made non-blocking by socket(2) itself, where the system has the flag.
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


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


async def open_tcp(host: str, port: int, *, deadline: float = math.inf) -> TcpStream:
    """A TCP connection to ``host``:``port`` by ``deadline`` (trio time); OSError if it
    cannot be made, ``trio.TooSlowError`` if the deadline passes first (the socket is
    closed then, as when the caller's own scopes cancel it)."""
    family = literal_family(host)
    if family is None:
        with trio.move_on_at(deadline):
            return TcpStream.from_trio(await trio.open_tcp_stream(host, port))
        raise trio.TooSlowError
    sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
    try:
        if not _NONBLOCK:
            sock.setblocking(False)
        await _connect(sock, (host, port), deadline)
        set_stream_options(sock)
    except BaseException:
        sock.close()
        raise
    return TcpStream(sock)


async def _connect(sock: socket.socket, address: tuple[str, int], deadline: float) -> None:
    """``connect`` a non-blocking ``sock`` (see the module docstring); OSError if it fails."""
    await trio.lowlevel.checkpoint_if_cancelled()
    error = sock.connect_ex(address)
    if error == errno.EINPROGRESS:
        if _established(sock):
            return
        with trio.move_on_at(deadline) as waited:
            await trio.lowlevel.wait_writable(sock)
        if waited.cancelled_caught:
            raise trio.TooSlowError
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
