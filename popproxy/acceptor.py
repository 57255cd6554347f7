"""Accepting clients straight into a ``TcpStream`` (issue 15).

``trio.SocketListener.accept`` makes each connection three objects in turn (a trio
socket, a ``trio.SocketStream``, then the ``TcpStream`` of popproxy/socket_stream.py
that takes the socket over) and passes through trio's scheduler even when a client
was already waiting. ``Acceptor`` calls ``accept(2)`` on the listening socket itself
and makes the ``TcpStream`` at once, with the options ``trio.SocketStream`` sets
(``TCP_NODELAY``, ``TCP_NOTSENT_LOWAT``). Its semantics are trio's:

- it waits for readability only when no client is waiting; every call first checks
  for a cancel, and the wait is a cancel point;
- fairness: after ``MAX_ACCEPTS_WITHOUT_CHECKPOINT`` accepts in a row without a
  wait, the next one takes a real checkpoint, so a burst of connections cannot hold
  the sessions already running up;
- an error that ``accept(2)`` reports for the connection being accepted, not the
  listener (``SKIPPED_ERRNOS``), skips that connection; any other ``OSError`` is
  raised (the caller retries out-of-resource ones).

It accepts on a duplicate of the listener's descriptor, which it closes when it is
done (``close``, or leaving its ``with`` block): the listener stays the caller's, to
close when it stops listening.
"""

from __future__ import annotations

import errno
import os
import socket
from types import TracebackType

import trio

from popproxy.peer import UNKNOWN_PEER, PeerAddress, socket_peer
from popproxy.socket_stream import TcpStream, set_stream_options

# Accepts in a row without a wait before one real checkpoint (as socket_stream's
# MAX_OPS_WITHOUT_CHECKPOINT: a few dozen microseconds each, so well under a millisecond).
MAX_ACCEPTS_WITHOUT_CHECKPOINT = 16
# accept(2), ERRORS: Linux passes a pending network error of the new connection as
# accept's own (ENETDOWN, EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH,
# EOPNOTSUPP, ENETUNREACH), ECONNABORTED is a connection aborted before it was taken,
# EPERM one a firewall refused; a reset or a timeout is the client's too.
SKIPPED_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.ECONNRESET,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENONET,
        errno.ENOPROTOOPT,
        errno.EOPNOTSUPP,
        errno.EPERM,
        errno.EPROTO,
        errno.ETIMEDOUT,
    }
)


class Acceptor:
    """Accepts the clients of one listening socket as ``TcpStream``s (see the module
    docstring); for one task at a time."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self._socket = socket.socket(fileno=os.dup(listener.socket.fileno()))
        self._socket.setblocking(False)
        self._in_a_row = 0

    def __enter__(self) -> Acceptor:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close this acceptor's descriptor (not the listener's)."""
        if self._socket.fileno() != -1:
            trio.lowlevel.notify_closing(self._socket)
            self._socket.close()

    async def accept(self) -> tuple[TcpStream, PeerAddress]:
        """The next client's connection and its peer (``UNKNOWN_PEER`` if the client is
        already gone: ``getpeername`` says so, as a reset health check's); waits until
        one is there."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                connection, _ = self._socket.accept()
            except BlockingIOError:
                self._in_a_row = 0
                await trio.lowlevel.wait_readable(self._socket)
                continue
            except OSError as exc:
                if exc.errno in SKIPPED_ERRNOS:
                    continue
                raise
            break
        try:
            stream = _stream(connection)
        except BaseException:
            connection.close()
            raise
        peer = connection_peer(connection)
        self._in_a_row += 1
        if self._in_a_row >= MAX_ACCEPTS_WITHOUT_CHECKPOINT:
            self._in_a_row = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        return stream, peer


def connection_peer(connection: socket.socket) -> PeerAddress:
    """The TCP peer of an accepted connection (``UNKNOWN_PEER`` if it is already gone)."""
    try:
        return socket_peer(connection.getpeername())
    except OSError:
        return UNKNOWN_PEER


def _stream(connection: socket.socket) -> TcpStream:
    """``connection`` as a ``TcpStream``, with the options trio.SocketStream sets."""
    set_stream_options(connection)
    return TcpStream(connection)
