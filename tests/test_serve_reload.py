"""Server.reload in-process: new sessions get the new config, running ones keep theirs.

The server runs on loopback with dynamic ports; each reload is a loader sent on the
``reloads`` channel (as cli.py does on SIGHUP), and the test waits for its
ReloadOutcome from ``on_reload``. Configs are real YAML files read by load_config.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import ssl
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme
from maildirs import make_maildir
from pop3client import Pop3Client, open_loopback

from popproxy.auth.passwords import hash_password
from popproxy.config import Config, TlsMode, load_config
from popproxy.reload import ConfigLoader, ReloadOutcome
from popproxy.sdnotify import Notifier
from popproxy.secret import Secret
from popproxy.serve import Server, serve

TEST_DEADLINE_SECONDS = 20
# Outcomes a test may leave unread before on_reload would have to wait.
MAX_UNREAD_OUTCOMES = 16
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
HASHES = {name: hash_password(Secret.from_str(pw), ln=4) for name, pw in PASSWORDS.items()}
MESSAGE = b"Subject: one\n\nfirst\n"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def workdir(tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with a Maildir per user and a server certificate; the cwd of the test."""
    monkeypatch.chdir(tmp_path)
    for name in ("alice", "bob"):
        make_maildir(tmp_path / "mail" / name, {"1700000001.M1P1.test": MESSAGE})
    issue_certificate(ca, tmp_path / "server.pem")
    return tmp_path


def issue_certificate(ca: trustme.CA, path: Path) -> bytes:
    """Write a new key and certificate for 127.0.0.1 to ``path`` at once; return its DER."""
    cert = ca.issue_cert("127.0.0.1")
    staging = path.with_suffix(".new")
    cert.private_key_and_cert_chain_pem.write_to_path(str(staging))
    os.replace(staging, path)
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def write_config(
    path: Path,
    users: Sequence[str] = ("alice",),
    *,
    port: int = 0,
    tls: bool = True,
    max_sessions: int = 100,
    maildirs: str = "mail",
    upstream_port: int | None = None,
    limits: Sequence[str] = (),
    hashes: Mapping[str, str] = HASHES,
) -> ConfigLoader:
    """Write a config file serving ``users``; return the loader a SIGHUP would run.

    With ``upstream_port``, user carol is routed to alice's account on the POP3
    server at that port (proxy mode).
    """
    user_lines = "".join(
        f'  {name}: {{password_hash: "{hashes[name]}", maildir: {maildirs}/{name}}}\n'
        for name in users
    )
    upstream = ""
    if upstream_port is not None:
        upstream = f"upstreams:\n  up: {{host: 127.0.0.1, port: {upstream_port}, tls: none}}\n"
        user_lines += (
            f'  carol: {{password_hash: "{HASHES["carol"]}", upstream: up,'
            " upstream_user: alice, upstream_password_file: alice.pw}\n"
        )
    listen = f"  - {{address: 127.0.0.1, port: {port}, tls: none}}\n" + (
        "  - {address: 127.0.0.1, port: 0, tls: starttls}\n"
        "  - {address: 127.0.0.1, port: 0, tls: implicit}\n"
        if tls
        else ""
    )
    text = (
        "listen:\n"
        + listen
        + ("tls: {cert_file: server.pem, key_file: server.pem}\n" if tls else "")
        + "allow_plaintext_auth: true\n"
        + upstream
        + ("users:\n" + user_lines if user_lines else "users: {}\n")
        # Four slashes: an absolute path, so the state stays in the test's directory.
        + f'state: {{url: "sqlite:///{path.parent / "state.db"}"}}\n'
        + textwrap.dedent(f"""\
            limits:
              auth_failure_delay_seconds: 0
              auth_penalty_initial_seconds: 0
              max_sessions: {max_sessions}
            """)
        + "".join(f"  {line}\n" for line in limits)
    )
    path.write_text(text)
    return functools.partial(load_config, path)


@dataclass
class Running:
    ports: dict[TlsMode, int]
    shutdown: trio.Event
    stopped: trio.Event
    reloads: trio.MemorySendChannel[ConfigLoader]
    outcomes: trio.MemoryReceiveChannel[ReloadOutcome]

    async def reload(self, load: ConfigLoader) -> ReloadOutcome:
        """Ask for a reload and wait for its outcome."""
        await self.reloads.send(load)
        return await self.outcomes.receive()


async def start(
    nursery: trio.Nursery,
    config: Config,
    notifier: Notifier | None = None,
    on_reload: Callable[[ReloadOutcome], None] | None = None,
) -> Running:
    shutdown, stopped = trio.Event(), trio.Event()
    send_reload, receive_reload = trio.open_memory_channel[ConfigLoader](0)
    send_outcome, receive_outcome = trio.open_memory_channel[ReloadOutcome](MAX_UNREAD_OUTCOMES)

    def record(outcome: ReloadOutcome) -> None:
        send_outcome.send_nowait(outcome)
        if on_reload is not None:
            on_reload(outcome)

    async def run(task_status: trio.TaskStatus[Sequence[tuple[str, int]]]) -> None:
        await serve(
            config,
            shutdown=shutdown,
            reloads=receive_reload,
            notifier=notifier,
            on_reload=record,
            task_status=task_status,
        )
        stopped.set()

    bound = await nursery.start(run)
    ports = {listener.tls: port for listener, (_, port) in zip(config.listen, bound, strict=True)}
    running = Running(ports, shutdown, stopped, send_reload, receive_outcome)
    initial = await running.outcomes.receive()
    assert initial.ok
    return running


async def connect(running: Running, mode: TlsMode = TlsMode.NONE) -> Pop3Client:
    client = Pop3Client(await open_loopback(running.ports[mode]), receive_bytes=4096)
    if mode is not TlsMode.IMPLICIT:
        assert (await client.line()).startswith(b"+OK")
    return client


async def tls_connect(running: Running, mode: TlsMode, ca: trustme.CA) -> tuple[Pop3Client, bytes]:
    """A TLS connection (implicit, or plain then STLS); return it and the server's leaf DER."""
    client = await connect(running, mode)
    if mode is TlsMode.STARTTLS:
        assert (await client.cmd(b"STLS")).startswith(b"+OK")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    der = await client.start_tls(context)
    if mode is TlsMode.IMPLICIT:
        assert (await client.line()).startswith(b"+OK")
    return client, der


async def login(client: Pop3Client, name: str) -> bytes:
    return await client.login(name, PASSWORDS[name])


def logged(caplog: pytest.LogCaptureFixture, msg: str) -> list[dict[str, object]]:
    """The fields of each record logged with this message."""
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == msg]


async def test_a_new_user_logs_in_after_a_reload_and_a_running_session_carries_on(
    workdir: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popproxy")
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path)())
        before = await connect(running)
        assert (await login(before, "alice")).startswith(b"+OK")
        refused = await connect(running)
        assert (await login(refused, "bob")).startswith(b"-ERR [AUTH]")

        outcome = await running.reload(write_config(path, ("bob",)))
        assert outcome.ok
        assert outcome.reason is None

        bob = await connect(running)
        assert (await login(bob, "bob")).startswith(b"+OK")
        alice_again = await connect(running)
        assert (await login(alice_again, "alice")).startswith(b"-ERR [AUTH]")
        # The session that logged in before the reload still has its maildrop.
        assert (await before.cmd(b"STAT")).startswith(b"+OK 1 ")
        assert await before.multiline(b"RETR 1") == MESSAGE.rstrip(b"\n").split(b"\n")
        assert (await before.cmd(b"QUIT")).startswith(b"+OK")
        (summary,) = logged(caplog, "reloaded")
        assert summary["changed"] == "users"
        assert (summary["users_added"], summary["users_removed"]) == (1, 1)
        assert summary["tls"] == "unchanged"
        assert not logged(caplog, "restart_required")


async def test_a_broken_config_leaves_the_running_one(
    workdir: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path)())
        broken = workdir / "broken.yaml"
        bob = "  bob: {password_hash: nope, maildir: mail/bob}\n"
        broken.write_text(path.read_text().replace("users:\n", "users:\n" + bob))
        outcome = await running.reload(functools.partial(load_config, broken))
        assert not outcome.ok
        assert outcome.reason is not None
        assert "users.bob.password_hash: expected a PHC hash string" in outcome.reason
        assert [f["reason"] for f in logged(caplog, "reload_failed")] == [outcome.reason]
        alice = await connect(running)
        assert (await login(alice, "alice")).startswith(b"+OK")
        assert (await alice.cmd(b"QUIT")).startswith(b"+OK")


async def test_a_bad_rule_file_fails_the_reload_and_the_running_rules_stay(
    workdir: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        (workdir / "alice.pw").write_text("pw\n")
        (workdir / "rules").mkdir()
        rule_file = workdir / "rules" / "10-carol.yaml"
        rule_file.write_text("rules:\n  - {name: carol-keep, action: keep}\n")
        path = workdir / "popproxy.yaml"
        load = write_config(path, upstream_port=1)
        path.write_text(path.read_text() + "rules_dir: rules\n")
        running = await start(nursery, load())

        rule_file.write_text("rules:\n  - {name: carol-keep, action: kept}\n")
        outcome = await running.reload(load)
        assert not outcome.ok
        assert outcome.reason is not None
        assert "rules/10-carol.yaml: rules[0] (carol-keep).action: expected one of" in (
            outcome.reason
        )
        assert outcome.config.policy.rule_names == ("carol-keep",)
        assert outcome.config.policy.for_user("carol", "up").expire == "NEVER"

        rule_file.write_text("rules:\n  - {name: carol-drain, action: delete_after_retrieve}\n")
        outcome = await running.reload(load)
        assert outcome.ok
        assert outcome.config.policy.rule_names == ("carol-drain",)
        assert outcome.config.policy.for_user("carol", "up").expire == "0"


async def test_a_loader_that_crashes_is_a_failed_reload(
    workdir: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    def crash() -> Config:
        raise RuntimeError("bug in a loader")

    with trio.fail_after(TEST_DEADLINE_SECONDS):
        running = await start(nursery, write_config(workdir / "popproxy.yaml")())
        outcome = await running.reload(crash)
        assert not outcome.ok
        assert logged(caplog, "reload_crashed")
        alice = await connect(running)
        assert (await login(alice, "alice")).startswith(b"+OK")


async def test_listener_changes_are_logged_as_restart_required_and_the_rest_applied(
    workdir: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popproxy")
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path)())
        outcome = await running.reload(write_config(path, ("alice", "bob"), port=1))
        assert outcome.ok
        assert [f["keys"] for f in logged(caplog, "restart_required")] == ["listen[0].port"]
        (summary,) = logged(caplog, "reloaded")
        assert summary["restart_required"] == 1
        bob = await connect(running)  # the port bound at start
        assert (await login(bob, "bob")).startswith(b"+OK")


async def test_a_config_without_tls_under_tls_listeners_is_refused(
    workdir: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path)())
        outcome = await running.reload(write_config(path, tls=False))
        assert not outcome.ok
        assert outcome.reason is not None
        assert outcome.reason.startswith("tls: the running listeners use TLS")


@pytest.mark.parametrize("mode", [TlsMode.IMPLICIT, TlsMode.STARTTLS])
async def test_a_certificate_replaced_on_disk_is_served_to_new_connections(
    mode: TlsMode,
    workdir: Path,
    ca: trustme.CA,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="popproxy")
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path)())
        old_session, old_der = await tls_connect(running, mode, ca)
        assert (await login(old_session, "alice")).startswith(b"+OK")

        new_der = issue_certificate(ca, workdir / "server.pem")  # the config file is the same
        assert new_der != old_der
        assert (await running.reload(functools.partial(load_config, path))).ok
        (summary,) = logged(caplog, "reloaded")
        assert (summary["changed"], summary["tls"]) == ("none", "changed")

        _, served = await tls_connect(running, mode, ca)
        assert hashlib.sha256(served).digest() == hashlib.sha256(new_der).digest()
        assert (await old_session.cmd(b"STAT")).startswith(b"+OK 1 ")


async def test_an_unreadable_certificate_keeps_the_loaded_one(
    workdir: Path, ca: trustme.CA, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path)())
        _, old_der = await tls_connect(running, TlsMode.IMPLICIT, ca)
        (workdir / "server.pem").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
        outcome = await running.reload(functools.partial(load_config, path))
        assert not outcome.ok
        assert outcome.reason is not None
        assert outcome.reason.startswith("cannot load the TLS certificate or key")
        _, served = await tls_connect(running, TlsMode.IMPLICIT, ca)
        assert served == old_der


async def test_a_reloaded_session_limit_applies_to_the_next_connection(
    workdir: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path, max_sessions=1)())
        await connect(running)
        over = await open_loopback(running.ports[TlsMode.NONE])
        assert (await Pop3Client(over).line()).startswith(b"-ERR [SYS/TEMP]")
        assert (await running.reload(write_config(path, max_sessions=2))).ok
        await connect(running)  # greeted with +OK


async def test_serve_tells_systemd_ready_reloading_and_stopping(
    workdir: Path, nursery: trio.Nursery
) -> None:
    import socket

    notify_path = workdir / "notify.sock"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver,
        trio.fail_after(TEST_DEADLINE_SECONDS),
    ):
        receiver.bind(str(notify_path))
        receiver.setblocking(False)

        def received() -> list[str]:
            out = []
            while True:
                try:
                    out.append(receiver.recv(4096).decode())
                except BlockingIOError:
                    return out

        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path)(), Notifier(str(notify_path)))
        assert [m.split("\n")[0] for m in received()] == ["READY=1"]
        assert (await running.reload(write_config(path, ("alice", "bob")))).ok
        first, second = received()
        assert first.startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert second.startswith("READY=1\n")
        running.shutdown.set()
        await running.stopped.wait()
        assert [m.split("\n")[0] for m in received()] == ["STOPPING=1"]


async def test_new_sessions_use_a_reloaded_upstream_and_a_running_one_keeps_its_own(
    workdir: Path, nursery: trio.Nursery
) -> None:
    """Proxy mode: two popproxy servers stand in as upstreams A and B (real POP3 peers)."""
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        (workdir / "alice.pw").write_text(PASSWORDS["alice"] + "\n")
        upstream_ports = []
        for name in ("a", "b"):
            message = b"Subject: %b\n\n%b\n" % (name.encode(), name.encode())
            make_maildir(workdir / f"mail-{name}" / "alice", {"1700000001.M1P1.test": message})
            load = write_config(workdir / f"{name}.yaml", tls=False, maildirs=f"mail-{name}")
            upstream = await start(nursery, load())
            upstream_ports.append(upstream.ports[TlsMode.NONE])
        port_a, port_b = upstream_ports
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path, tls=False, upstream_port=port_a)())
        before = await connect(running)
        assert (await login(before, "carol")).startswith(b"+OK")
        assert await before.multiline(b"RETR 1") == [b"Subject: a", b"", b"a"]

        outcome = await running.reload(write_config(path, tls=False, upstream_port=port_b))
        assert outcome.ok

        after = await connect(running)
        assert (await login(after, "carol")).startswith(b"+OK")
        assert await after.multiline(b"RETR 1") == [b"Subject: b", b"", b"b"]
        # The session opened before the reload still talks to upstream A.
        assert await before.multiline(b"TOP 1 0") == [b"Subject: a", b""]
        assert (await before.cmd(b"QUIT")).startswith(b"+OK")
        assert (await after.cmd(b"QUIT")).startswith(b"+OK")


async def test_the_reload_hook_drives_the_reload_metrics(
    workdir: Path, nursery: trio.Nursery
) -> None:
    """on_reload fits popproxy.metrics: config_loaded() and the session limit."""
    from prometheus_client import CollectorRegistry

    from popproxy.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def to_metrics(outcome: ReloadOutcome) -> None:
        metrics.config_loaded(successful=outcome.ok, timestamp=outcome.at)
        metrics.set_session_limit(outcome.config.limits.max_sessions)

    def sample(name: str) -> float | None:
        return registry.get_sample_value("popproxy_" + name)

    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path)(), on_reload=to_metrics)
        assert sample("config_last_reload_successful") == 1
        started = sample("config_last_reload_success_timestamp_seconds")
        assert started is not None

        path.write_text("listen: [\n")
        failed = await running.reload(functools.partial(load_config, path))
        assert not failed.ok
        assert failed.config.limits.max_sessions == 100  # the running config
        assert sample("config_last_reload_successful") == 0
        assert sample("config_last_reload_success_timestamp_seconds") == started

        ok = await running.reload(write_config(path, max_sessions=7))
        assert sample("config_last_reload_successful") == 1
        assert sample("config_last_reload_success_timestamp_seconds") == ok.at
        assert sample("sessions_limit") == 7


async def test_a_failing_reload_hook_is_logged_and_serving_goes_on(
    workdir: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_hook(outcome: ReloadOutcome) -> None:
        raise RuntimeError("bug in a metrics hook")

    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path)(), on_reload=broken_hook)
        assert (await running.reload(write_config(path, ("alice", "bob")))).ok
        assert len(logged(caplog, "reload_hook_failed")) == 2  # the initial load, the reload
        bob = await connect(running)
        assert (await login(bob, "bob")).startswith(b"+OK")


async def test_a_lockout_outlives_a_reload(workdir: Path, nursery: trio.Nursery) -> None:
    """The throttle table lives in the Server, not in the config a reload replaces."""
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        lockout = ("auth_lockout_failures: 2",)
        running = await start(nursery, write_config(path, ("alice", "bob"), limits=lockout)())
        for guess in (b"guess-1", b"guess-2"):
            client = await connect(running)
            assert await client.cmd(b"USER bob") == b"+OK"
            assert (await client.cmd(b"PASS " + guess)).startswith(b"-ERR [AUTH]")
        assert (await login(await connect(running), "bob")).startswith(b"-ERR [AUTH]")
        reloaded = write_config(path, ("alice", "bob"), limits=(*lockout, "auth_cache_size: 5"))
        assert (await running.reload(reloaded)).ok
        assert (await login(await connect(running), "bob")).startswith(b"-ERR [AUTH]")
        assert (await login(await connect(running), "alice")).startswith(b"+OK")


async def test_a_reload_that_changes_a_password_drops_its_cached_login(
    workdir: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        path = workdir / "popproxy.yaml"
        running = await start(nursery, write_config(path, ("alice",))())
        first = await connect(running)
        assert (await login(first, "alice")).startswith(b"+OK")  # now in the cache
        assert (await first.cmd(b"QUIT")).startswith(b"+OK")
        new_hash = hash_password(Secret.from_str("new-pw"), ln=4)
        changed = write_config(path, ("alice",), hashes={"alice": new_hash})
        assert (await running.reload(changed)).ok
        old = await connect(running)
        assert (await login(old, "alice")).startswith(b"-ERR [AUTH]")
        new = await connect(running)
        assert await new.cmd(b"USER alice") == b"+OK"
        assert (await new.cmd(b"PASS new-pw")).startswith(b"+OK")


async def test_sessions_share_their_listeners_context_until_a_reload(workdir: Path) -> None:
    """``Server.session_context`` builds a listener's context once per runtime: the
    same object for every session until a reload, a new one (with the new limits) after."""
    path = workdir / "popproxy.yaml"
    server = Server(write_config(path, tls=False, max_sessions=1)(), None)
    (listener,) = server.config.listen
    first = server.session_context(listener)
    assert server.session_context(listener) is first
    assert first.limits.max_sessions == 1
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        assert (await server.reload(write_config(path, tls=False, max_sessions=2))).ok
    after = server.session_context(listener)
    assert after is not first
    assert after.limits.max_sessions == 2
    assert server.session_context(listener) is after
