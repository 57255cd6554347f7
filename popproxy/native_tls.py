"""The listeners' TLS (RFC 8314 §3.3 implicit TLS, RFC 2595 §4 STLS) on the kernel
socket itself: OpenSSL reads and writes the file descriptor (``ssl.SSLSocket``,
non-blocking) and trio only waits for readiness when OpenSSL asks for it
(``SSLWantReadError`` / ``SSLWantWriteError``).

``trio.SSLStream`` drives an ``ssl.SSLObject`` through two memory BIOs: every record
is copied between Python bytes objects, a Python retry loop runs per call and each
receive takes several scheduler passes. On a connected TCP socket none of that is
needed; ``accept_tls`` takes the socket over (``detach``: from then on the
``NativeTlsStream`` owns the descriptor and closes it) and falls back to
``trio.SSLStream`` over ``AlpnGuard`` for any other transport (a PROXY protocol
prefix, the memory streams of tests).

ALPACA (RFC 7301 §3.2): before OpenSSL sees a byte, the ClientHello is read with
``MSG_PEEK`` (it stays in the kernel for OpenSSL) and judged by
:mod:`popproxy.tls_hello`; a refused offer gets the ``no_application_protocol``
alert, as ``AlpnGuard`` sends it. While the hello is incomplete, ``SO_RCVLOWAT``
asks the kernel to wake us only once the octets the parser needs have arrived, so
a ClientHello cut into pieces costs no busy loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl

import trio

from popproxy.quick_wait import QuickWait
from popproxy.socket_stream import TcpStream, WaitBoundedStream, checkpoint_due, note_wait
from popproxy.tls import ALERT_SECONDS, AlpnGuard, AlpnRefused
from popproxy.tls_hello import (
    MAX_CLIENT_HELLO_BYTES,
    MAX_CLIENT_HELLO_RECORDS,
    NO_APPLICATION_PROTOCOL_ALERT,
    RECORD_HEADER_BYTES,
    Hello,
    HelloVerdict,
    read_client_hello,
)

# The most a peek ever asks for: the longest ClientHello the parser accepts, its
# record headers, and one more record of the largest length a TLS record header can
# state (2**16 - 1). A hello that needs more is refused (tls_hello's rule).
MAX_PEEK_BYTES = MAX_CLIENT_HELLO_BYTES + MAX_CLIENT_HELLO_RECORDS * RECORD_HEADER_BYTES + 0xFFFF
# The first peek's size: a whole ClientHello in the usual case (a few hundred octets,
# a few KiB with post-quantum key shares).
PEEK_BYTES = 4096
# A wake-up that brought no new octet (the peer half-closed mid-hello, or a kernel
# without SO_RCVLOWAT for poll) waits this long before peeking again; the login
# deadline still bounds the whole.
PEEK_RETRY_SECONDS = 0.05
# Linux's tcpi_state of an open connection (include/net/tcp_states.h).
TCP_ESTABLISHED = 1
# What a failed handshake reads and drops before closing (see close_now).
DRAIN_BYTES = 64 * 1024
# What a receive asks OpenSSL for when the caller gives no size (one full record).
DEFAULT_RECEIVE_BYTES = 16 * 1024


def kernel_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | socket.socket | None:
    """The connected socket under ``stream`` when the stream is the socket itself
    (nothing buffered above it: a ``trio.SocketStream``, or the ``TcpStream`` the
    listeners give a plain session, popproxy/socket_stream.py), else None."""
    if isinstance(stream, trio.SocketStream | TcpStream):
        return stream.socket
    return None


async def accept_tls(transport: trio.abc.Stream, context: ssl.SSLContext) -> trio.abc.Stream:
    """Handshake as the TLS server over ``transport`` and return the stream to use
    from then on. Raises ``AlpnRefused`` (the alert is sent), or
    ``trio.BrokenResourceError`` / ``ssl.SSLError`` / ``OSError`` for any other failure;
    on a failure or a cancel with the socket taken over, the socket is closed."""
    sock = kernel_socket(transport)
    if sock is None:
        return await _accept_over_guard(transport, context)
    raw = socket.socket(fileno=sock.detach())
    try:
        raw.setblocking(False)
        await _judge_client_hello(raw)
        tls = NativeTlsStream(
            context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        )
    except BaseException:
        _close(raw)
        raise
    try:
        await tls.do_handshake()
    except BaseException:
        tls.close_now(drain=True)
        raise
    return tls


async def _accept_over_guard(
    transport: trio.abc.Stream, context: ssl.SSLContext
) -> trio.abc.Stream:
    """``trio.SSLStream`` over ``AlpnGuard``: for transports that are not a bare socket."""
    tls = trio.SSLStream(AlpnGuard(transport), context, server_side=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, AlpnRefused):
            raise exc.__cause__ from None
        raise
    return tls


async def _judge_client_hello(raw: socket.socket) -> None:
    """Peek at the ClientHello until ``tls_hello`` has a verdict; refuse an ALPN
    offer without pop3 (RFC 7301 §3.2). Leaves every octet in the kernel."""
    fd = raw.fileno()
    hello = Hello(HelloVerdict.PENDING, need=RECORD_HEADER_BYTES)
    seen = -1  # octets the last peek found (-1: none yet)
    lowat = 1
    try:
        while True:
            data = _peek(raw, max(hello.need, PEEK_BYTES))
            if data is not None and not data:
                return  # EOF before the hello was complete: OpenSSL's handshake says so
            if data is not None and len(data) >= hello.need:
                hello = read_client_hello(data)
                if hello.verdict is not HelloVerdict.PENDING:
                    break
                if hello.need > MAX_PEEK_BYTES:
                    hello = Hello(HelloVerdict.REFUSE)
                    break
                continue
            got = 0 if data is None else len(data)
            if got == seen:  # woken without a new octet
                if _peer_closed(raw):
                    return  # the hello will never be whole: OpenSSL's handshake fails
                await trio.sleep(PEEK_RETRY_SECONDS)
            seen = got
            if lowat != hello.need:
                lowat = hello.need
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            await trio.lowlevel.wait_readable(fd)
    finally:
        if lowat != 1:
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    if hello.verdict is HelloVerdict.REFUSE:
        with trio.move_on_after(ALERT_SECONDS), contextlib.suppress(OSError):
            await _send_raw(raw, NO_APPLICATION_PROTOCOL_ALERT)
            # Consumed, so that closing with it unread does not reset the connection
            # before the client has read the alert.
            raw.recv(max(seen, hello.need, PEEK_BYTES))
        raise AlpnRefused("the client offered ALPN protocols, none of them pop3", hello.offered)


def _peer_closed(raw: socket.socket) -> bool:
    """The peer has sent its FIN (``tcpi_state``, the first octet of Linux's
    ``struct tcp_info``, is past ESTABLISHED); False when it cannot be told."""
    try:
        info = raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except (OSError, AttributeError):
        return False
    return bool(info) and info[0] != TCP_ESTABLISHED


def _peek(raw: socket.socket, size: int) -> bytes | None:
    """What the kernel holds (left there), up to ``size``; None: nothing yet."""
    try:
        return raw.recv(size, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise trio.BrokenResourceError(f"the connection failed: {exc.strerror}") from exc


async def _send_raw(raw: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        await trio.lowlevel.wait_writable(raw)
        with contextlib.suppress(BlockingIOError):
            view = view[raw.send(view) :]


def _close(sock: socket.socket) -> None:
    """Close a descriptor trio may be waiting on (trio asks to be told first)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()


class NativeTlsStream(WaitBoundedStream):
    """A server-side TLS connection on a kernel socket, as a ``trio.abc.Stream``.

    As ``TcpStream`` (popproxy/socket_stream.py, whose fairness count it shares), an
    operation OpenSSL completes at once skips trio's scheduler, at most
    ``MAX_OPS_WITHOUT_CHECKPOINT`` times in a row, and ``wait_seconds`` bounds only the
    waiting. A cancelled ``receive_some`` loses nothing (OpenSSL keeps what it
    decrypted); a cancelled, timed-out or failed ``send_all`` breaks the stream, as
    with ``trio.SSLStream``.
    Errors come out as ``trio.BrokenResourceError`` (cause: the ``ssl.SSLError`` or
    ``OSError``); a clean or ragged EOF as ``b""``.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._quick = QuickWait(self._fd)
        self._handshaken = False
        self._broken = False
        self._closed = False
        self._sending = False
        self._receiving = False

    async def do_handshake(self) -> None:
        """The TLS handshake (errors: ``ssl.SSLError``, ``OSError``)."""
        sock = self._sock
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self._fd)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self._fd)
        self._handshaken = True

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._broken:
            raise trio.BrokenResourceError("the TLS stream is broken")

    async def receive_some(
        self, max_bytes: int | None = None, *, wait_seconds: float | None = None
    ) -> bytes:
        """Up to ``max_bytes`` of application data; ``b""`` at EOF (ragged too). Waits
        only if OpenSSL asks for it, at most ``wait_seconds`` (``trio.TooSlowError``) after
        a brief wait of at most ``QUICK_WAIT_MILLISECONDS`` (popproxy/quick_wait.py)."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        size = DEFAULT_RECEIVE_BYTES if max_bytes is None else max_bytes
        self._receiving = True
        try:
            got = self._recv_once(size)
            # OpenSSL wants more bytes: a brief wait in poll(2) while no other task can
            # run (popproxy/quick_wait.py), before a wait through trio's scheduler.
            if got is True and self._quick.readable(wait_seconds):
                got = self._recv_once(size)
            if isinstance(got, bytes):
                if checkpoint_due():
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return got
            if wait_seconds is None:
                return await self._receive_waiting(size, got)
            with trio.CancelScope(deadline=trio.current_time() + wait_seconds):
                return await self._receive_waiting(size, got)
            raise trio.TooSlowError
        finally:
            self._receiving = False

    def _recv_once(self, size: int) -> bytes | bool:
        """One ``recv``: the data (``b""`` at EOF), or else whether OpenSSL must first
        wait for the socket to be readable (True) or writable (False)."""
        try:
            return self._sock.recv(size)
        except ssl.SSLWantReadError:
            return True
        except ssl.SSLWantWriteError:
            return False
        except OSError as exc:
            self._broken = True
            raise _broken(exc) from exc

    async def _wait_for(self, want_read: bool) -> None:
        """Wait until the socket is readable (``want_read``) or writable, as OpenSSL asked."""
        note_wait()
        if want_read:
            await trio.lowlevel.wait_readable(self._fd)
        else:
            await trio.lowlevel.wait_writable(self._fd)

    async def _receive_waiting(self, size: int, want_read: bool) -> bytes:
        """Wait for what OpenSSL asked for, and read again, until it gives data (the
        slow path; the wait is a schedule point, so no second pass after it)."""
        while True:
            await self._wait_for(want_read)
            got = self._recv_once(size)
            if isinstance(got, bytes):
                return got
            want_read = got

    async def send_all(
        self, data: bytes | bytearray | memoryview, *, wait_seconds: float | None = None
    ) -> None:
        """Encrypt and send all of ``data``, waiting only if OpenSSL asks for it, at most
        ``wait_seconds`` (``trio.TooSlowError``). OpenSSL is not in partial-write mode:
        after a want-write the same buffer is offered again until it is all taken."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        if not data:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._sending = True
        done = False
        try:
            want_read = self._send_once(data)
            if want_read is None:
                done = True
                if checkpoint_due():
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            if wait_seconds is None:
                await self._send_waiting(data, want_read)
                done = True
                return
            with trio.CancelScope(deadline=trio.current_time() + wait_seconds):
                await self._send_waiting(data, want_read)
                done = True
                return
            raise trio.TooSlowError
        finally:
            self._sending = False
            if not done:  # cancelled or failed part way: records may be half sent
                self._broken = True

    async def _send_waiting(self, data: bytes | bytearray | memoryview, want_read: bool) -> None:
        """Wait for what OpenSSL asked for, and offer ``data`` again, until it is taken."""
        while True:
            await self._wait_for(want_read)
            wants = self._send_once(data)
            if wants is None:
                return
            want_read = wants

    def _send_once(self, data: bytes | bytearray | memoryview) -> bool | None:
        """One ``send`` of all of ``data``: None once OpenSSL took it, or else whether it
        must first wait for the socket to be readable (True) or writable (False)."""
        try:
            self._sock.send(data)
        except ssl.SSLWantWriteError:
            return False
        except ssl.SSLWantReadError:
            return True
        except OSError as exc:
            raise _broken(exc) from exc
        return None

    async def wait_send_all_might_not_block(self) -> None:
        """Until the socket takes more octets."""
        self._check()
        await trio.lowlevel.wait_writable(self._fd)

    async def aclose(self) -> None:
        """Send close_notify if the stream is whole (never waiting for the peer's,
        as ``trio.SSLStream``), then close the socket; a cancel closes at once."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._handshaken and not self._broken:
                await self._close_notify()
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self.close_now()

    async def _close_notify(self) -> None:
        sock = self._sock
        while True:
            try:
                sock.unwrap()
                break
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self._fd)
            except (ssl.SSLWantReadError, OSError):
                break  # ours is sent (only the peer's is awaited), or the peer is gone
        await trio.lowlevel.checkpoint()

    def close_now(self, *, drain: bool = False) -> None:
        """Close the socket without a close_notify; with ``drain``, first take up to
        ``DRAIN_BYTES`` the peer sent and OpenSSL left unread, so that closing ends
        with a FIN after OpenSSL's alert, not a reset that may discard it."""
        self._closed = True
        if drain and self._sock.fileno() != -1:
            with contextlib.suppress(OSError):
                os.read(self._fd, DRAIN_BYTES)
        _close(self._sock)


def _broken(exc: OSError) -> trio.BrokenResourceError:
    if isinstance(exc, ssl.SSLError):
        return trio.BrokenResourceError(f"TLS error: {exc.reason or exc.__class__.__name__}")
    name = errno.errorcode.get(exc.errno or 0, "error")
    return trio.BrokenResourceError(f"the connection failed: {name}")
