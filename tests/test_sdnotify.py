"""popproxy.sdnotify against real AF_UNIX datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popproxy.sdnotify import MAX_STATUS_CHARS, Notifier, socket_address, status_text

# sun_path holds 108 bytes including the NUL (unix(7)).
MAX_SOCKET_PATH_BYTES = 107
# How long a test waits for a datagram that must already be queued.
RECEIVE_TIMEOUT_SECONDS = 5.0
MAX_DATAGRAM_BYTES = 4096


def receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECEIVE_TIMEOUT_SECONDS)
    return sock


def messages(sock: socket.socket) -> Iterator[list[str]]:
    """Each queued datagram as its list of assignments, until none is left."""
    sock.setblocking(False)
    try:
        while True:
            try:
                data = sock.recv(MAX_DATAGRAM_BYTES)
            except BlockingIOError:
                return
            yield data.decode("utf-8").split("\n")
    finally:
        sock.settimeout(RECEIVE_TIMEOUT_SECONDS)


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "notify.sock"
    if len(bytes(path)) > MAX_SOCKET_PATH_BYTES:
        pytest.fail(f"tmp_path too long for a unix socket: {path}")
    with receiver(str(path)) as sock:
        yield str(path), sock


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"popproxy-test-{secrets.token_hex(8)}"
    with receiver(b"\0" + name.encode()) as sock:
        yield "@" + name, sock


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert socket_address("@name") == b"\0name"
    assert socket_address("@") is None
    assert socket_address("relative/path") is None
    assert socket_address("vsock:2:1234") is None


@pytest.mark.parametrize("which", ["path_socket", "abstract_socket"])
def test_ready_reloading_stopping_reach_the_socket(
    which: str, request: pytest.FixtureRequest
) -> None:
    address, sock = request.getfixturevalue(which)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.ready("serving on 2 listener(s)")
    assert notifier.reloading()
    assert notifier.stopping()
    assert notifier.status("draining")
    got = list(messages(sock))
    assert got[0] == ["READY=1", "STATUS=serving on 2 listener(s)"]
    assert got[1][0] == "RELOADING=1"
    name, _, usec = got[1][1].partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(usec) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert got[2:] == [["STOPPING=1"], ["STATUS=draining"]]


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not Notifier.from_environ({"NOTIFY_SOCKET": ""}).enabled


def test_a_missing_socket_is_logged_once_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.WARNING, logger="popproxy.sdnotify"):
        assert not notifier.ready()
        assert not notifier.stopping()
    failures = [r for r in caplog.records if r.getMessage() == "sd_notify_failed"]
    assert len(failures) == 1


def test_an_unsupported_address_disables_the_notifier(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="popproxy.sdnotify"):
        notifier = Notifier("vsock:2:1234")
    assert not notifier.enabled
    assert not notifier.ready()
    assert [r.getMessage() for r in caplog.records] == ["sd_notify_failed"]


def test_a_full_receiver_queue_does_not_block(
    path_socket: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody reads the socket: sends fail fast (EAGAIN) instead of blocking the caller."""
    address, _ = path_socket
    notifier = Notifier(address)
    # The kernel queues few datagrams per socket (net.unix.max_dgram_qlen, 10 by default).
    max_sends = 100_000
    with caplog.at_level(logging.WARNING, logger="popproxy.sdnotify"):
        sent = 0
        while notifier.status("x" * MAX_STATUS_CHARS) and sent < max_sends:
            sent += 1
    assert sent < max_sends
    assert [r.getMessage() for r in caplog.records] == ["sd_notify_failed"]


def test_status_text_is_one_bounded_line() -> None:
    assert status_text("a\nb\r\n  c") == "a b c"
    long = status_text("x" * (MAX_STATUS_CHARS * 2))
    assert len(long) == MAX_STATUS_CHARS
    assert long.endswith("...")
