"""The ALPN offer read from a ClientHello (ALPACA, RFC 7301): real ClientHellos from
Python's ssl module, whole and octet by octet, split over records; random octets give
a verdict and never an exception; the parser by offsets agrees with a field-by-field
reading on real bodies altered at random."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.tls_hello import (
    EXTENSION_ALPN,
    HANDSHAKE_HEADER_BYTES,
    MAX_CLIENT_HELLO_BYTES,
    MAX_CLIENT_HELLO_RECORDS,
    RECORD_HEADER_BYTES,
    HelloVerdict,
    _alpn_offered,
    _Malformed,
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


class _Reference:
    """The ClientHello body read field by field, as RFC 8446 §4.1.2 and RFC 7301 §3.1
    lay it out: the model ``_alpn_offered`` (read by offsets, for speed) must agree with."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise _Malformed
        self.at += n
        return self.data[self.at - n : self.at]

    def vector(self, length_bytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(length_bytes), "big"))

    @property
    def done(self) -> bool:
        return self.at == len(self.data)


def reference_alpn_offered(hello: bytes) -> tuple[bytes, ...] | None:
    reader = _Reference(hello)
    reader.take(2 + 32)
    for length_bytes in (1, 2, 1):  # session id, cipher suites, compression methods
        reader.vector(length_bytes)
    if reader.done:
        return None
    extensions = _Reference(reader.vector(2))
    found: tuple[bytes, ...] | None = None
    while not extensions.done:
        kind = int.from_bytes(extensions.take(2), "big")
        body = extensions.vector(2)
        if kind != EXTENSION_ALPN:
            continue
        if found is not None:
            raise _Malformed
        names = _Reference(body)
        protocols = _Reference(names.vector(2))
        if not names.done:
            raise _Malformed
        listed = []
        while not protocols.done:
            name = protocols.vector(1)
            if not name:
                raise _Malformed
            listed.append(name)
        if not listed:
            raise _Malformed
        found = tuple(listed)
    return found


def outcome(parse: Callable[[bytes], tuple[bytes, ...] | None], hello: bytes) -> object:
    try:
        return parse(hello)
    except _Malformed:
        return _Malformed


def hello_body(alpn: list[str] | None) -> bytes:
    """The ClientHello body of a real first flight (one record, one message)."""
    flight = client_hello(alpn)
    return flight[RECORD_HEADER_BYTES + HANDSHAKE_HEADER_BYTES :]


@given(
    st.sampled_from([None, ["pop3"], ["http/1.1", "pop3"], ["h2"]]),
    st.integers(min_value=0, max_value=4096),
    st.binary(max_size=8),
    st.integers(min_value=0, max_value=8),
)
def test_alpn_offered_agrees_with_the_field_by_field_reading(
    alpn: list[str] | None, at: int, junk: bytes, cut: int
) -> None:
    """Real bodies with octets replaced, inserted or cut (lengths that overrun, vectors
    that end early, a duplicate extension): the same names, or malformed alike."""
    body = bytearray(hello_body(alpn))
    at %= len(body) + 1
    body[at : at + cut] = junk
    assert outcome(_alpn_offered, bytes(body)) == outcome(reference_alpn_offered, bytes(body))


def test_alpn_offered_reads_the_real_bodies() -> None:
    for alpn, _, offered in CASES:
        assert (
            _alpn_offered(hello_body(alpn)) == offered == reference_alpn_offered(hello_body(alpn))
        )


def body_with(extensions: bytes) -> bytes:
    """A minimal ClientHello body: no session id, one cipher suite, null compression."""
    fixed = bytes(2 + 32) + bytes([0]) + bytes([0, 2, 0x13, 0x01]) + bytes([1, 0])
    return fixed + len(extensions).to_bytes(2, "big") + extensions


def test_one_alpn_extension_is_read_and_a_second_is_malformed() -> None:
    names = bytes([4]) + b"pop3"
    alpn = EXTENSION_ALPN.to_bytes(2, "big") + (2 + len(names)).to_bytes(2, "big")
    alpn += len(names).to_bytes(2, "big") + names
    assert _alpn_offered(body_with(alpn)) == (b"pop3",)
    assert outcome(_alpn_offered, body_with(alpn + alpn)) is _Malformed
    assert outcome(reference_alpn_offered, body_with(alpn + alpn)) is _Malformed
