"""bench/relay.py through bench/peers.py: the Python relay floors carry a real POP3
session to a real Dovecot and back, on every leg they listen on."""

from __future__ import annotations

import poplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration.dovecot import DovecotServer
from integration.harness import TlsFiles, make_tls_files

from bench.peers import RELAY_FLOORS, find, running_peer

CLIENT_TIMEOUT_SECONDS = 30.0


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def dovecot(tls: TlsFiles) -> Iterator[DovecotServer]:
    server = DovecotServer.start(tls)
    yield server
    server.stop()


@pytest.mark.parametrize("name", RELAY_FLOORS)
def test_a_relay_floor_carries_a_pop3_session_on_each_of_its_legs(
    name: str, dovecot: DovecotServer, tls: TlsFiles, tmp_path: Path
) -> None:
    user = dovecot.add_user()
    found = find(name)
    assert found.command is not None  # the harness's own interpreter: always there
    assert found.tls == (name == "trio-relay")
    try:
        with running_peer(found, tmp_path, tls, dovecot.endpoint("none"), []) as peer:
            assert peer.proxy_logins is False  # logins pass through as they are
            assert sorted(peer.ports) == ([False, True] if found.tls else [False])
            for implicit in peer.ports:
                host, port = peer.address(implicit)
                client = (
                    poplib.POP3_SSL(
                        host, port, context=tls.client_context(), timeout=CLIENT_TIMEOUT_SECONDS
                    )
                    if implicit
                    else poplib.POP3(host, port, timeout=CLIENT_TIMEOUT_SECONDS)
                )
                assert client.getwelcome().startswith(b"+OK")
                client.user(user.name)
                client.pass_(user.password)
                assert client.stat() == (0, 0)
                assert client.quit().startswith(b"+OK")
            assert peer.cpu_seconds() > 0
    finally:
        dovecot.remove_user(user)
