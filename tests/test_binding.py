"""bind_listener (popproxy/binding.py): reuse_port lets several servers share a port."""

from __future__ import annotations

import errno

import pytest
import trio

from popproxy.binding import bind_listener
from popproxy.config import ListenerConfig, TlsMode


def listener(port: int, *, reuse_port: bool) -> ListenerConfig:
    return ListenerConfig("127.0.0.1", port, TlsMode.NONE, reuse_port=reuse_port)


async def test_two_reuse_port_listeners_share_a_port_and_both_accept() -> None:
    first = await bind_listener(listener(0, reuse_port=True))
    port = first[0].socket.getsockname()[1]
    second = await bind_listener(listener(port, reuse_port=True))
    try:
        # Without the option the port is taken.
        with pytest.raises(OSError) as taken:
            await bind_listener(listener(port, reuse_port=False))
        assert taken.value.errno == errno.EADDRINUSE
        accepted: set[int] = set()

        async def accept(n: int, sock: trio.SocketListener) -> None:
            stream = await sock.accept()
            accepted.add(n)
            await stream.aclose()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept, 0, first[0])
                nursery.start_soon(accept, 1, second[0])
                # Connections from different source ports hash to either socket:
                # keep connecting until both have taken one.
                while len(accepted) < 2:
                    client = await trio.open_tcp_stream("127.0.0.1", port)
                    await client.aclose()
                    await trio.sleep(0.01)
        assert accepted == {0, 1}
    finally:
        for sock in (*first, *second):
            await sock.aclose()
