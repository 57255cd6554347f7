"""The listening sockets of one ``listen`` entry, with SO_REUSEPORT when it asks.

``trio.open_tcp_listeners`` binds every address the host name resolves to (one
socket per address family, IPv6 sockets IPv6-only, ``SO_REUSEADDR`` set). With
``reuse_port: true`` popproxy binds the same way and also sets ``SO_REUSEPORT``
before ``bind`` (socket(7)), so several popproxy processes may listen on the same
address and port: the kernel hands each new connection to one of them (Linux
spreads them by a hash of the connection's addresses and ports). Every process that
binds the port must set the option, and on Linux run as the same user.
"""

from __future__ import annotations

import socket

import trio

from popproxy.config import ListenerConfig


async def bind_listener(listener: ListenerConfig) -> list[trio.SocketListener]:
    """Listening sockets for ``listener``; ``OSError`` if one cannot be bound."""
    if not listener.reuse_port:
        return await trio.open_tcp_listeners(listener.port, host=listener.address)
    infos = await trio.socket.getaddrinfo(
        listener.address, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for made in listeners:
            await made.aclose()
        raise
    return listeners
