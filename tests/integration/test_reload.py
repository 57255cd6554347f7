"""SIGHUP against the real `popproxy run` process: what a reload applies, keeps and refuses.

Each test rewrites the server's config file in place (the same path, as an operator
would), sends SIGHUP, and waits for the outcome line (`msg=reloaded` or
`msg=reload_failed`) under a deadline; then it checks with real connections. The TLS
files are this module's own (not the session-wide ones), so a test may replace them.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import yaml
from pop3client import SocketPop3

from .conftest import StartServer
from .harness import (
    LOOPBACK,
    PASSWORD,
    SOCKET_TIMEOUT_SECONDS,
    USER,
    Corpus,
    Pop3Error,
    ServerProcess,
    StreamingPop3,
    TlsFiles,
    User,
    make_tls_files,
    write_config,
)

# How long a reload may take from SIGHUP to its outcome line.
RELOAD_DEADLINE_SECONDS = 10.0
# How long the test waits for one sd_notify datagram that the server must have sent.
NOTIFY_DEADLINE_SECONDS = 10.0
MAX_DATAGRAM_BYTES = 4096
OUTCOMES = ("reloaded", "reload_failed")

BOB = "bob"
BOB_PASSWORD = "b0b-pass_word.y"


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    """This test's own CA and server certificate (overrides the session-wide files)."""
    return make_tls_files(tmp_path / "tls")


def sighup_and_wait(server: ServerProcess) -> dict[str, str]:
    """Send SIGHUP and return the outcome record of that reload (reloaded or reload_failed)."""
    done = len([r for r in server.records() if r.get("msg") in OUTCOMES])
    server.proc.send_signal(signal.SIGHUP)
    records = server.wait_for_log(
        lambda rs: len([r for r in rs if r.get("msg") in OUTCOMES]) > done,
        timeout=RELOAD_DEADLINE_SECONDS,
        what="the outcome of a reload",
    )
    return [r for r in records if r.get("msg") in OUTCOMES][done]


def rewrite_config(
    server: ServerProcess,
    users: Sequence[User],
    tls: TlsFiles,
    *,
    listeners: Sequence[str],
    edit: Callable[[dict[str, object]], None] | None = None,
) -> None:
    """Write the server's config file anew, as the harness does, then apply ``edit``."""
    write_config(server.config, users=users, tls=tls, listeners=listeners)
    if edit is not None:
        data = yaml.safe_load(server.config.read_text())
        edit(data)
        server.config.write_text(yaml.safe_dump(data, sort_keys=False))


def smallest_message(client: StreamingPop3) -> int:
    """The number of the smallest message (the corpus has a 50 MB one too)."""
    listing = [line.split() for line in client.multiline("LIST")]
    return int(min(listing, key=lambda item: int(item[1]))[0])


def retr_matches_corpus(client: StreamingPop3, corpus: Corpus) -> None:
    number = smallest_message(client)
    size, sha = client.multiline_digest(f"RETR {number}")
    message = corpus.by_sha256()[sha]
    assert size == message.size


def leaf_der(tls: TlsFiles) -> bytes:
    """The DER of the first certificate in the server chain file."""
    first = tls.server_cert.read_text().split("-----END CERTIFICATE-----")[0]
    return ssl.PEM_cert_to_DER_cert(first + "-----END CERTIFICATE-----\n")


def served_der(port: int, context: ssl.SSLContext, *, stls: bool = False) -> bytes:
    """The certificate a TLS listener presents now (implicit, or after STLS)."""
    if not stls:
        with SocketPop3(port, tls=context, greet=False, timeout=SOCKET_TIMEOUT_SECONDS) as pop:
            return pop.peer_certificate()
    with SocketPop3(port, timeout=SOCKET_TIMEOUT_SECONDS) as pop:
        assert pop.greeting.startswith(b"+OK")
        assert pop.cmd(b"STLS").startswith(b"+OK")
        return pop.start_tls(context)


def test_sighup_with_a_broken_config_keeps_serving_the_old_one(
    start: StartServer, maildir: Path, tls_files: TlsFiles
) -> None:
    alice = User(USER, PASSWORD, maildir)
    server = start(users=[alice], listeners=["none"])
    good = server.config.read_text()
    server.config.write_text(good + "users: [\n")  # not YAML
    outcome = sighup_and_wait(server)
    assert outcome["msg"] == "reload_failed"
    assert "not valid YAML" in outcome["reason"]

    rewrite_config(
        server,
        [alice],
        tls_files,
        listeners=["none"],
        edit=lambda data: data.update(limits={"max_sessions": "many"}),
    )
    outcome = sighup_and_wait(server)
    assert outcome["msg"] == "reload_failed"
    assert "limits.max_sessions: expected an integer" in outcome["reason"]

    with StreamingPop3(server.port("none")) as client:
        client.login(USER, PASSWORD)
        assert client.command("STAT").startswith(b"+OK")
        client.command("QUIT")
    assert PASSWORD not in server.log_text()


def test_sighup_lets_a_new_user_log_in_while_a_running_session_carries_on(
    start: StartServer, maildir: Path, corpus: Corpus, tls_files: TlsFiles, tmp_path: Path
) -> None:
    alice = User(USER, PASSWORD, maildir)
    bob = User(BOB, BOB_PASSWORD, corpus.copy_to(tmp_path / "bob-Maildir"))
    server = start(users=[alice], listeners=["none"])
    with StreamingPop3(server.port("none")) as before:
        before.login(USER, PASSWORD)
        with StreamingPop3(server.port("none")) as refused, pytest.raises(Pop3Error):
            refused.login(BOB, BOB_PASSWORD)

        rewrite_config(server, [alice, bob], tls_files, listeners=["none"])
        outcome = sighup_and_wait(server)
        assert outcome["msg"] == "reloaded", outcome
        assert (outcome["changed"], outcome["users_added"]) == ("users", "1")

        with StreamingPop3(server.port("none")) as new_user:
            new_user.login(BOB, BOB_PASSWORD)
            assert new_user.command("STAT").startswith(f"+OK {len(corpus.messages)} ".encode())
            new_user.command("QUIT")

        # The session that logged in before the reload goes on as if nothing happened.
        assert before.command("STAT").startswith(f"+OK {len(corpus.messages)} ".encode())
        retr_matches_corpus(before, corpus)
        assert before.command("QUIT").startswith(b"+OK")
    assert not server.records("restart_required")


def test_a_changed_listener_port_is_logged_as_restart_required_and_the_old_port_serves(
    start: StartServer, maildir: Path, tls_files: TlsFiles
) -> None:
    alice = User(USER, PASSWORD, maildir)
    server = start(users=[alice], listeners=["none"])
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind((LOOPBACK, 0))
        unused_port = probe.getsockname()[1]

    def new_port(data: dict[str, object]) -> None:
        listen = data["listen"]
        assert isinstance(listen, list)
        listen[0]["port"] = unused_port

    rewrite_config(server, [alice], tls_files, listeners=["none"], edit=new_port)
    outcome = sighup_and_wait(server)
    assert outcome["msg"] == "reloaded", outcome
    assert [r["keys"] for r in server.records("restart_required")] == ["listen[0].port"]

    with StreamingPop3(server.port("none")) as client:
        client.login(USER, PASSWORD)
        client.command("QUIT")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, unused_port), timeout=SOCKET_TIMEOUT_SECONDS).close()


def test_a_certificate_replaced_on_disk_is_served_to_new_tls_connections_after_sighup(
    start: StartServer, maildir: Path, tls_files: TlsFiles, tmp_path: Path
) -> None:
    alice = User(USER, PASSWORD, maildir)
    server = start(users=[alice], listeners=["implicit", "starttls"])
    old_der = leaf_der(tls_files)
    assert served_der(server.port("implicit"), tls_files.client_context()) == old_der

    with StreamingPop3(server.port("implicit"), tls=tls_files.client_context()) as before:
        before.login(USER, PASSWORD)
        renewed = make_tls_files(tmp_path / "renewed")  # another CA, another certificate
        for src, dest in (
            (renewed.server_key, tls_files.server_key),
            (renewed.server_cert, tls_files.server_cert),
        ):
            os.replace(src, dest)  # the config file does not change
        new_der = leaf_der(tls_files)
        assert new_der != old_der

        outcome = sighup_and_wait(server)
        assert outcome["msg"] == "reloaded", outcome
        assert (outcome["changed"], outcome["tls"]) == ("none", "changed")

        context = ssl.create_default_context(cafile=str(renewed.ca_cert))
        served = served_der(server.port("implicit"), context)
        assert hashlib.sha256(served).hexdigest() == hashlib.sha256(new_der).hexdigest()
        assert served_der(server.port("starttls"), context, stls=True) == new_der

        assert before.command("STAT").startswith(b"+OK")
        assert before.command("QUIT").startswith(b"+OK")


def test_systemd_hears_ready_reloading_and_stopping(
    start: StartServer, maildir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(NOTIFY_DEADLINE_SECONDS)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        server = start(users=[User(USER, PASSWORD, maildir)], listeners=["none"])

        def next_message() -> list[str]:
            return notify.recv(MAX_DATAGRAM_BYTES).decode().split("\n")

        assert next_message()[0] == "READY=1"
        assert sighup_and_wait(server)["msg"] == "reloaded"
        reloading = next_message()
        assert reloading[:1] == ["RELOADING=1"]
        assert reloading[1].startswith("MONOTONIC_USEC=")
        assert next_message()[0] == "READY=1"
        assert server.stop() == 0
        assert next_message()[0] == "STOPPING=1"
