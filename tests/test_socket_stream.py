"""popproxy/socket_stream.py over real loopback TCP connections: trio's stream contract
(trio.testing's generic checks), data integrity over any chunking, the would-block
paths, the fairness bound, cancellation and wait deadlines, EOF, reset and close."""

from __future__ import annotations

import select
import socket
import ssl
import struct
from collections.abc import Iterator

import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_steps import steps_of_this_task

from popproxy import socket_stream
from popproxy.socket_stream import (
    MAX_OPS_WITHOUT_CHECKPOINT,
    ScopedWaits,
    TcpStream,
    wait_bounded,
)

LOOPBACK = "127.0.0.1"
# Small kernel buffers, so that a few hundred KiB fill a connection.
SMALL_BUFFER_BYTES = 16 * 1024
# Far more than SMALL_BUFFER_BYTES connections can hold in flight.
CLOGGING_BYTES = 4 * 1024 * 1024
# Virtual seconds (autojump_clock) a wait may take in the deadline tests.
WAIT_SECONDS = 7.0


def tcp_pair(buffer_bytes: int | None = None) -> tuple[TcpStream, TcpStream]:
    """Both ends of a fresh loopback TCP connection (optionally with small buffers)."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        for sock in (listener, client):  # an accepted socket inherits the listener's
            if buffer_bytes is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    return TcpStream(client), TcpStream(server)


@pytest.fixture
def pair() -> Iterator[tuple[TcpStream, TcpStream]]:
    left, right = tcp_pair()
    yield left, right
    left.socket.close()
    right.socket.close()


def fill(stream: TcpStream) -> None:
    """Send until the connection is full (nothing reads it) and no longer writable."""
    sock = stream.socket
    for _ in range(CLOGGING_BYTES // 4096):
        try:
            sock.send(b"x" * 4096)
        except BlockingIOError:
            _, writable, _ = select.select([], [sock], [], 0)
            if not writable:
                return
    raise AssertionError(f"{CLOGGING_BYTES} octets did not fill the connection")


async def test_trios_generic_half_closeable_stream_checks_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """trio's own checks also require every operation to be a schedule point, which
    TcpStream relaxes on purpose (the fairness test below): with the bound at 1 it must
    pass them all (errors, closing, conflicts, half-close)."""
    monkeypatch.setattr(socket_stream, "MAX_OPS_WITHOUT_CHECKPOINT", 1)

    # A UNIX socket pair, as trio's own test of trio.SocketStream: a loopback TCP
    # connection filled to the brim may turn writable again on its own (the kernel
    # compacts its receive queue), which the "clogged" checks cannot allow.
    async def maker() -> tuple[TcpStream, TcpStream]:
        left, right = socket.socketpair()
        return TcpStream(left), TcpStream(right)

    async def clogged_maker() -> tuple[TcpStream, TcpStream]:
        left, right = await maker()
        fill(left)
        fill(right)
        return left, right

    await trio.testing.check_half_closeable_stream(maker, clogged_maker)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.binary(max_size=100_000), max_size=8),
    reads=st.lists(st.integers(min_value=1, max_value=200_000), min_size=1, max_size=5),
    small=st.booleans(),
)
async def test_every_octet_arrives_once_and_in_order_whatever_the_chunking(
    chunks: list[bytes], reads: list[int], small: bool
) -> None:
    sender, receiver = tcp_pair(SMALL_BUFFER_BYTES if small else None)
    expected = b"".join(chunks)
    received = bytearray()

    async def send() -> None:
        for chunk in chunks:
            await sender.send_all(chunk)
        await sender.send_eof()

    with trio.fail_after(30):
        async with sender, receiver, trio.open_nursery() as nursery:
            nursery.start_soon(send)
            index = 0
            while data := await receiver.receive_some(reads[index % len(reads)]):
                assert len(data) <= reads[index % len(reads)]
                received += data
                index += 1
    assert bytes(received) == expected


async def test_a_send_larger_than_the_buffers_waits_for_the_reader(
    pair: tuple[TcpStream, TcpStream],
) -> None:
    left, right = tcp_pair(SMALL_BUFFER_BYTES)
    data = bytes(range(256)) * (CLOGGING_BYTES // 256)
    done = trio.Event()

    async def send() -> None:
        await left.send_all(memoryview(data))
        done.set()

    async with left, right, trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # the kernel's buffers are full: the sender waits
        received = bytearray()
        while len(received) < len(data):
            received += await right.receive_some(65536)
        await done.wait()
    assert received == data


async def test_a_receive_waits_until_octets_arrive(pair: tuple[TcpStream, TcpStream]) -> None:
    left, right = pair
    got: list[bytes] = []

    async def receive() -> None:
        got.append(await right.receive_some(100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await left.send_all(b"+OK\r\n")
    assert got == [b"+OK\r\n"]


async def observe_yields(operations: int, operation: trio.abc.Stream, send: bool) -> int:
    """How often a task that is always runnable ran while this task did ``operations``
    sends of one octet (or receives of one) on ``operation``, none of which waits."""
    ticks = 0
    stop = False

    async def observer() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(observer)
        await trio.lowlevel.checkpoint()  # the observer is running
        before = ticks
        for _ in range(operations):
            if send:
                await operation.send_all(b"x")
            else:
                assert await operation.receive_some(1) == b"x"
        seen = ticks - before
        stop = True
    return seen


@pytest.mark.parametrize("send", [True, False], ids=["send_all", "receive_some"])
async def test_operations_that_never_wait_still_yield_every_bound(
    pair: tuple[TcpStream, TcpStream], send: bool
) -> None:
    left, right = pair
    rounds = 10
    operations = rounds * MAX_OPS_WITHOUT_CHECKPOINT
    if not send:
        left.socket.sendall(b"x" * operations)
        await trio.lowlevel.wait_readable(right.socket)
    seen = await observe_yields(operations, left if send else right, send)
    # One pass through the scheduler per MAX_OPS_WITHOUT_CHECKPOINT operations: the
    # other task runs that often, and not at every operation (as trio.SocketStream's).
    assert rounds - 1 <= seen <= rounds + 1


async def test_a_cancelled_scope_is_honoured_before_an_operation_that_would_not_wait(
    pair: tuple[TcpStream, TcpStream],
) -> None:
    left, right = pair
    await left.send_all(b"kept")
    with trio.CancelScope() as scope:
        scope.cancel()
        await right.receive_some(100)
    assert scope.cancelled_caught
    with trio.CancelScope() as scope:
        scope.cancel()
        await left.send_all(b" too")
    assert scope.cancelled_caught
    await trio.lowlevel.wait_readable(right.socket)
    assert await right.receive_some(100) == b"kept"  # nothing read or sent by a cancelled one


async def test_a_wait_is_cancelled_by_its_deadline(
    pair: tuple[TcpStream, TcpStream], autojump_clock: trio.testing.MockClock
) -> None:
    left, right = pair
    start = trio.current_time()
    with trio.move_on_after(WAIT_SECONDS) as scope:
        await right.receive_some(100)
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(WAIT_SECONDS)
    await left.send_all(b"after")
    assert await right.receive_some(100) == b"after"


async def test_wait_seconds_bound_only_the_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = tcp_pair(SMALL_BUFFER_BYTES)
    async with left, right:
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await right.receive_some(100, wait_seconds=WAIT_SECONDS)
        with pytest.raises(trio.TooSlowError):
            await wait_bounded(right).receive_some(100, wait_seconds=WAIT_SECONDS)
        assert trio.current_time() - start == pytest.approx(2 * WAIT_SECONDS)
        # A send the kernel takes at once never times out, whatever the bound.
        await wait_bounded(left).send_all(b"at once", wait_seconds=0.0)
        assert await right.receive_some(100, wait_seconds=0.0) == b"at once"
        # A send to a reader that never reads times out after the waiting.
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await wait_bounded(left).send_all(bytes(CLOGGING_BYTES), wait_seconds=WAIT_SECONDS)
        assert trio.current_time() - start == pytest.approx(WAIT_SECONDS)


async def test_any_stream_gets_the_same_bounds_from_a_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    with pytest.raises(trio.TooSlowError):
        await wait_bounded(right).receive_some(100, wait_seconds=WAIT_SECONDS)
    await wait_bounded(left).send_all(b"memory", wait_seconds=WAIT_SECONDS)
    assert await wait_bounded(right).receive_some(100, wait_seconds=WAIT_SECONDS) == b"memory"
    clogged, _ = trio.testing.lockstep_stream_pair()
    with pytest.raises(trio.TooSlowError):
        await wait_bounded(clogged).send_all(b"nobody reads", wait_seconds=WAIT_SECONDS)


async def test_wait_bounded_is_the_stream_itself_only_when_it_bounds_its_own_waits(
    pair: tuple[TcpStream, TcpStream],
) -> None:
    left, right = pair
    assert wait_bounded(left) is left
    # What a caller that looked it up once then calls: the stream's own bounded waits.
    bounded = wait_bounded(right)
    await left.send_all(b"direct")
    assert await bounded.receive_some(100, wait_seconds=WAIT_SECONDS) == b"direct"


async def test_wait_bounded_wraps_any_other_stream_in_scopes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    memory, peer = trio.testing.memory_stream_pair()
    bounded = wait_bounded(memory)
    assert isinstance(bounded, ScopedWaits) and bounded.stream is memory
    with pytest.raises(trio.TooSlowError):
        await bounded.receive_some(100, wait_seconds=WAIT_SECONDS)
    await bounded.send_all(b"in scope", wait_seconds=WAIT_SECONDS)
    await bounded.send_all(b", unbounded")
    assert await peer.receive_some(100) == b"in scope, unbounded"
    await peer.send_all(b"back")
    assert await bounded.receive_some(100, wait_seconds=WAIT_SECONDS) == b"back"


async def test_eof_is_an_empty_read_and_ends_only_the_sending_half(
    pair: tuple[TcpStream, TcpStream],
) -> None:
    left, right = pair
    await left.send_all(b"last")
    await left.send_eof()
    await left.send_eof()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"more")
    assert await right.receive_some(100) == b"last"
    assert await right.receive_some(100) == b""
    await right.send_all(b"the other way")
    assert await left.receive_some(100) == b"the other way"


async def test_a_reset_is_a_broken_resource(pair: tuple[TcpStream, TcpStream]) -> None:
    left, right = pair
    # SO_LINGER with a zero timeout: close() sends a RST (RFC 9293 §3.5.2).
    right.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await right.aclose()
    await trio.lowlevel.wait_readable(left.socket)
    with pytest.raises(trio.BrokenResourceError) as caught:
        await left.receive_some(100)
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    with pytest.raises(trio.BrokenResourceError):
        await left.send_all(b"to nobody")


async def test_a_closed_stream_is_a_closed_resource(pair: tuple[TcpStream, TcpStream]) -> None:
    left, right = pair
    await left.aclose()
    await left.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await left.receive_some(1)
    with pytest.raises(trio.ClosedResourceError):
        await left.wait_send_all_might_not_block()
    assert await right.receive_some(1) == b""  # the peer sees the end


async def test_close_is_aclose_without_the_checkpoint(pair: tuple[TcpStream, TcpStream]) -> None:
    """``close`` ends the stream as ``aclose`` does, at once: no pass through the scheduler."""
    left, right = pair
    with steps_of_this_task() as steps:
        left.close()
        left.close()  # idempotent
    assert steps.steps == 0
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"x")
    assert await right.receive_some(1) == b""
    await left.aclose()  # and aclose after it is harmless


@pytest.mark.parametrize("closing", ["aclose", "close"])
async def test_closing_wakes_a_task_waiting_on_the_stream(
    pair: tuple[TcpStream, TcpStream], closing: str
) -> None:
    _, right = pair
    caught: list[BaseException] = []

    async def receive() -> None:
        try:
            await right.receive_some(100)
        except trio.ClosedResourceError as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        if closing == "close":
            right.close()
        else:
            await right.aclose()
    assert len(caught) == 1


async def test_two_senders_at_once_is_a_busy_resource() -> None:
    left, right = tcp_pair(SMALL_BUFFER_BYTES)
    async with left, right, trio.open_nursery() as nursery:
        nursery.start_soon(left.send_all, bytes(CLOGGING_BYTES))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await left.send_all(b"interleaved")
        nursery.cancel_scope.cancel()


async def test_it_takes_over_a_trio_socket_stream_and_carries_tls() -> None:
    """``from_trio`` keeps the connection and its options; trio.SSLStream runs over it."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        client = TcpStream.from_trio(await trio.open_tcp_stream(LOOPBACK, port))
        server = TcpStream.from_trio(await listeners[0].accept())
    assert client.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    tls_client = trio.SSLStream(client, client_context, server_hostname="localhost")
    tls_server = trio.SSLStream(server, server_context, server_side=True)
    async with tls_client, tls_server, trio.open_nursery() as nursery:
        nursery.start_soon(tls_server.do_handshake)
        await tls_client.send_all(b"USER demo\r\n" * 10_000)
        received = bytearray()
        while len(received) < 110_000:
            received += await tls_server.receive_some(65536)
    assert bytes(received) == b"USER demo\r\n" * 10_000
