"""Byte relays in Python, as floors for the harness: what a POP3 proxy in Python costs
before it does any POP3 at all.

Each copies octets between a client and the bench's Dovecot without reading them: no
parsing, no login of its own, no state, so its clients log in with the Dovecot
account's own name and password (as through perdition). Two kinds:

- ``trio``: trio's own streams as a trio program ordinarily uses them
  (``trio.serve_tcp``, ``open_tcp_stream``, one task per direction, ``trio.SSLStream``
  for implicit TLS): what trio, which popproxy requires, costs per relayed read;
- ``epoll``: one thread, one ``select.epoll``, a ``recv`` on each socket it says is
  readable and a blocking ``sendall`` of what came: about the least any Python relay
  can cost; plain only. A full send buffer would stall every other connection: a
  floor, not a server.

Run by bench/peers.py as ``python -m bench.relay KIND UPSTREAM_HOST:PORT PLAIN_PORT
[TLS_PORT CERT KEY]``; it prints nothing and runs until SIGTERM ends it.
"""

from __future__ import annotations

import select
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable

import trio

LOOPBACK = "127.0.0.1"
# The most octets one read takes (popproxy reads at most 64 KiB at a time too).
READ_BYTES = 65536
# Connections the listening socket queues (the bench runs a few hundred at once).
BACKLOG = 1024


# -- trio -----------------------------------------------------------------------------


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(READ_BYTES):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
        pass
    done.cancel()


def _trio_handler(
    target: tuple[str, int], context: ssl.SSLContext | None
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def relay(accepted: trio.SocketStream) -> None:
        client: trio.abc.Stream = accepted
        try:
            if context is not None:
                client = tls = trio.SSLStream(accepted, context, server_side=True)
                await tls.do_handshake()
            upstream = await trio.open_tcp_stream(*target)
        except (OSError, trio.BrokenResourceError, ssl.SSLError):
            await accepted.aclose()
            return
        async with upstream, client, trio.open_nursery() as nursery:
            nursery.start_soon(_copy, client, upstream, nursery.cancel_scope)
            nursery.start_soon(_copy, upstream, client, nursery.cancel_scope)

    return relay


async def _serve(target: tuple[str, int], port: int, context: ssl.SSLContext | None) -> None:
    await trio.serve_tcp(_trio_handler(target, context), port, host=LOOPBACK, backlog=BACKLOG)


async def _trio_main(
    target: tuple[str, int], plain_port: int, tls: tuple[int, str, str] | None
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, target, plain_port, None)
        if tls is not None:
            port, cert, key = tls
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
            nursery.start_soon(_serve, target, port, context)


# -- epoll ----------------------------------------------------------------------------


def _epoll_main(target: tuple[str, int], plain_port: int) -> None:
    listener = socket.create_server((LOOPBACK, plain_port), backlog=BACKLOG)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    pairs: dict[int, tuple[socket.socket, socket.socket]] = {}  # fd -> (its socket, the other)

    def close(fd: int) -> None:
        own, other = pairs.pop(fd)
        pairs.pop(other.fileno(), None)
        for sock in (own, other):
            poller.unregister(sock.fileno())
            sock.close()

    while True:
        for fd, _events in poller.poll():
            if fd == listener.fileno():
                client, _ = listener.accept()
                try:
                    upstream = socket.create_connection(target)
                except OSError:
                    client.close()
                    continue
                for sock in (client, upstream):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    poller.register(sock.fileno(), select.EPOLLIN)
                pairs[client.fileno()] = (client, upstream)
                pairs[upstream.fileno()] = (upstream, client)
                continue
            if fd not in pairs:  # closed earlier in this batch
                continue
            own, other = pairs[fd]
            try:
                # Not blocking: an event of this batch may be for a closed socket whose
                # number a socket accepted meanwhile took.
                data = own.recv(READ_BYTES, socket.MSG_DONTWAIT)
                if data:
                    other.sendall(data)
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            close(fd)


def main(argv: list[str]) -> int:
    kind, plain_port = argv[0], int(argv[2])
    host, _, port = argv[1].rpartition(":")
    target = (host, int(port))
    tls = (int(argv[3]), argv[4], argv[5]) if len(argv) >= 6 else None
    match kind:
        case "trio":
            trio.run(_trio_main, target, plain_port, tls)
        case "epoll":
            _epoll_main(target, plain_port)
        case _:
            raise SystemExit(f"unknown relay kind {kind!r}: trio or epoll")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
