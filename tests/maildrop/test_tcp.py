"""The upstream's TCP connection (popproxy/maildrop/tcp.py): an IP literal's connect."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from scheduler_steps import steps_of_this_task

from popproxy.maildrop import tcp
from popproxy.socket_stream import NOTSENT_LOWAT_BYTES, TcpStream


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


async def test_a_connect_completed_within_the_call_takes_no_pass_through_the_scheduler(
    listening: socket.socket,
) -> None:
    """On loopback the kernel completes the handshake within connect(): nothing to wait for."""
    with steps_of_this_task() as steps:
        stream = await tcp.open_tcp("127.0.0.1", listening.getsockname()[1])
    async with stream:
        assert steps.steps == 0
        accepted, _ = listening.accept()
        with accepted:
            assert stream.socket.getpeername() == accepted.getsockname()
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await stream.send_all(b"+OK\r\n")
            assert accepted.recv(16) == b"+OK\r\n"


async def test_a_connect_still_in_progress_waits_until_writable(
    listening: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the handshake is not done when connect() returns, the socket's writability
    says it is (as trio's own connect waits)."""
    monkeypatch.setattr(tcp, "_established", lambda sock: False)
    with steps_of_this_task() as steps:
        stream = await tcp.open_tcp("127.0.0.1", listening.getsockname()[1])
    async with stream:
        assert steps.steps == 1
        accepted, _ = listening.accept()
        accepted.close()


async def test_the_stream_is_a_tcp_stream_with_trios_options(listening: socket.socket) -> None:
    """Straight into popproxy's TcpStream, non-blocking from socket(2), with the options
    trio.SocketStream would have set."""
    stream = await tcp.open_tcp("127.0.0.1", listening.getsockname()[1])
    async with stream:
        assert type(stream) is TcpStream
        assert stream.socket.gettimeout() == 0.0
        assert not os.get_blocking(stream.socket.fileno())
        assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        lowat = stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        assert lowat == NOTSENT_LOWAT_BYTES
        listening.accept()[0].close()


async def test_a_connect_not_done_by_its_deadline_is_too_slow_and_closes_its_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A listener whose accept queue is full drops the SYN: the connect stays in progress
    until the deadline, which is a cancel scope only around that wait."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = await tcp.open_tcp("127.0.0.1", port)  # the queue's one place
        async with queued:
            descriptors = len(os.listdir("/proc/self/fd"))
            started = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await tcp.open_tcp("127.0.0.1", port, deadline=started + 3.0)
            assert trio.current_time() - started == pytest.approx(3.0)
            assert len(os.listdir("/proc/self/fd")) == descriptors  # its socket is closed


async def test_a_refused_connect_is_an_oserror_and_leaves_no_socket_open() -> None:
    with socket.socket() as bound:  # bound, not listening: the port refuses
        bound.bind(("127.0.0.1", 0))
        with pytest.raises(OSError) as info:
            await tcp.open_tcp("127.0.0.1", bound.getsockname()[1])
    assert tcp.connect_failure(info.value) == "Connection refused"
