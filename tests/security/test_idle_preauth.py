"""Idle connections that never log in (issue 6, "Limits").

Must show: 1,000 idle pre-auth connections do not delay a real login by more than
1 s. A popproxy subprocess gets 1,000 TCP connections that each read the greeting
and then say nothing; a client then logs in end to end (connect, greeting, USER,
PASS, STAT, QUIT) while they wait, and must be done within 1 s; every idle
connection must still be answered afterwards. The password hash is the harness's
cheap one: a hash costs the same with or without idle connections (a default-cost
scrypt takes 0.1 to 1 s on this shared test machine, with or without them), so the
bound is kept for what idle connections could slow: accepting, scheduling, the
event loop. And the login timeout closes such a connection (in-process, on trio's
mock clock).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing
from integration.harness import (
    LOOPBACK,
    PASSWORD,
    SOCKET_TIMEOUT_SECONDS,
    USER,
    ServerProcess,
    TlsFiles,
    User,
    write_config,
)
from maildirs import make_maildir
from pop3client import SocketPop3

from popproxy.auth.passwords import hash_password
from popproxy.config import Config, LimitsConfig, ListenerConfig, StateConfig, TlsMode, UserConfig
from popproxy.secret import Secret
from popproxy.serve import serve

# Issue 6: the idle connections, and the bound on the login made meanwhile.
IDLE_CONNECTIONS = 1000
LOGIN_BOUND_SECONDS = 1.0
# Descriptors beyond the idle connections: the login, the server's own files, pytest's.
SPARE_DESCRIPTORS = 256
# The server must keep the idle connections for the whole test: far above its length.
IDLE_LOGIN_TIMEOUT_SECONDS = 600
# How many of the idle connections are asked a command afterwards (first, last, between).
PROBED_CONNECTIONS = 20
# The in-process test: a short login timeout, on the mock clock.
SHORT_LOGIN_TIMEOUT_SECONDS = 30
TEST_DEADLINE_SECONDS = 60


def raise_descriptor_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE (the server inherits it) within the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, (
            f"this test needs {needed} file descriptors; the hard limit is {hard}"
        )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.fixture
def server(tmp_path: Path, tls_files: TlsFiles) -> Iterator[ServerProcess]:
    """popproxy with limits high enough for the idle crowd."""
    raise_descriptor_limit(2 * IDLE_CONNECTIONS + SPARE_DESCRIPTORS)
    maildir = make_maildir(
        tmp_path / "Maildir", {"1700000001.M1P1.test": b"Subject: one\n\nbody\n"}
    )
    config = write_config(
        tmp_path / "popproxy.yaml",
        users=[User(USER, PASSWORD, maildir)],
        tls=tls_files,
        listeners=["none"],
        limits={
            "max_sessions": 2 * IDLE_CONNECTIONS,
            "max_sessions_per_ip": 2 * IDLE_CONNECTIONS,
            "login_timeout_seconds": IDLE_LOGIN_TIMEOUT_SECONDS,
        },
    )
    process = ServerProcess(config, listeners=["none"], cwd=tmp_path)
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log_text()


def login_once(port: int) -> float:
    """A whole login session; the seconds it took, from connect to the QUIT's answer."""
    started = time.monotonic()
    with SocketPop3(port, timeout=SOCKET_TIMEOUT_SECONDS) as pop:
        assert pop.greeting.startswith(b"+OK")
        for command, expected in [
            (f"USER {USER}", b"+OK"),
            (f"PASS {PASSWORD}", b"+OK Logged in"),
            ("STAT", b"+OK 1 "),
            ("QUIT", b"+OK"),
        ]:
            reply = pop.cmd(command)
            assert reply.startswith(expected), (command, reply)
    return time.monotonic() - started


def test_1000_idle_preauth_connections_do_not_delay_a_login(server: ServerProcess) -> None:
    port = server.port("none")
    baseline = login_once(port)
    idle: list[SocketPop3] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            pop = SocketPop3(port, timeout=SOCKET_TIMEOUT_SECONDS)
            idle.append(pop)
            assert pop.greeting.startswith(b"+OK")  # a session, greeted, now idle
        elapsed = login_once(port)
        figures = f"{elapsed:.3f} s with {len(idle)} idle connections, {baseline:.3f} s alone"
        assert elapsed <= LOGIN_BOUND_SECONDS, figures
        step = max(1, len(idle) // PROBED_CONNECTIONS)
        for pop in [*idle[::step], idle[-1]]:
            assert pop.cmd(b"CAPA").startswith(b"+OK")
            pop.body()  # bounded: the capability list ends
    finally:
        for pop in idle:
            pop.close()
    assert not server.records("session_crashed"), server.log_text()
    assert not server.records("session_refused"), server.log_text()


async def test_the_login_timeout_closes_an_idle_connection(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """RFC 1939 sets no pre-auth timer; Dovecot's is its login_timeout. A client that never
    logs in gets -ERR [SYS/TEMP] and is closed when login_timeout_seconds have passed."""
    maildir = make_maildir(tmp_path / "Maildir")
    user = UserConfig("demo", hash_password(Secret.from_str("secret"), ln=4), maildir=maildir)
    config = Config(
        source=tmp_path / "popproxy.yaml",
        listen=(ListenerConfig(LOOPBACK, 0, TlsMode.NONE),),
        tls=None,
        allow_plaintext_auth=True,
        upstreams={},
        users={"demo": user},
        state=StateConfig(url=f"sqlite:///{tmp_path / 'popproxy-state.db'}"),
        rules_dir=None,
        metrics=None,
        limits=replace(LimitsConfig(), login_timeout_seconds=SHORT_LOGIN_TIMEOUT_SECONDS),
    )
    shutdown = trio.Event()
    # Started in real time: the server loads files in worker threads, and a clock that
    # jumped meanwhile would expire every deadline.
    autojump_clock.autojump_threshold = math.inf
    bound = await nursery.start(_serve, config, shutdown)
    autojump_clock.autojump_threshold = 0
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        stream = await trio.open_tcp_stream(LOOPBACK, bound[0][1])
        connected = trio.current_time()
        received = b""
        while True:  # bounded: the server closes within the login timeout
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            received += chunk
        waited = trio.current_time() - connected
        await stream.aclose()
        shutdown.set()
    greeting, goodbye = received.split(b"\r\n")[:2]
    assert greeting.startswith(b"+OK")
    assert goodbye == b"-ERR [SYS/TEMP] Disconnected: login timeout."
    assert waited == pytest.approx(SHORT_LOGIN_TIMEOUT_SECONDS, abs=0.5)


async def _serve(
    config: Config, shutdown: trio.Event, *, task_status: trio.TaskStatus[object]
) -> None:
    await serve(config, shutdown=shutdown, task_status=task_status)
