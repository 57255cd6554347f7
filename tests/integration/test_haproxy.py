"""A real HAProxy in TCP mode in front of popproxy, sending PROXY protocol headers.

HAProxy (haproxy.py: Debian's `haproxy` on sockets this test binds) forwards to a
popproxy listener with `proxy_protocol: true`: one server line with `send-proxy` (v1),
one with `send-proxy-v2` and health checks (`check-send-proxy`, v2 LOCAL, then
waiting for popproxy's +OK greeting). Python's
poplib logs in through each from 127.0.0.2, so the client's address differs from
HAProxy's own (127.0.0.1), and popproxy's session_end line must name the client.
"""

from __future__ import annotations

import poplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .haproxy import HAProxy
from .harness import (
    LOOPBACK,
    PASSWORD,
    SOCKET_TIMEOUT_SECONDS,
    USER,
    ServerProcess,
    TlsFiles,
    User,
    write_config,
)

# The client's source address: on the loopback network, but not HAProxy's (127.0.0.1).
CLIENT_ADDRESS = "127.0.0.2"
# HAProxy's health checks in the v2 backend (each a PROXY v2 LOCAL header, then a close).
CHECK_INTERVAL_MS = 200
# How long to wait for HAProxy's first health check to reach popproxy.
CHECK_WAIT_SECONDS = 10.0

HAPROXY_CONFIG = """\
global
    maxconn 64

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend v1
    bind fd@{v1_fd}
    default_backend popproxy_v1

frontend v2
    bind fd@{v2_fd}
    default_backend popproxy_v2

backend popproxy_v1
    server popproxy {address}:{port} send-proxy

backend popproxy_v2
    option tcp-check
    tcp-check expect string +OK
    server popproxy {address}:{port} send-proxy-v2 check check-send-proxy inter {interval}
"""


class SourcedPop3(poplib.POP3):
    """poplib from a chosen source address (poplib itself always lets the OS choose)."""

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(CLIENT_ADDRESS, 0)
        )


def proxied_server(start_dir: Path, tls: TlsFiles, maildir: Path, trusted: str) -> ServerProcess:
    """popproxy with one plain listener that takes PROXY headers from ``trusted``."""
    config = write_config(
        start_dir / "popproxy.yaml",
        users=[User(USER, PASSWORD, maildir)],
        tls=tls,
        listeners=["none"],
    )
    data: dict[str, Any] = yaml.safe_load(config.read_text())
    data["listen"][0]["proxy_protocol"] = True
    data["trusted_proxies"] = [trusted]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    server = ServerProcess(config, listeners=["none"], cwd=start_dir)
    server.wait_ready()
    return server


@pytest.fixture
def popproxy(tmp_path: Path, tls_files: TlsFiles, maildir: Path) -> Iterator[ServerProcess]:
    workdir = tmp_path / "popproxy"
    workdir.mkdir()
    server = proxied_server(workdir, tls_files, maildir, trusted="127.0.0.1/32")
    yield server
    assert server.stop() == 0, server.log_text()


@pytest.fixture
def haproxy(tmp_path: Path, popproxy: ServerProcess) -> Iterator[HAProxy]:
    proxy = HAProxy(
        tmp_path,
        HAPROXY_CONFIG,
        ("v1", "v2"),
        port=popproxy.port("none"),
        interval=CHECK_INTERVAL_MS,
    )
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_login_through_haproxy_is_logged_with_the_client_address(
    popproxy: ServerProcess, haproxy: HAProxy, version: str
) -> None:
    pop = SourcedPop3(LOOPBACK, haproxy.port(version), timeout=SOCKET_TIMEOUT_SECONDS)
    try:
        client_port = pop.sock.getsockname()[1]
        assert pop.getwelcome().startswith(b"+OK popproxy ready.")
        pop.user(USER)
        pop.pass_(PASSWORD)
        count, _ = pop.stat()
        assert count > 0
        assert pop.quit().startswith(b"+OK")
    finally:
        pop.close()
    peer = f"{CLIENT_ADDRESS}:{client_port}"
    popproxy.wait_for_log(
        lambda records: any(
            r.get("msg") == "session_end" and r.get("peer") == peer for r in records
        ),
        timeout=SOCKET_TIMEOUT_SECONDS,
        what=f"session_end with peer={peer}",
    )
    [end] = [r for r in popproxy.records("session_end") if r.get("peer") == peer]
    assert end["user"] == USER
    assert end["result"] == "quit"
    assert not popproxy.records("proxy_header_invalid"), popproxy.log_text()


def test_haproxy_health_checks_keep_haproxy_address(
    popproxy: ServerProcess, haproxy: HAProxy
) -> None:
    """A v2 health check is a LOCAL header: the session is HAProxy's own, from 127.0.0.1."""
    popproxy.wait_for_log(
        lambda records: any(
            r.get("msg") == "session_end" and r.get("peer", "").startswith(LOOPBACK + ":")
            for r in records
        ),
        timeout=CHECK_WAIT_SECONDS,
        what="a session_end of a health check",
    )
    assert not popproxy.records("proxy_header_invalid"), popproxy.log_text()
    assert not popproxy.records("proxy_untrusted"), popproxy.log_text()


def test_a_direct_connection_from_an_untrusted_source_is_closed(
    popproxy: ServerProcess,
) -> None:
    """The trusted list is 127.0.0.1/32; 127.0.0.2 may not name a client, even with a
    well-formed header (proxy-protocol.txt §2; Dovecot's haproxy_trusted_networks)."""
    with socket.create_connection(
        (LOOPBACK, popproxy.port("none")),
        SOCKET_TIMEOUT_SECONDS,
        source_address=(CLIENT_ADDRESS, 0),
    ) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 110\r\n")
        deadline = time.monotonic() + SOCKET_TIMEOUT_SECONDS
        received = b""
        while time.monotonic() < deadline:  # bounded by the deadline and by EOF
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    assert received == b""  # not even a greeting
    popproxy.wait_for_log(
        lambda records: any(r.get("msg") == "proxy_untrusted" for r in records),
        timeout=SOCKET_TIMEOUT_SECONDS,
        what="msg=proxy_untrusted",
    )
    [record] = popproxy.records("proxy_untrusted")
    assert record["proxy"].startswith(CLIENT_ADDRESS + ":")
    assert not popproxy.records("session_end")
