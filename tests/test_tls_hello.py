"""The ALPN offer read from a ClientHello (ALPACA, RFC 7301): real ClientHellos from
Python's ssl module, whole and octet by octet, split over records; random octets give
a verdict and never an exception."""

from __future__ import annotations

import functools
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.tls_hello import (
    MAX_CLIENT_HELLO_BYTES,
    MAX_CLIENT_HELLO_RECORDS,
    RECORD_HEADER_BYTES,
    HelloVerdict,
    judge,
    read_client_hello,
)


def client_hello(alpn: list[str] | None, version: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of a Python ssl client offering ``alpn`` (None: no extension)."""
    return _client_hello(None if alpn is None else tuple(alpn), version)


@functools.cache
def _client_hello(alpn: tuple[str, ...] | None, version: ssl.TLSVersion | None) -> bytes:
    # Cached: a context loads the system CA store, too slow to build per example.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if version is not None:
        context.maximum_version = version
    if alpn is not None:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def split_records(flight: bytes, pieces: int) -> bytes:
    """The same handshake message cut into ``pieces`` records."""
    assert flight[0] == 22
    version = flight[1:3]
    message = flight[RECORD_HEADER_BYTES:]
    size = -(-len(message) // pieces)
    out = b""
    for at in range(0, len(message), size):
        chunk = message[at : at + size]
        out += bytes([22]) + version + len(chunk).to_bytes(2, "big") + chunk
    return out


CASES = [
    (None, HelloVerdict.ACCEPT, None),
    (["pop3"], HelloVerdict.ACCEPT, (b"pop3",)),
    (["http/1.1", "pop3"], HelloVerdict.ACCEPT, (b"http/1.1", b"pop3")),
    (["http/1.1"], HelloVerdict.REFUSE, (b"http/1.1",)),
    (["h2", "http/1.1"], HelloVerdict.REFUSE, (b"h2", b"http/1.1")),
    (["imap"], HelloVerdict.REFUSE, (b"imap",)),
]


@pytest.mark.parametrize(("alpn", "verdict", "offered"), CASES)
@pytest.mark.parametrize("version", [None, ssl.TLSVersion.TLSv1_2])
def test_a_real_client_hello_whole(
    alpn: list[str] | None,
    verdict: HelloVerdict,
    offered: tuple[bytes, ...] | None,
    version: ssl.TLSVersion | None,
) -> None:
    hello = read_client_hello(client_hello(alpn, version))
    assert (hello.verdict, hello.offered) == (verdict, offered)


@pytest.mark.parametrize(("alpn", "verdict", "offered"), CASES)
def test_octet_by_octet_it_is_pending_until_the_last_octet(
    alpn: list[str] | None, verdict: HelloVerdict, offered: tuple[bytes, ...] | None
) -> None:
    flight = client_hello(alpn)
    for n in range(len(flight)):
        pending = read_client_hello(flight[:n])
        assert pending.verdict is HelloVerdict.PENDING, n
        assert n < pending.need <= len(flight)
    assert read_client_hello(flight).verdict is verdict


@pytest.mark.parametrize("pieces", [2, 3, MAX_CLIENT_HELLO_RECORDS])
def test_a_client_hello_split_over_records(pieces: int) -> None:
    flight = split_records(client_hello(["http/1.1"]), pieces)
    assert read_client_hello(flight).verdict is HelloVerdict.REFUSE
    flight = split_records(client_hello(["pop3"]), pieces)
    assert read_client_hello(flight).verdict is HelloVerdict.ACCEPT


def test_more_records_than_the_limit_are_refused() -> None:
    flight = split_records(client_hello(["pop3"]), MAX_CLIENT_HELLO_RECORDS + 4)
    assert read_client_hello(flight).verdict is HelloVerdict.REFUSE


def test_a_client_hello_longer_than_the_limit_is_refused_from_its_header() -> None:
    header = bytes([22, 3, 1, 0, 4, 1]) + (MAX_CLIENT_HELLO_BYTES + 1).to_bytes(3, "big")
    assert read_client_hello(header).verdict is HelloVerdict.REFUSE


@pytest.mark.parametrize(
    "flight",
    [
        b"USER alice\r\n",  # plain POP3 on a TLS port
        b"GET / HTTP/1.1\r\n\r\n",
        bytes([22, 3, 1, 0, 0]),  # an empty record
        bytes([22, 3, 1, 0, 8, 2, 0, 0, 4, 0, 0, 0, 0]),  # a ServerHello
        bytes([22, 3, 1, 0, 8, 1, 0, 0, 4, 3, 3, 0, 0]),  # a ClientHello cut short inside
    ],
)
def test_what_is_not_a_readable_client_hello_is_left_to_openssl(flight: bytes) -> None:
    assert read_client_hello(flight).verdict is HelloVerdict.UNREADABLE


def test_judge() -> None:
    assert judge(None).verdict is HelloVerdict.ACCEPT
    assert judge((b"pop3",)).verdict is HelloVerdict.ACCEPT
    assert judge((b"pop3s",)).verdict is HelloVerdict.REFUSE
    assert judge((b"POP3",)).verdict is HelloVerdict.REFUSE  # ids are exact octets


@given(st.binary(max_size=600))
def test_random_octets_give_a_verdict(data: bytes) -> None:
    hello = read_client_hello(data)
    assert isinstance(hello.verdict, HelloVerdict)


@given(st.integers(min_value=0, max_value=4096), st.binary(min_size=1, max_size=64))
def test_a_real_client_hello_with_octets_changed_gives_a_verdict(at: int, junk: bytes) -> None:
    flight = bytearray(client_hello(["http/1.1", "pop3"]))
    at %= len(flight)
    flight[at : at + len(junk)] = junk
    hello = read_client_hello(bytes(flight))
    assert isinstance(hello.verdict, HelloVerdict)
