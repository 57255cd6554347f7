"""serve() with metrics: real sessions over loopback counted in a registry of the test's own.

The server runs in-process on dynamic ports (the config, certificates and clients of
test_serve.py); the test passes its own ``Metrics`` and reads the samples back, or
scrapes the exporter that a ``metrics:`` section starts. Every test runs under a deadline.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
import test_serve
import trio
import trio.testing
from pop3client import Pop3Client, open_loopback
from prometheus_client import CollectorRegistry
from test_serve import (
    Running,
    Tls,
    connect,
    login,
    make_config,
    starttls,
)

from popproxy.auth.passwords import hash_password
from popproxy.config import (
    Config,
    ConfigError,
    ConfigIssue,
    MetricsConfig,
    TlsMode,
    UpstreamConfig,
    UserConfig,
)
from popproxy.metrics import Metrics
from popproxy.reload import ConfigLoader, ReloadOutcome
from popproxy.secret import Secret
from popproxy.serve import ServeError, serve

# The fixtures of test_serve.py, used here by name.
tls = test_serve.tls
maildir = test_serve.maildir

TEST_DEADLINE_SECONDS = 20
LISTENERS = tuple(mode.value for mode in TlsMode)
UPSTREAM = "down"  # an upstream on a port where nothing listens
# The closed sets a label value may come from (besides the listener and upstream names).
KNOWN_LABELS = {"version", "python_version"}


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value("popproxy_" + name, labels)
    assert found is not None, (name, labels)
    return found


async def start(nursery: trio.Nursery, config: Config, metrics: Metrics) -> Running:
    shutdown, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[Sequence[tuple[str, int]]]) -> None:
        await serve(config, shutdown=shutdown, metrics=metrics, task_status=task_status)
        stopped.set()

    bound = await nursery.start(run)
    ports = {listener.tls: port for listener, (_, port) in zip(config.listen, bound, strict=True)}
    return Running(ports, shutdown, stopped)


def closed_port() -> int:
    """A loopback port where nothing listens (bound, never listening: connections are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    CLOSED_SOCKETS.append(sock)
    port: int = sock.getsockname()[1]
    return port


CLOSED_SOCKETS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def release_closed_ports() -> object:
    yield
    while CLOSED_SOCKETS:
        CLOSED_SOCKETS.pop().close()


def with_proxy_user(config: Config) -> Config:
    """``config`` plus user carol, routed to an upstream that refuses connections."""
    upstream = UpstreamConfig(UPSTREAM, "127.0.0.1", closed_port(), TlsMode.NONE)
    carol = UserConfig(
        "carol",
        hash_password(Secret.from_str("carol-pw"), ln=4),
        upstream=UPSTREAM,
        upstream_user="carol@example.net",
        upstream_password=Secret.from_str("upstream-pw"),
    )
    return replace(
        config,
        upstreams=MappingProxyType({UPSTREAM: upstream}),
        users=MappingProxyType({**config.users, "carol": carol}),
    )


async def eof(client: Pop3Client) -> None:
    assert await client.at_eof()


async def test_startup_declares_every_name_and_publishes_the_config(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    metrics = Metrics(CollectorRegistry())
    before = time.time()
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        await start(nursery, with_proxy_user(make_config(maildir, tls, max_sessions=42)), metrics)
    for listener in LISTENERS:
        assert sample(metrics, "sessions_started_total", listener=listener) == 0
        assert sample(metrics, "sessions_ended_total", listener=listener, result="quit") == 0
    assert sample(metrics, "upstream_logins_total", upstream=UPSTREAM, result="ok") == 0
    assert sample(metrics, "sessions_limit") == 42
    assert sample(metrics, "config_last_reload_successful") == 1
    assert before <= sample(metrics, "config_last_reload_success_timestamp_seconds") <= time.time()


async def test_sessions_on_every_listener_are_counted(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    metrics = Metrics(CollectorRegistry())
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, make_config(maildir, tls), metrics)
        plain = await connect(running, TlsMode.NONE)
        assert (await plain.cmd(b"USER demo")).startswith(b"-ERR [AUTH]")  # not before TLS
        await plain.stream.aclose()

        stls = await connect(running, TlsMode.STARTTLS)
        await starttls(stls, tls)
        await login(stls)
        assert (await stls.cmd(b"RETR 1")).startswith(b"+OK")
        while await stls.line() != b".":
            pass
        assert (await stls.cmd(b"DELE 2")).startswith(b"+OK")
        assert (await stls.cmd(b"QUIT")).startswith(b"+OK Logging out, 1 messages")
        await eof(stls)

        implicit = await connect(running, TlsMode.IMPLICIT, tls)
        assert await implicit.cmd(b"USER demo") == b"+OK"
        assert (await implicit.cmd(b"PASS wrong")).startswith(b"-ERR [AUTH]")
        await login(implicit)
        assert (await implicit.cmd(b"QUIT")).startswith(b"+OK")
        await eof(implicit)

        running.shutdown.set()
        await running.stopped.wait()

    for listener in LISTENERS:
        assert sample(metrics, "sessions_started_total", listener=listener) == 1
        assert sample(metrics, "sessions_active", listener=listener) == 0
        assert sample(metrics, "client_sent_bytes_total", listener=listener) > 0
        assert sample(metrics, "client_received_bytes_total", listener=listener) > 0
    assert sample(metrics, "sessions_ended_total", listener="none", result="eof") == 1
    for listener in ("starttls", "implicit"):
        assert sample(metrics, "sessions_ended_total", listener=listener, result="quit") == 1
        assert sample(metrics, "tls_handshakes_total", listener=listener, result="ok") == 1
        assert sample(metrics, "tls_handshakes_total", listener=listener, result="failed") == 0
    assert sample(metrics, "logins_total", mechanism="user", result="ok") == 2
    assert sample(metrics, "logins_total", mechanism="user", result="failed") == 1
    assert sample(metrics, "commands_total", verb="USER", result="err") == 1  # plaintext refused
    assert sample(metrics, "commands_total", verb="STLS", result="ok") == 1
    assert sample(metrics, "commands_total", verb="RETR", result="ok") == 1
    assert sample(metrics, "commands_total", verb="DELE", result="ok") == 1
    assert sample(metrics, "commands_total", verb="QUIT", result="ok") == 2


async def test_a_failed_tls_handshake_is_counted(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    metrics = Metrics(CollectorRegistry())
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, make_config(maildir, tls), metrics)
        stream = await open_loopback(running.ports[TlsMode.IMPLICIT])
        await stream.send_all(b"USER demo\r\n")  # POP3 in clear on the implicit-TLS port
        assert await Pop3Client(stream).at_eof()
        running.shutdown.set()
        await running.stopped.wait()
    assert sample(metrics, "tls_handshakes_total", listener="implicit", result="failed") == 1
    assert sample(metrics, "sessions_ended_total", listener="implicit", result="tls_error") == 1


async def test_an_alpn_offer_without_pop3_is_refused_logged_and_counted(
    maildir: Path, tls: Tls, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # ALPACA (RFC 7301 §3.2) on the listeners' own sockets, implicit TLS and STLS.
    caplog.set_level(logging.INFO, logger="popproxy.session")
    metrics = Metrics(CollectorRegistry())
    context = tls.client_context()
    context.set_alpn_protocols(["http/1.1"])
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, make_config(maildir, tls), metrics)
        implicit = Pop3Client(await open_loopback(running.ports[TlsMode.IMPLICIT]))
        with pytest.raises(trio.BrokenResourceError) as implicit_failed:
            await implicit.start_tls(context)
        starttls = Pop3Client(await open_loopback(running.ports[TlsMode.STARTTLS]))
        assert (await starttls.line()).startswith(b"+OK")
        assert (await starttls.cmd(b"STLS")).startswith(b"+OK")
        with pytest.raises(trio.BrokenResourceError) as starttls_failed:
            await starttls.start_tls(context)
        running.shutdown.set()
        await running.stopped.wait()
    for failed in (implicit_failed, starttls_failed):
        assert "alert no application protocol" in str(failed.value.__cause__)
    for listener in ("implicit", "starttls"):
        assert sample(metrics, "tls_handshakes_total", listener=listener, result="failed") == 1
        assert sample(metrics, "sessions_ended_total", listener=listener, result="tls_error") == 1
    lines = [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "tls_alpn_refused"]
    assert [line["offered"] for line in lines] == ["http/1.1", "http/1.1"]


async def test_connections_over_the_limit_are_counted_as_refused(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    metrics = Metrics(CollectorRegistry())
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, make_config(maildir, tls, max_sessions=1), metrics)
        await connect(running, TlsMode.NONE)
        refused = await connect(running, TlsMode.NONE)
        assert await refused.line() == b"-ERR [SYS/TEMP] Too many connections, try again later."
        assert sample(metrics, "sessions_active", listener="none") == 1
    assert sample(metrics, "sessions_refused_total", listener="none") == 1
    assert sample(metrics, "sessions_started_total", listener="none") == 1
    assert sample(metrics, "sessions_limit") == 1


async def test_a_login_whose_upstream_is_down_is_a_login_error(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    metrics = Metrics(CollectorRegistry())
    config = replace(with_proxy_user(make_config(maildir, tls)), allow_plaintext_auth=True)
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, config, metrics)
        client = await connect(running, TlsMode.NONE)
        assert await client.cmd(b"USER carol") == b"+OK"
        assert (await client.cmd(b"PASS carol-pw")).startswith(b"-ERR [SYS/TEMP]")
    assert sample(metrics, "logins_total", mechanism="user", result="error") == 1
    assert sample(metrics, "upstream_logins_total", upstream=UPSTREAM, result="failed") == 1
    assert sample(metrics, "upstream_errors_total", upstream=UPSTREAM, kind="connect") == 1
    assert sample(metrics, "upstream_sessions_active", upstream=UPSTREAM) == 0


async def test_no_label_holds_a_user_name_or_an_address(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    """Invariant 6: after logins (good and bad, local and proxied), every label value is a
    configured name or from a closed set; no user name, upstream user or address."""
    metrics = Metrics(CollectorRegistry())
    config = replace(with_proxy_user(make_config(maildir, tls)), allow_plaintext_auth=True)
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, config, metrics)
        client = await connect(running, TlsMode.NONE)
        for user, password in (("demo", "wrong"), ("carol", "carol-pw"), ("mallory", "x")):
            assert await client.cmd(f"USER {user}".encode()) == b"+OK"
            assert (await client.cmd(f"PASS {password}".encode())).startswith(b"-ERR")
        await login(client)
        assert (await client.cmd(b"QUIT")).startswith(b"+OK")
    values = {
        value
        for family in metrics.registry.collect()
        for s in family.samples
        for label, value in s.labels.items()
        if label not in KNOWN_LABELS
    }
    secrets = ("demo", "carol", "mallory", "example.net", "127.0.0.1", "wrong", "pw")
    assert not [v for v in values if any(secret in v for secret in secrets)]


async def test_a_reload_updates_the_gauges_and_declares_new_upstreams(
    maildir: Path, tls: Tls, nursery: trio.Nursery
) -> None:
    metrics = Metrics(CollectorRegistry())
    shutdown = trio.Event()
    send, receive = trio.open_memory_channel[ConfigLoader](0)
    outcomes: list[ReloadOutcome] = []
    done = trio.Event()
    initial = make_config(maildir, tls)

    def on_reload(outcome: ReloadOutcome) -> None:
        outcomes.append(outcome)
        done.set()

    async def reload(load: ConfigLoader) -> ReloadOutcome:
        nonlocal done
        done = trio.Event()
        await send.send(load)
        await done.wait()
        return outcomes[-1]

    def broken() -> Config:
        raise ConfigError((ConfigIssue("test.yaml", "listen", "broken on purpose"),))

    async def run(task_status: trio.TaskStatus[Sequence[tuple[str, int]]]) -> None:
        await serve(
            initial,
            shutdown=shutdown,
            reloads=receive,
            on_reload=on_reload,
            metrics=metrics,
            task_status=task_status,
        )

    with trio.fail_after(TEST_DEADLINE_SECONDS):
        await nursery.start(run)
        first = sample(metrics, "config_last_reload_success_timestamp_seconds")
        assert (
            metrics.registry.get_sample_value(
                "popproxy_upstream_errors_total", {"upstream": UPSTREAM, "kind": "connect"}
            )
            is None
        )

        failed = await reload(broken)
        assert not failed.ok
        assert sample(metrics, "config_last_reload_successful") == 0
        assert sample(metrics, "config_last_reload_success_timestamp_seconds") == first

        grown = replace(with_proxy_user(initial), limits=replace(initial.limits, max_sessions=9))
        ok = await reload(lambda: grown)
        assert ok.ok
        assert sample(metrics, "config_last_reload_successful") == 1
        assert sample(metrics, "config_last_reload_success_timestamp_seconds") == ok.at >= first
        assert sample(metrics, "sessions_limit") == 9
        assert sample(metrics, "upstream_errors_total", upstream=UPSTREAM, kind="connect") == 0
        shutdown.set()


async def test_a_metrics_section_starts_the_exporter(
    maildir: Path, tls: Tls, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popproxy")
    metrics = Metrics(CollectorRegistry())
    config = replace(make_config(maildir, tls), metrics=MetricsConfig("127.0.0.1", 0))
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, config, metrics)
        messages = [r.getMessage() for r in caplog.records]
        assert messages.index("metrics_listening") < messages.index("ready")
        record = next(r for r in caplog.records if r.getMessage() == "metrics_listening")
        fields = getattr(record, "fields", {})
        assert fields["address"] == "127.0.0.1"
        stls = await connect(running, TlsMode.STARTTLS)
        assert (await stls.cmd(b"QUIT")).startswith(b"+OK")
        await eof(stls)
        await trio.testing.wait_all_tasks_blocked()

        scrape = await trio.open_tcp_stream("127.0.0.1", fields["port"])
        await scrape.send_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        response = bytearray()
        while data := await scrape.receive_some(65536):
            response += data
        await scrape.aclose()

        running.shutdown.set()
        await running.stopped.wait()
        with pytest.raises(OSError):  # the exporter stopped with the server
            await trio.open_tcp_stream("127.0.0.1", fields["port"])
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'popproxy_sessions_ended_total{listener="starttls",result="quit"} 1.0\n' in response


async def test_without_a_metrics_section_there_is_no_exporter(
    maildir: Path, tls: Tls, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popproxy")
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        await start(nursery, make_config(maildir, tls), Metrics(CollectorRegistry()))
    messages = [r.getMessage() for r in caplog.records]
    assert "ready" in messages
    assert "metrics_listening" not in messages


async def test_an_exporter_address_in_use_stops_the_start(maildir: Path, tls: Tls) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = replace(make_config(maildir, tls), metrics=MetricsConfig("127.0.0.1", port))
        with (
            trio.fail_after(TEST_DEADLINE_SECONDS),
            pytest.RaisesGroup(
                pytest.RaisesExc(ServeError, match="cannot serve metrics"), flatten_subgroups=True
            ),
        ):
            await serve(config, shutdown=trio.Event(), metrics=Metrics(CollectorRegistry()))
