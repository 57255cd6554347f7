"""Acceptor: clients accepted straight into TcpStreams, with trio's semantics."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.lowlevel
import trio.testing
from scheduler_steps import steps_of_this_task

from popproxy.acceptor import MAX_ACCEPTS_WITHOUT_CHECKPOINT, Acceptor
from popproxy.peer import PeerAddress
from popproxy.socket_stream import NOTSENT_LOWAT_BYTES


@pytest.fixture
async def listener() -> AsyncIterator[trio.SocketListener]:
    (made,) = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=64)
    yield made
    await made.aclose()


def connect(listener: trio.SocketListener) -> socket.socket:
    client = socket.socket()
    client.connect(listener.socket.getsockname())
    return client


class _FailingOnce(socket.socket):
    """A listening socket whose next accept fails with ``error``."""

    error: int | None = None

    def accept(self) -> tuple[socket.socket, object]:
        if self.error is not None:
            error, self.error = self.error, None
            raise OSError(error, os.strerror(error))
        return super().accept()


def failing_once(acceptor: Acceptor, listener: trio.SocketListener, error: int) -> None:
    sock = _FailingOnce(fileno=os.dup(listener.socket.fileno()))
    sock.setblocking(False)
    sock.error = error
    acceptor._socket.close()
    acceptor._socket = sock


async def test_a_waiting_client_is_accepted_at_once_with_trios_options(
    listener: trio.SocketListener,
) -> None:
    client = connect(listener)
    with client, Acceptor(listener) as acceptor:
        with steps_of_this_task() as steps:
            stream, peer = await acceptor.accept()
        async with stream:
            assert steps.steps == 0
            assert peer == PeerAddress(*client.getsockname())
            sock = stream.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == (
                NOTSENT_LOWAT_BYTES
            )
            await stream.send_all(b"+OK\r\n")
            assert client.recv(16) == b"+OK\r\n"


async def test_a_burst_of_clients_yields_to_the_others_every_so_many_accepts(
    listener: trio.SocketListener,
) -> None:
    clients = [connect(listener) for _ in range(MAX_ACCEPTS_WITHOUT_CHECKPOINT + 1)]
    with Acceptor(listener) as acceptor, steps_of_this_task() as steps:
        streams = [(await acceptor.accept())[0] for _ in clients]
    assert steps.steps == 1  # the MAX_ACCEPTS_WITHOUT_CHECKPOINT-th accept
    for stream, client in zip(streams, clients, strict=True):
        await stream.aclose()
        client.close()


async def test_with_nobody_waiting_it_waits_and_a_deadline_ends_the_wait(
    listener: trio.SocketListener, autojump_clock: trio.testing.MockClock
) -> None:
    with Acceptor(listener) as acceptor:
        with trio.move_on_after(5) as scope:
            await acceptor.accept()
        assert scope.cancelled_caught
        async with trio.open_nursery() as nursery:
            accepted: list[trio.abc.Stream] = []

            async def accept_one() -> None:
                accepted.append((await acceptor.accept())[0])

            nursery.start_soon(accept_one)
            await trio.testing.wait_all_tasks_blocked()
            client = connect(listener)
        with client:
            await accepted[0].aclose()


@pytest.mark.parametrize("error", [errno.ECONNABORTED, errno.EPROTO])
async def test_an_error_of_the_connection_being_accepted_skips_it(
    listener: trio.SocketListener, error: int
) -> None:
    client = connect(listener)
    with client, Acceptor(listener) as acceptor:
        failing_once(acceptor, listener, error)
        stream, _ = await acceptor.accept()
        await stream.aclose()


async def test_an_error_of_the_listener_is_raised(listener: trio.SocketListener) -> None:
    with Acceptor(listener) as acceptor:
        failing_once(acceptor, listener, errno.EMFILE)
        with pytest.raises(OSError) as info:
            await acceptor.accept()
    assert info.value.errno == errno.EMFILE


async def test_closing_the_acceptor_leaves_the_listener_listening(
    listener: trio.SocketListener,
) -> None:
    with Acceptor(listener):
        pass
    client = connect(listener)
    with client:
        stream = await listener.accept()
        await stream.aclose()
