"""The octets before a session on a PROXY protocol listener: reading the header
(HAProxy's proxy-protocol.txt, through the sans-IO ``ProxyHeaderReader``) and
handing the octets received after it to the session as the start of its stream."""

from __future__ import annotations

import trio

from popproxy.proxy_protocol import MAX_HEADER_BYTES, ProxyHeader, ProxyHeaderReader


class PrefixedStream(trio.abc.Stream):
    """A stream whose first read returns octets already received (those after a PROXY
    protocol header), then reads on from the stream it wraps."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._prefix:
            return await self._stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._prefix) if max_bytes is None else max_bytes
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        return data

    async def aclose(self) -> None:
        self._prefix = b""
        await self._stream.aclose()


async def read_proxy_header(stream: trio.abc.Stream) -> tuple[ProxyHeader, bytes]:
    """Read a PROXY protocol header (v1 or v2); it and the octets received after it."""
    reader = ProxyHeaderReader()
    # Bounded: the reader refuses a header longer than MAX_HEADER_BYTES, and each
    # read adds at least one octet (b"" is EOF, which ends the header or refuses it).
    while True:
        event = reader.next_event()
        if isinstance(event, ProxyHeader):
            return event, reader.trailing_data
        reader.receive_data(bytes(await stream.receive_some(MAX_HEADER_BYTES)))
