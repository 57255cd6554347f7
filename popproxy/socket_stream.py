"""A trio stream over a connected TCP socket that skips trio's scheduler when the
system call completes at once (issue 15, docs/benchmarks.md).

Theory of operation. ``trio.SocketStream`` makes every ``send_all`` and
``receive_some`` a full checkpoint: after a ``send``/``recv`` that succeeded at
once it still passes through the scheduler (``cancel_shielded_checkpoint``, an
``epoll_wait``) and a conflict detector. On a proxy that is most of its CPU: each
command and reply is one such pass on each leg. ``TcpStream`` calls the socket at
once and waits for readiness (``trio.lowlevel.wait_readable`` / ``wait_writable``)
only when the kernel says it would block. Its semantics are trio's:

- cancellation: every operation first checks for a cancel
  (``checkpoint_if_cancelled``, cheap), and every wait is a cancel point; an
  operation that completed is never undone by a cancel;
- fairness: an operation that completed without waiting skips the scheduler, but
  after ``MAX_OPS_WITHOUT_CHECKPOINT`` such operations in a row (counted for the
  whole thread, across every ``TcpStream``) the next one takes a real
  checkpoint, so a client flooding pipelined commands or a fast upstream cannot
  starve the other sessions of this process;
- errors: ``OSError`` becomes ``trio.BrokenResourceError`` (the cause chained), a
  closed socket (``EBADF``, ``ENOTSOCK``) ``trio.ClosedResourceError``; a send
  after ``send_eof`` is ``trio.ClosedResourceError``; two tasks waiting to send (or
  receive) at once is ``trio.BusyResourceError``.

Deadlines. ``send_all`` and ``receive_some`` take an optional ``wait_seconds``: how long
the call may *wait* in all (``trio.TooSlowError`` after that). The cancel scope
for it is entered only once the call has to wait, so a write or read that
completes at once costs none. ``wait_bounded`` gives the same meaning for any
``trio.abc.Stream``: a ``WaitBoundedStream`` (this module's ``TcpStream``, the
listeners' ``NativeTlsStream``) bounds its own waits and is returned as it is, any
other stream is wrapped in ``ScopedWaits`` (a scope around the whole call); a caller
looks it up once per stream. ``checkpoint_due`` and
``note_wait`` let such a stream share the fairness count.

It implements ``trio.abc.HalfCloseableStream``, so ``trio.SSLStream`` and the
session's wrappers (``PrefixedStream``, ``AlpnGuard``) wrap it as they wrap
``trio.SocketStream``. ``TcpStream.from_trio`` takes over the socket of a
``trio.SocketStream`` (an accepted or connected one), keeping its options
(``TCP_NODELAY``, ``TCP_NOTSENT_LOWAT``). Self-contained: it imports nothing of
popproxy (but the brief waits of ``quick_wait.py``).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from abc import abstractmethod
from typing import cast

import trio

from popproxy.quick_wait import QuickWait

# An operation that completed without waiting skips the scheduler; after this many in
# a row (in one thread, on any TcpStream or NativeTlsStream) the next one takes a real
# checkpoint.
# Each skip saves a pass of trio's run loop (about 30-40 µs of CPU on the proxy's
# benchmark machine); 16 in a row hold another task up for well under a millisecond.
MAX_OPS_WITHOUT_CHECKPOINT = 16
# What ``receive_some()`` without a size reads at most (trio's default).
DEFAULT_RECEIVE_BYTES = 64 * 1024

# errno values that mean the socket was closed under us (as trio.SocketStream maps them).
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})
# trio.SocketStream's TCP_NOTSENT_LOWAT (16 KiB), which the streams it made had.
NOTSENT_LOWAT_BYTES = 16 * 1024


class _Unyielded:
    """How many operations completed in a row without a pass through the scheduler."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops = 0


# One count for the thread's trio run: a task yields within MAX_OPS_WITHOUT_CHECKPOINT
# of its own operations, however many streams it uses (a session drives two).
_UNYIELDED = _Unyielded()


def checkpoint_due() -> bool:
    """Count an operation that completed without waiting; True when it is the one that
    must take a real checkpoint (every ``MAX_OPS_WITHOUT_CHECKPOINT``-th in a row)."""
    unyielded = _UNYIELDED
    unyielded.ops += 1
    if unyielded.ops < MAX_OPS_WITHOUT_CHECKPOINT:
        return False
    unyielded.ops = 0
    return True


def note_wait() -> None:
    """An operation is about to wait: a pass through the scheduler, so the count of
    operations without one starts again."""
    _UNYIELDED.ops = 0


def set_stream_options(sock: socket.socket) -> None:
    """The options ``trio.SocketStream`` sets on a connected TCP socket (``TCP_NODELAY``,
    ``TCP_NOTSENT_LOWAT``), for a socket that becomes a ``TcpStream`` without one (an
    accepted client, an upstream connection); an option the socket does not take is
    left as it is, as trio does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """The trio stream error for a failed socket call (as trio.SocketStream's)."""
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


# Every WaitBoundedStream class: a set lookup of the stream's type is cheaper than an
# ABC's isinstance, and the helpers below run for every command and reply.
_WAIT_BOUNDED: set[type[trio.abc.Stream]] = set()


class WaitBoundedStream(trio.abc.Stream):
    """A stream whose ``send_all`` and ``receive_some`` take ``wait_seconds``: the most
    the call may wait (``trio.TooSlowError``), with a cancel scope entered only once it
    has to wait. ``wait_bounded`` returns such a stream as it is."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        _WAIT_BOUNDED.add(cls)

    @abstractmethod
    async def send_all(
        self, data: bytes | bytearray | memoryview, *, wait_seconds: float | None = None
    ) -> None:
        """Send all of ``data``, waiting at most ``wait_seconds`` (None: unbounded)."""

    @abstractmethod
    async def receive_some(
        self, max_bytes: int | None = None, *, wait_seconds: float | None = None
    ) -> bytes | bytearray:
        """At most ``max_bytes`` octets, waiting at most ``wait_seconds`` (None: unbounded)."""


class TcpStream(WaitBoundedStream, trio.abc.HalfCloseableStream):
    """A ``trio.abc.HalfCloseableStream`` over a connected stream socket (see the module
    docstring): a send or receive that the kernel completes at once costs no pass
    through trio's scheduler, at most ``MAX_OPS_WITHOUT_CHECKPOINT`` times in a row."""

    def __init__(self, sock: socket.socket) -> None:
        """``sock``: a connected ``SOCK_STREAM`` socket, now this stream's (made non-blocking)."""
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("TcpStream requires a SOCK_STREAM socket")
        if sock.gettimeout() != 0.0:  # 0.0: already non-blocking (SOCK_NONBLOCK), no ioctl
            sock.setblocking(False)
        self.socket = sock
        self._quick = QuickWait(sock.fileno())
        self._eof_sent = False
        self._sending = False  # a send_all or wait_send_all_might_not_block is waiting

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> TcpStream:
        """Take over the socket of ``stream`` (which is left detached and closed)."""
        tsock = stream.socket
        family, kind, proto = tsock.family, tsock.type, tsock.proto
        return cls(socket.socket(family, kind, proto, fileno=tsock.detach()))

    async def send_all(
        self, data: bytes | bytearray | memoryview, *, wait_seconds: float | None = None
    ) -> None:
        """Send all of ``data``; wait for the kernel's buffer only if it is full, in all at
        most ``wait_seconds`` seconds (``trio.TooSlowError``; None: the caller's scopes)."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self.socket
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _stream_error(exc) from exc
        if sent >= (data.nbytes if isinstance(data, memoryview) else len(data)):
            if checkpoint_due():
                await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._sending = True
        try:
            with memoryview(data) as view, view.cast("B") as octets:
                if wait_seconds is None:
                    await self._send_rest(octets, sent)
                    return
                with trio.CancelScope(deadline=trio.current_time() + wait_seconds):
                    await self._send_rest(octets, sent)
                    return
                raise trio.TooSlowError
        finally:
            self._sending = False

    async def _send_rest(self, octets: memoryview, sent: int) -> None:
        """Wait until the socket takes more, and send the rest (the slow path)."""
        sock = self.socket
        total = len(octets)
        while sent < total:
            note_wait()
            try:
                await trio.lowlevel.wait_writable(sock)
                with octets[sent:] as rest:
                    sent += sock.send(rest)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _stream_error(exc) from exc

    async def receive_some(
        self, max_bytes: int | None = None, *, wait_seconds: float | None = None
    ) -> bytes:
        """At most ``max_bytes`` octets (b"" at the end of the stream); wait only if none
        are there yet, at most ``wait_seconds`` seconds (``trio.TooSlowError``) after a
        brief wait of at most ``QUICK_WAIT_MILLISECONDS`` (popproxy/quick_wait.py)."""
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_BYTES
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = self.socket.recv(max_bytes)
        except BlockingIOError:
            got = self._after_brief_wait(max_bytes, wait_seconds)
            if got is None:
                if wait_seconds is None:
                    return await self._receive_waiting(max_bytes)
                with trio.CancelScope(deadline=trio.current_time() + wait_seconds):
                    return await self._receive_waiting(max_bytes)
                raise trio.TooSlowError from None
            data = got
        except OSError as exc:
            raise _stream_error(exc) from exc
        if checkpoint_due():
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def _after_brief_wait(self, max_bytes: int, wait_seconds: float | None) -> bytes | None:
        """Nothing was there: a brief wait in poll(2) while no other task can run
        (popproxy/quick_wait.py), then the octets, or None to wait through trio's
        scheduler."""
        if not self._quick.readable(wait_seconds):
            return None
        try:
            return self.socket.recv(max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def _receive_waiting(self, max_bytes: int) -> bytes:
        """Wait until the socket is readable, and read (the slow path)."""
        sock = self.socket
        while True:
            note_wait()
            try:
                await trio.lowlevel.wait_readable(sock)
                return sock.recv(max_bytes)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _stream_error(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        """Return once the socket can take more octets."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("this socket was already closed")
        self._sending = True
        try:
            await trio.lowlevel.wait_writable(self.socket)
        except OSError as exc:
            raise _stream_error(exc) from exc
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Shut the sending half down (TCP FIN); idempotent."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint()
        if self._eof_sent:
            return
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _stream_error(exc) from exc
        self._eof_sent = True

    def close(self) -> None:
        """Close the socket now (a task waiting on it gets ``trio.ClosedResourceError``);
        idempotent. Closing a TCP socket does not wait, so a caller that needs no
        checkpoint (a session's end) calls this instead of ``aclose``: no cancel scope
        around it and no pass through the scheduler (issue 15)."""
        sock = self.socket
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def aclose(self) -> None:
        """Close the socket (a task waiting on it gets ``trio.ClosedResourceError``)."""
        self.close()
        await trio.lowlevel.checkpoint()


def wait_bounded(stream: trio.abc.Stream) -> WaitBoundedStream:
    """``stream`` with waits bounded by ``wait_seconds``: the stream itself if it bounds its
    own (a ``WaitBoundedStream``: a cancel scope only once it has to wait), else a
    ``ScopedWaits`` around it (a scope around the whole call). A caller that keeps a
    stream looks this up once and calls its ``send_all`` and ``receive_some`` directly."""
    if type(stream) in _WAIT_BOUNDED:
        return cast(WaitBoundedStream, stream)
    return ScopedWaits(stream)


class ScopedWaits(WaitBoundedStream):
    """Any ``trio.abc.Stream`` with ``wait_seconds``: the call, waits and all, within a
    cancel scope of that deadline (``trio.TooSlowError``)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def send_all(
        self, data: bytes | bytearray | memoryview, *, wait_seconds: float | None = None
    ) -> None:
        if wait_seconds is None:
            await self.stream.send_all(data)
            return
        with trio.CancelScope(deadline=trio.current_time() + wait_seconds):
            await self.stream.send_all(data)
            return
        raise trio.TooSlowError

    async def receive_some(
        self, max_bytes: int | None = None, *, wait_seconds: float | None = None
    ) -> bytes | bytearray:
        if wait_seconds is None:
            return await self.stream.receive_some(max_bytes)
        with trio.CancelScope(deadline=trio.current_time() + wait_seconds):
            return await self.stream.receive_some(max_bytes)
        raise trio.TooSlowError

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()
