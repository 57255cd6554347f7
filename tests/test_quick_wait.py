"""popproxy/quick_wait.py: a brief wait in poll(2) ends at once when trio has other
work, and never outlasts its cap; over real loopback sockets and trio's own run loop."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from popproxy import quick_wait
from popproxy.quick_wait import QUICK_WAIT_MISSES, QUICK_WAIT_PAUSE, QuickWait, loop_view
from popproxy.socket_stream import TcpStream

# A cap no test may wait out: a brief wait that blocked for it would fail the test.
LONG_CAP_MILLISECONDS = 20_000
PROMPT_SECONDS = 10.0


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def long_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quick_wait, "QUICK_WAIT_MILLISECONDS", LONG_CAP_MILLISECONDS)


def test_no_view_outside_a_trio_run() -> None:
    assert loop_view() is None


async def test_the_view_reads_this_trio_s_run_loop() -> None:
    """Pins the private attributes the brief waits read: on another trio they would
    silently turn off, and every read would cost a pass through the scheduler again."""
    view = loop_view()
    assert view is not None
    assert view is loop_view()  # cached for the run
    assert not view.runq
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
        assert view.runq  # the task just started is ready to run
    # Its epoll descriptor is the run loop's: test_another_ready_socket_ends_the_wait.


async def test_data_already_there_is_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.send(b"+OK\r\n")
    assert QuickWait(a.fileno()).readable()


async def test_data_arriving_during_the_wait_is_readable(
    pair: tuple[socket.socket, socket.socket], long_cap: None
) -> None:
    a, b = pair
    go = threading.Event()

    def reply() -> None:
        go.wait(PROMPT_SECONDS)
        b.send(b"+OK\r\n")

    sender = threading.Thread(target=reply)
    sender.start()
    started = time.monotonic()
    go.set()
    assert QuickWait(a.fileno()).readable()
    sender.join(PROMPT_SECONDS)
    assert time.monotonic() - started < PROMPT_SECONDS


async def test_a_ready_task_means_no_wait(
    pair: tuple[socket.socket, socket.socket], long_cap: None
) -> None:
    a, _ = pair
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
        started = time.monotonic()
        assert not QuickWait(a.fileno()).readable()
        assert time.monotonic() - started < PROMPT_SECONDS


async def test_another_ready_socket_ends_the_wait(
    pair: tuple[socket.socket, socket.socket], long_cap: None
) -> None:
    """Another session's socket, ready while this one waits: the brief wait gives way
    to trio (its epoll descriptor is readable), and that session is served."""
    a, _ = pair
    other, other_peer = socket.socketpair()
    served = []

    async def other_session() -> None:
        await trio.lowlevel.wait_readable(other)
        served.append(other.recv(16))

    with other, other_peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_session)
            await trio.testing.wait_all_tasks_blocked()
            other_peer.send(b"NOOP\r\n")
            started = time.monotonic()
            assert not QuickWait(a.fileno()).readable()
            assert time.monotonic() - started < PROMPT_SECONDS
        assert served == [b"NOOP\r\n"]


async def test_a_worker_thread_s_result_ends_the_wait(
    pair: tuple[socket.socket, socket.socket], long_cap: None
) -> None:
    """A state store's worker thread finishing (trio's wake-up socket) ends it too."""
    a, _ = pair
    go = threading.Event()
    results = []

    async def store_call() -> None:
        results.append(await trio.to_thread.run_sync(go.wait, PROMPT_SECONDS))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store_call)
        await trio.testing.wait_all_tasks_blocked()
        started = time.monotonic()
        go.set()
        assert not QuickWait(a.fileno()).readable()
        assert time.monotonic() - started < PROMPT_SECONDS
    assert results == [True]


async def test_a_wait_shorter_than_the_cap_is_not_made(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    b.send(b"x")  # ready, but the caller may not wait even the cap
    assert not QuickWait(a.fileno()).readable(wait_seconds=0.0)


async def test_a_far_peer_pauses_the_brief_waits(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """After QUICK_WAIT_MISSES timeouts in a row the stream waits the trio way for its
    next QUICK_WAIT_PAUSE reads, then tries again."""
    a, b = pair
    waits = QuickWait(a.fileno())
    for _ in range(QUICK_WAIT_MISSES):
        assert not waits.readable()  # each times out after the cap
    b.send(b"x")
    for _ in range(QUICK_WAIT_PAUSE):
        assert not waits.readable()  # paused: not even the ready socket is looked at
    assert waits.readable()


async def test_a_hit_resets_the_misses(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    waits = QuickWait(a.fileno())
    for _ in range(QUICK_WAIT_MISSES - 1):
        assert not waits.readable()
    b.send(b"x")
    assert waits.readable()
    a.recv(1)
    for _ in range(QUICK_WAIT_MISSES - 1):
        assert not waits.readable()
    b.send(b"y")
    assert waits.readable()  # not paused: the hit started the count again


async def test_tcp_stream_reads_what_arrives_during_a_brief_wait(long_cap: None) -> None:
    """The stream's read: nothing there, a brief wait, the bytes (no trio wait)."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    stream = TcpStream(server)
    go = threading.Event()

    def reply() -> None:
        go.wait(PROMPT_SECONDS)
        client.sendall(b"RETR 1\r\n")

    sender = threading.Thread(target=reply)
    sender.start()
    try:
        with trio.fail_after(PROMPT_SECONDS):
            go.set()
            assert await stream.receive_some(64, wait_seconds=PROMPT_SECONDS) == b"RETR 1\r\n"
    finally:
        sender.join(PROMPT_SECONDS)
        client.close()
        await stream.aclose()
