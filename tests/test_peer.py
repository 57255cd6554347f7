"""PeerAddress: the client's address as a value (logs print it, limits key on it)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from popproxy import peer as peer_module
from popproxy.peer import UNKNOWN_PEER, IPAddress, PeerAddress, socket_peer


def test_str_brackets_an_ipv6_host() -> None:
    assert str(PeerAddress("192.0.2.7", 110)) == "192.0.2.7:110"
    assert str(PeerAddress("2001:db8::1", 995)) == "[2001:db8::1]:995"
    assert str(UNKNOWN_PEER) == "-"


def test_of_writes_the_compressed_form() -> None:
    address = ipaddress.ip_address("2001:0db8:0000:0000:0000:0000:0000:0001")
    assert PeerAddress.of(address, 1) == PeerAddress("2001:db8::1", 1)


def test_ip_parses_the_host_and_drops_a_scope() -> None:
    assert PeerAddress("fe80::1%lo", 1).ip == ipaddress.IPv6Address("fe80::1")
    assert PeerAddress("192.0.2.7", 1).ip == ipaddress.IPv4Address("192.0.2.7")
    assert UNKNOWN_PEER.ip is None
    assert not UNKNOWN_PEER.known
    assert PeerAddress("192.0.2.7", 1).known


def test_socket_peer_reads_ipv4_and_ipv6_getpeername_tuples() -> None:
    assert socket_peer(("127.0.0.1", 4000)) == PeerAddress("127.0.0.1", 4000)
    assert socket_peer(("::1", 4000, 0, 0)) == PeerAddress("::1", 4000)
    assert socket_peer("/run/popproxy.sock") is UNKNOWN_PEER
    assert socket_peer(()) is UNKNOWN_PEER


def test_an_ipv4_mapped_address_is_its_ipv4_address() -> None:
    """A dual-stack listener or a proxy on :: sees IPv4 clients as ::ffff:a.b.c.d."""
    assert socket_peer(("::ffff:192.0.2.7", 5, 0, 0)) == PeerAddress("192.0.2.7", 5)
    assert PeerAddress.of(ipaddress.ip_address("::ffff:c000:207"), 5) == PeerAddress("192.0.2.7", 5)


def test_socket_peer_keeps_a_scope_and_a_host_that_is_not_an_address() -> None:
    assert socket_peer(("fe80::1%lo", 5, 0, 1)) == PeerAddress("fe80::1%lo", 5)
    assert socket_peer(("localhost", 5)) == PeerAddress("localhost", 5)


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535))
def test_the_remembered_forms_are_those_parsing_gives(address: IPAddress, port: int) -> None:
    """``socket_peer`` and ``limit_key`` remember what they parsed per host; what they
    give is what parsing the host again gives."""
    host = str(address)
    expected = PeerAddress.of(address, port)
    assert socket_peer((host, port)) == socket_peer((host, port)) == expected
    ip = expected.ip
    assert ip is not None
    network = ipaddress.ip_network((ip, 64 if ip.version == 6 else 32), strict=False)
    key = str(network) if ip.version == 6 else str(ip)
    assert expected.limit_key == PeerAddress(expected.host, port + 1).limit_key == key


def test_a_hosts_forms_are_parsed_once() -> None:
    peer_module._canonical_host.cache_clear()
    peer_module._limit_key.cache_clear()
    for port in range(1, 5):
        assert socket_peer(("198.51.100.23", port)).limit_key == "198.51.100.23"
    assert peer_module._canonical_host.cache_info().misses == 1
    assert peer_module._limit_key.cache_info().misses == 1
