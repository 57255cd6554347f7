"""serve(): listeners, the session limit, STLS rules and graceful shutdown, over loopback.

The server runs in-process on dynamic ports; clients are tests/pop3client.py's raw
clients over loopback, with TLS from a throwaway trustme CA. Every test runs under a deadline.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from maildirs import make_maildir
from pop3client import Pop3Client, open_loopback

from popproxy import serve as serve_module
from popproxy.auth.passwords import hash_password
from popproxy.config import (
    Config,
    LimitsConfig,
    ListenerConfig,
    StateConfig,
    TlsConfig,
    TlsMode,
    UserConfig,
)
from popproxy.secret import Secret
from popproxy.serve import serve

TEST_DEADLINE_SECONDS = 20
MESSAGES = {
    "1700000001.M1P1.test": b"Subject: one\n\nfirst\n",
    "1700000002.M2P1.test": b"Subject: two\n\nsecond\n",
}


@dataclass
class Tls:
    ca: trustme.CA
    cert_file: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    ca = trustme.CA()
    pem = tmp_path_factory.mktemp("tls") / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    return Tls(ca, pem)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    return make_maildir(tmp_path / "Maildir", MESSAGES)


def remaining(maildir: Path) -> set[str]:
    return {p.name for sub in ("new", "cur") for p in (maildir / sub).iterdir()}


def make_config(maildir: Path, tls: Tls, **limits: Any) -> Config:
    user = UserConfig("demo", hash_password(Secret.from_str("secret"), ln=4), maildir=maildir)
    return Config(
        source=Path("test.yaml"),
        listen=tuple(ListenerConfig("127.0.0.1", 0, mode) for mode in TlsMode),
        tls=TlsConfig(tls.cert_file, tls.cert_file),
        allow_plaintext_auth=False,
        upstreams=MappingProxyType({}),
        users=MappingProxyType({"demo": user}),
        # Beside the Maildir (a tmp_path), never the default file in the working directory.
        state=StateConfig(url=f"sqlite:///{maildir.parent / 'popproxy-state.db'}"),
        rules_dir=None,
        metrics=None,
        limits=replace(
            LimitsConfig(auth_failure_delay_seconds=0.0, auth_penalty_initial_seconds=0.0),
            **limits,
        ),
    )


@dataclass
class Running:
    ports: dict[TlsMode, int]
    shutdown: trio.Event
    stopped: trio.Event


async def connect(running: Running, mode: TlsMode, tls: Tls | None = None) -> Pop3Client:
    client = Pop3Client(await open_loopback(running.ports[mode]), receive_bytes=4096)
    if mode is TlsMode.IMPLICIT:
        assert tls is not None
        await client.start_tls(tls.client_context())
    greeting = await client.line()
    assert greeting.startswith((b"+OK", b"-ERR")), greeting
    if greeting.startswith(b"-ERR"):
        client.buf[:0] = greeting + b"\r\n"
    return client


async def starttls(client: Pop3Client, tls: Tls) -> None:
    assert (await client.cmd(b"STLS")).startswith(b"+OK")
    await client.start_tls(tls.client_context())


async def login(client: Pop3Client) -> None:
    assert (await client.login("demo", "secret")).startswith(b"+OK Logged in")


async def start(nursery: trio.Nursery, config: Config) -> Running:
    shutdown, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[Sequence[tuple[str, int]]]) -> None:
        await serve(config, shutdown=shutdown, task_status=task_status)
        stopped.set()

    bound = await nursery.start(run)
    ports = {listener.tls: port for listener, (_, port) in zip(config.listen, bound, strict=True)}
    return Running(ports, shutdown, stopped)


async def test_each_listener_kind_serves_a_login(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, make_config(maildir, tls))
        plain = await connect(running, TlsMode.NONE)
        reply = await plain.cmd(b"USER demo")
        assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
        await plain.stream.aclose()

        stls = await connect(running, TlsMode.STARTTLS)
        await starttls(stls, tls)
        await login(stls)
        assert (await stls.cmd(b"QUIT")).startswith(b"+OK")

        implicit = await connect(running, TlsMode.IMPLICIT, tls)
        await login(implicit)
        assert (await implicit.cmd(b"STLS")).startswith(b"-ERR")
        assert (await implicit.cmd(b"QUIT")).startswith(b"+OK")
        running.shutdown.set()
        await running.stopped.wait()


async def test_stls_with_a_pipelined_command_is_refused_and_closed(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, make_config(maildir, tls))
        client = await connect(running, TlsMode.STARTTLS)
        await client.stream.send_all(b"STLS\r\nCAPA\r\n")
        assert (await client.line()).startswith(b"-ERR STLS must be the last command")
        assert await client.at_eof()
        # the server goes on serving
        again = await connect(running, TlsMode.STARTTLS)
        await starttls(again, tls)
        await login(again)


async def test_user_given_before_stls_is_forgotten_after_the_handshake(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        # With plaintext auth allowed (the trusted-LAN setting) USER is accepted in
        # clear; it must still not survive the handshake (RFC 2595 §4).
        config = replace(make_config(maildir, tls), allow_plaintext_auth=True)
        running_lan = await start(nursery, config)
        lan = await connect(running_lan, TlsMode.STARTTLS)
        assert await lan.cmd(b"USER demo") == b"+OK"
        await starttls(lan, tls)
        assert await lan.cmd(b"PASS secret") == b"-ERR No username given"
        await login(lan)


async def test_sessions_over_the_limit_get_sys_temp_and_are_closed(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, make_config(maildir, tls, max_sessions=2))
        first = await connect(running, TlsMode.NONE)
        second = await connect(running, TlsMode.NONE)
        third = await connect(running, TlsMode.NONE)
        assert await third.line() == b"-ERR [SYS/TEMP] Too many connections, try again later."
        assert await third.at_eof()
        assert (await first.cmd(b"QUIT")).startswith(b"+OK")
        assert await first.at_eof()
        # a slot is free again once the first session's task has finished
        await trio.testing.wait_all_tasks_blocked()
        fourth = await connect(running, TlsMode.NONE)
        assert (await fourth.cmd(b"CAPA")).startswith(b"+OK")
        await second.stream.aclose()


async def test_shutdown_stops_accepting_and_lets_a_session_finish_within_the_grace(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        config = replace(
            make_config(maildir, tls, shutdown_grace_seconds=30), allow_plaintext_auth=True
        )
        running = await start(nursery, config)
        client = await connect(running, TlsMode.NONE)
        await login(client)
        assert (await client.cmd(b"DELE 1")).startswith(b"+OK")
        running.shutdown.set()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", running.ports[TlsMode.NONE])
        assert (await client.cmd(b"QUIT")).startswith(b"+OK Logging out, 1 messages deleted")
        await running.stopped.wait()
        assert remaining(maildir) == {"1700000002.M2P1.test"}


async def test_sessions_still_open_after_the_grace_are_cancelled_and_delete_nothing(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        config = replace(
            make_config(maildir, tls, shutdown_grace_seconds=0.2), allow_plaintext_auth=True
        )
        running = await start(nursery, config)
        client = await connect(running, TlsMode.NONE)
        await login(client)
        assert (await client.cmd(b"DELE 1")).startswith(b"+OK")
        assert (await client.cmd(b"DELE 2")).startswith(b"+OK")
        running.shutdown.set()
        await running.stopped.wait()
        assert await client.at_eof()
        assert remaining(maildir) == set(MESSAGES)


class SessionEnded(logging.Handler):
    """Sets ``seen`` when a session logs its summary (sessions log on the trio thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "session_end":
            self.seen.set()


async def test_a_client_resetting_in_the_middle_of_a_retr_leaves_the_server_serving(
    maildir: Path, tls: Tls, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popproxy.session")
    big = b"".join(b"line %07d of a big message\n" % i for i in range(200_000))  # ~5.6 MB
    (maildir / "new" / "1700000003.M3P1.test").write_bytes(b"Subject: big\n\n" + big)
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        config = replace(make_config(maildir, tls), allow_plaintext_auth=True)
        running = await start(nursery, config)
        client = await connect(running, TlsMode.NONE)
        await login(client)
        assert (await client.cmd(b"DELE 1")).startswith(b"+OK")
        assert (await client.cmd(b"RETR 3")).startswith(b"+OK")
        await client.stream.receive_some(65536)  # the server is now blocked writing to us
        assert isinstance(client.stream, trio.SocketStream)
        client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ended = SessionEnded()
        logging.getLogger("popproxy.session").addHandler(ended)
        try:
            await client.stream.aclose()  # RST
            # session_end is logged once the session has closed its Maildir (its lock
            # is released in a worker thread, which a quick next login could overtake).
            await ended.seen.wait()
        finally:
            logging.getLogger("popproxy.session").removeHandler(ended)
        again = await connect(running, TlsMode.NONE)
        await login(again)  # the Maildir lock was released
        assert (await again.cmd(b"STAT")).startswith(b"+OK 3 ")
        assert (await again.cmd(b"QUIT")).startswith(b"+OK")
        assert remaining(maildir) == set(MESSAGES) | {"1700000003.M3P1.test"}


async def test_refusals_beyond_their_own_limit_are_closed_without_a_word(
    maildir: Path, tls: Tls, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve_module, "MAX_PENDING_REFUSALS", 0)
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, make_config(maildir, tls, max_sessions=1))
        await connect(running, TlsMode.NONE)
        stream = await open_loopback(running.ports[TlsMode.NONE])
        assert await Pop3Client(stream).at_eof()
