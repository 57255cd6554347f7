"""The upstream connection to the real Dovecot, by IP literal and by host name (issue 15).

An upstream configured as an IP address gets one socket and one connect; a host name
goes through trio's resolution (popproxy/maildrop/tcp.py). Each way logs in to Dovecot
on each of its listener kinds, takes the listing and quits, in this process.
"""

from __future__ import annotations

import socket

import pytest
import trio

from popproxy.config import TlsMode, UpstreamConfig
from popproxy.maildrop.tcp import literal_family
from popproxy.maildrop.upstream_login import UpstreamAccount, open_connection
from popproxy.secret import Secret
from popproxy.tls import client_context

from .dovecot import DovecotServer, DovecotUser
from .harness import SOCKET_TIMEOUT_SECONDS

TLS_MODES = {"none": TlsMode.NONE, "starttls": TlsMode.STARTTLS, "implicit": TlsMode.IMPLICIT}
# (listener kind, by address or by name): the plain listener without STLS is on 127.0.0.2,
# which has no name; the others are on 127.0.0.1, "localhost".
CASES = [
    ("none", "address"),
    ("starttls", "address"),
    ("starttls", "name"),
    ("implicit", "address"),
    ("implicit", "name"),
]


@pytest.mark.parametrize(("leg", "by"), CASES)
async def test_an_address_and_a_host_name_both_reach_dovecot(
    dovecot: DovecotServer, account: DovecotUser, leg: str, by: str
) -> None:
    address, port = dovecot.endpoint(leg)
    host = "localhost" if by == "name" else address
    assert (literal_family(host) == socket.AF_INET) == (by == "address")
    upstream = UpstreamConfig(
        name="dovecot",
        host=host,
        port=port,
        tls=TLS_MODES[leg],
        ca_file=dovecot.ca_file if leg != "none" else None,
        connect_timeout_seconds=SOCKET_TIMEOUT_SECONDS,
        login_timeout_seconds=SOCKET_TIMEOUT_SECONDS,
        command_timeout_seconds=SOCKET_TIMEOUT_SECONDS,
    )
    login = UpstreamAccount(upstream, account.name, Secret.from_str(account.password)).login()
    with trio.fail_after(SOCKET_TIMEOUT_SECONDS):
        connection, listing = await open_connection(
            upstream, login, tls_context=client_context(upstream)
        )
        await connection.commit([])
    assert len(listing) == account.count()
