"""The PROXY protocol reader (HAProxy's proxy-protocol.txt): every case whole and
byte by byte, round trips from random addresses, and a fuzz target."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from popproxy.peer import IPAddress, PeerAddress
from popproxy.pop3.events import NEED_DATA
from popproxy.proxy_protocol import (
    MAX_V1_LINE_BYTES,
    MAX_V2_PAYLOAD_BYTES,
    V2_SIGNATURE,
    HeaderKind,
    ProxyHeader,
    ProxyHeaderReader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
)

MODES = pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "bytewise"])
# A TLS ClientHello's first octets: what follows the header on an implicit TLS listener.
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def feed(data: bytes, *, byte_by_byte: bool) -> tuple[ProxyHeader, bytes]:
    """Parse ``data`` (whole, or one octet at a time); the header and the octets after it."""
    reader = ProxyHeaderReader()
    step = 1 if byte_by_byte else max(len(data), 1)
    for position in range(0, len(data), step):
        reader.receive_data(data[position : position + step])
        event = reader.next_event()
        if event is not NEED_DATA:
            assert isinstance(event, ProxyHeader)
            return event, reader.trailing_data + data[position + step :]
    pytest.fail("no header")


def rejects(data: bytes, *, byte_by_byte: bool) -> str:
    """Feed ``data`` then EOF; the error message (the test fails if none is raised)."""
    reader = ProxyHeaderReader()
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    with pytest.raises(ProxyProtocolError) as caught:
        for chunk in [*chunks, b""]:
            reader.receive_data(chunk)
            assert reader.next_event() is NEED_DATA
    return str(caught.value)


def peer(host: str, port: int) -> PeerAddress:
    return PeerAddress(host, port)


# -- version 1 ---------------------------------------------------------------------

V1_VALID = [
    pytest.param(
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyHeader(1, HeaderKind.PROXIED, peer("192.168.0.1", 56324), peer("192.168.0.11", 443)),
        id="tcp4",
    ),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n",
        ProxyHeader(1, HeaderKind.PROXIED, peer("255.255.255.255", 65535), peer("0.0.0.0", 0)),
        id="tcp4-extremes",
    ),
    pytest.param(
        b"PROXY TCP6 2001:DB8::1 2001:db8:0:0:0:0:0:2 40000 995\r\n",
        ProxyHeader(1, HeaderKind.PROXIED, peer("2001:db8::1", 40000), peer("2001:db8::2", 995)),
        id="tcp6",
    ),
    pytest.param(
        b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:192.0.2.1 1 110\r\n",
        ProxyHeader(1, HeaderKind.PROXIED, peer("192.0.2.7", 1), peer("192.0.2.1", 110)),
        id="tcp6-ipv4-mapped",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", ProxyHeader(1, HeaderKind.UNKNOWN), id="unknown"),
    pytest.param(
        b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
        ProxyHeader(1, HeaderKind.UNKNOWN),
        id="unknown-longest",
    ),
    pytest.param(b"PROXY UNKNOWN whatever \x7f\r\n", ProxyHeader(1, HeaderKind.UNKNOWN), id="unk"),
]


@MODES
@pytest.mark.parametrize(("line", "expected"), V1_VALID)
def test_v1_headers(line: bytes, expected: ProxyHeader, byte_by_byte: bool) -> None:
    assert len(line) <= MAX_V1_LINE_BYTES
    assert feed(line, byte_by_byte=byte_by_byte) == (expected, b"")
    after = b"USER alice\r\nPASS secret\r\n"
    assert feed(line + after, byte_by_byte=byte_by_byte) == (expected, after)
    assert feed(line + CLIENT_HELLO, byte_by_byte=byte_by_byte) == (expected, CLIENT_HELLO)


def test_the_longest_v1_line_is_107_octets() -> None:
    longest = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(longest) == MAX_V1_LINE_BYTES == 107


V1_INVALID = [
    pytest.param(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="lower-case"),
    pytest.param(b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="two-spaces"),
    pytest.param(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", id="two-spaces-later"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", id="trailing-space"),
    pytest.param(b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n", id="tab"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", id="four-fields"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", id="six-fields"),
    pytest.param(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", id="tcp5"),
    pytest.param(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", id="udp4"),
    pytest.param(b"PROXY UNKNOWNX\r\n", id="unknown-glued"),
    pytest.param(b"PROXY \r\n", id="empty"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", id="octal-looking-octet"),
    pytest.param(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", id="octet-over-255"),
    pytest.param(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", id="three-octets"),
    pytest.param(b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", id="five-octets"),
    pytest.param(b"PROXY TCP4 0x1.2.3.4 5.6.7.8 1 2\r\n", id="hex-octet"),
    pytest.param(b"PROXY TCP4 \xd9\xa1.2.3.4 5.6.7.8 1 2\r\n", id="arabic-digit"),
    pytest.param(b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", id="tcp4-with-ipv6"),
    pytest.param(b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n", id="tcp6-with-ipv4"),
    pytest.param(b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", id="tcp6-with-two-ipv4"),
    pytest.param(b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n", id="zone-index"),
    pytest.param(b"PROXY TCP6 1:::2 ::1 1 2\r\n", id="triple-colon"),
    pytest.param(b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", id="nine-groups"),
    pytest.param(b"PROXY TCP6 12345::1 ::1 1 2\r\n", id="five-digit-group"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", id="port-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", id="port-over-65535"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", id="negative-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", id="plus-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", id="bare-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", id="cr-cr-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", id="lone-cr"),
    pytest.param(b"PROXY UNKNOWN a\nb\r\n", id="unknown-lone-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", id="no-crlf-then-eof"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", id="108-octets"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 200, id="no-crlf-in-107"),
    pytest.param(b"PROX", id="eof-in-signature"),
    pytest.param(b"", id="eof-at-once"),
    pytest.param(b"USER alice\r\n", id="pop3-without-header"),
    pytest.param(CLIENT_HELLO, id="tls-without-header"),
]


@MODES
@pytest.mark.parametrize("data", V1_INVALID)
def test_v1_invalid_headers_are_refused(data: bytes, byte_by_byte: bool) -> None:
    assert rejects(data, byte_by_byte=byte_by_byte)


@pytest.mark.parametrize(
    ("data", "octets"),
    [
        (b"USER alice\r\n", 1),  # the first octet can start no header
        (b"PROXX", 5),
        (b"PROXY TCP4 1.2.3.4\n", 19),  # a lone LF: refused when it arrives
        (b"PROXY TCP4 1.2.3.4\rX", 20),  # a CR followed by anything but LF
    ],
)
def test_a_doomed_header_is_refused_as_soon_as_the_octet_arrives(data: bytes, octets: int) -> None:
    """§2.1: abort as soon as possible, so that the sender notices."""
    reader = ProxyHeaderReader()
    for index in range(len(data)):
        reader.receive_data(data[index : index + 1])
        if index + 1 < octets:
            assert reader.next_event() is NEED_DATA
        else:
            with pytest.raises(ProxyProtocolError):
                reader.next_event()
            return
    pytest.fail("not refused")


def test_v1_waits_without_a_limit_below_107_octets() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(b"PROXY UNKNOWN " + b"x" * (MAX_V1_LINE_BYTES - 15))
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"x")
    with pytest.raises(ProxyProtocolError, match="107"):
        reader.next_event()


# -- version 2 ---------------------------------------------------------------------

# HAProxy's send-proxy-v2 for a TCP connection from 172.19.0.1:42578 to 172.19.0.3:80.
HAPROXY_V2_TCP4 = bytes.fromhex("0d0a0d0a000d0a515549540a 2111000c ac130001 ac130003 a652 0050")
IPV6_BLOCK = (
    ipaddress.IPv6Address("2001:db8::1").packed
    + ipaddress.IPv6Address("2001:db8::2").packed
    + (40000).to_bytes(2, "big")
    + (995).to_bytes(2, "big")
)


def v2(command: int, family: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + len(block).to_bytes(2, "big") + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


TCP4 = ProxyHeader(2, HeaderKind.PROXIED, peer("172.19.0.1", 42578), peer("172.19.0.3", 80))
TCP6 = ProxyHeader(2, HeaderKind.PROXIED, peer("2001:db8::1", 40000), peer("2001:db8::2", 995))
V2_VALID = [
    pytest.param(HAPROXY_V2_TCP4, TCP4, id="haproxy-tcp4"),
    pytest.param(v2(1, 0x21, IPV6_BLOCK), TCP6, id="tcp6"),
    pytest.param(
        v2(1, 0x11, HAPROXY_V2_TCP4[16:] + tlv(0x01, b"pop3") + tlv(0x04, b"") + tlv(0x05, b"i")),
        TCP4,
        id="tcp4-tlvs",
    ),
    pytest.param(
        v2(1, 0x21, IPV6_BLOCK + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))),
        TCP6,
        id="tcp6-ssl-tlv",
    ),
    pytest.param(v2(0, 0x00, b""), ProxyHeader(2, HeaderKind.LOCAL), id="local"),
    pytest.param(v2(0, 0x11, HAPROXY_V2_TCP4[16:]), ProxyHeader(2, HeaderKind.LOCAL), id="local+"),
    pytest.param(v2(0, 0x21, b"\xff" * 7), ProxyHeader(2, HeaderKind.LOCAL), id="local-junk"),
    pytest.param(v2(1, 0x00, b""), ProxyHeader(2, HeaderKind.UNKNOWN), id="unspec"),
    pytest.param(v2(1, 0x00, b"\x01\x02"), ProxyHeader(2, HeaderKind.UNKNOWN), id="unspec+"),
    pytest.param(v2(1, 0x12, HAPROXY_V2_TCP4[16:]), ProxyHeader(2, HeaderKind.UNKNOWN), id="udp4"),
    pytest.param(v2(1, 0x22, IPV6_BLOCK), ProxyHeader(2, HeaderKind.UNKNOWN), id="udp6"),
    pytest.param(v2(1, 0x31, b"/a".ljust(216, b"\0")), ProxyHeader(2, HeaderKind.UNKNOWN), id="ux"),
    pytest.param(v2(1, 0x32, bytes(216)), ProxyHeader(2, HeaderKind.UNKNOWN), id="unix-dgram"),
    pytest.param(
        v2(1, 0x11, HAPROXY_V2_TCP4[16:] + tlv(0x04, bytes(MAX_V2_PAYLOAD_BYTES - 15))),
        TCP4,
        id="largest",
    ),
]


@MODES
@pytest.mark.parametrize(("header", "expected"), V2_VALID)
def test_v2_headers(header: bytes, expected: ProxyHeader, byte_by_byte: bool) -> None:
    assert feed(header, byte_by_byte=byte_by_byte) == (expected, b"")
    after = b"CAPA\r\n"
    assert feed(header + after, byte_by_byte=byte_by_byte) == (expected, after)
    assert feed(header + CLIENT_HELLO, byte_by_byte=byte_by_byte) == (expected, CLIENT_HELLO)


V2_INVALID = [
    pytest.param(b"\r\n\r\n\x00\r\nQUIT\r", id="signature-last-octet"),
    pytest.param(b"\r\n\r\n\x01", id="signature-fifth-octet"),
    pytest.param(b"\r\r", id="signature-second-octet"),
    pytest.param(V2_SIGNATURE + b"\x11\x11\x00\x0c" + HAPROXY_V2_TCP4[16:], id="version-1"),
    pytest.param(V2_SIGNATURE + b"\x31\x11\x00\x0c" + HAPROXY_V2_TCP4[16:], id="version-3"),
    pytest.param(V2_SIGNATURE + b"\x22\x11\x00\x0c" + HAPROXY_V2_TCP4[16:], id="command-2"),
    pytest.param(V2_SIGNATURE + b"\x2f\x00\x00\x00", id="command-15"),
    pytest.param(v2(1, 0x13, HAPROXY_V2_TCP4[16:]), id="protocol-3"),
    pytest.param(v2(1, 0x41, HAPROXY_V2_TCP4[16:]), id="family-4"),
    pytest.param(v2(1, 0x10, HAPROXY_V2_TCP4[16:]), id="inet-unspec-protocol"),
    pytest.param(v2(1, 0x01, b""), id="unspec-stream"),
    pytest.param(v2(0, 0x14, b""), id="local-bad-family"),
    pytest.param(v2(1, 0x11, HAPROXY_V2_TCP4[16:27]), id="tcp4-block-short"),
    pytest.param(v2(1, 0x21, IPV6_BLOCK[:35]), id="tcp6-block-short"),
    pytest.param(v2(1, 0x21, HAPROXY_V2_TCP4[16:]), id="tcp6-with-ipv4-block"),
    pytest.param(v2(1, 0x31, bytes(215)), id="unix-block-short"),
    pytest.param(v2(1, 0x11, HAPROXY_V2_TCP4[16:] + b"\x01\x00"), id="tlv-head-cut"),
    pytest.param(v2(1, 0x11, HAPROXY_V2_TCP4[16:] + b"\x01\x00\x05abcd"), id="tlv-overflows"),
    pytest.param(
        V2_SIGNATURE + b"\x21\x11" + (MAX_V2_PAYLOAD_BYTES + 1).to_bytes(2, "big"), id="too-long"
    ),
    pytest.param(V2_SIGNATURE + b"\x21\x11\xff\xff", id="65535"),
    pytest.param(HAPROXY_V2_TCP4[:-1], id="eof-in-block"),
    pytest.param(HAPROXY_V2_TCP4[:15], id="eof-in-length"),
    pytest.param(V2_SIGNATURE[:5], id="eof-in-signature"),
]


@MODES
@pytest.mark.parametrize("data", V2_INVALID)
def test_v2_invalid_headers_are_refused(data: bytes, byte_by_byte: bool) -> None:
    assert rejects(data, byte_by_byte=byte_by_byte)


def test_v2_an_oversized_length_is_refused_before_its_octets_arrive() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(V2_SIGNATURE + b"\x21\x11" + (MAX_V2_PAYLOAD_BYTES + 1).to_bytes(2, "big"))
    with pytest.raises(ProxyProtocolError, match="longer"):
        reader.next_event()


def test_the_header_is_returned_again_and_nothing_is_read_after_it() -> None:
    reader = ProxyHeaderReader()
    assert reader.trailing_data == b""
    reader.receive_data(HAPROXY_V2_TCP4 + b"NOOP\r\n")
    first = reader.next_event()
    reader.receive_data(b"more")
    assert reader.next_event() is first
    assert reader.trailing_data == b"NOOP\r\nmore"


# -- the sender's side, and round trips ----------------------------------------------


def test_encoders_write_what_the_specification_shows() -> None:
    source, destination = peer("172.19.0.1", 42578), peer("172.19.0.3", 80)
    assert encode_v2(source, destination) == HAPROXY_V2_TCP4
    assert encode_v1(source, destination) == b"PROXY TCP4 172.19.0.1 172.19.0.3 42578 80\r\n"
    assert encode_v1(None) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(None) == V2_SIGNATURE + b"\x20\x00\x00\x00"


def test_encoders_refuse_mixed_families_and_names() -> None:
    with pytest.raises(ValueError, match="families"):
        encode_v1(peer("192.0.2.1", 1), peer("::1", 2))
    with pytest.raises(ValueError, match="families"):
        encode_v2(peer("192.0.2.1", 1), peer("::1", 2))
    with pytest.raises(ValueError, match="not an IP"):
        encode_v2(peer("localhost", 1), peer("::1", 2))
    with pytest.raises(ValueError, match="at most"):
        encode_v2(None, tlvs=bytes(MAX_V2_PAYLOAD_BYTES + 1))


ports = st.integers(min_value=0, max_value=65535)
ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
endpoints = st.one_of(
    st.tuples(ipv4, ports, ipv4, ports),
    st.tuples(ipv6, ports, ipv6, ports),
)


@given(
    endpoints,
    st.sampled_from([encode_v1, encode_v2]),
    st.binary(max_size=64),
    st.lists(st.integers(min_value=1, max_value=40), max_size=20),
)
@example(
    (ipaddress.ip_address("::ffff:1.2.3.4"), 1, ipaddress.ip_address("::1"), 2),
    encode_v1,
    b"",
    [],
)
def test_round_trip(
    ends: tuple[IPAddress, int, IPAddress, int],
    encode: Callable[[PeerAddress, PeerAddress], bytes],
    after: bytes,
    cuts: list[int],
) -> None:
    """Any addresses and ports, any split of the octets: the same endpoints come back."""
    source_ip, source_port, destination_ip, destination_port = ends
    data = encode(
        PeerAddress(str(source_ip), source_port), PeerAddress(str(destination_ip), destination_port)
    )
    reader = ProxyHeaderReader()
    position = 0
    event: object = NEED_DATA
    for size in [*cuts, len(data)]:  # bounded: at most 21 chunks, the last one the rest
        if event is not NEED_DATA or position >= len(data + after):
            break
        reader.receive_data((data + after)[position : position + size])
        position += size
        event = reader.next_event()
    assert event == ProxyHeader(
        1 if data.startswith(b"PROXY") else 2,
        HeaderKind.PROXIED,
        PeerAddress.of(source_ip, source_port),
        PeerAddress.of(destination_ip, destination_port),
    )
    assert reader.trailing_data == (data + after)[len(data) : position]


def check_fuzz(data: bytes, cuts: list[int]) -> None:
    reader = ProxyHeaderReader()
    position = 0
    for size in [*cuts, len(data), 0]:  # the final b"" is EOF
        chunk = data[position : position + size]
        position += size
        reader.receive_data(chunk)
        try:
            event = reader.next_event()
        except ProxyProtocolError:
            return
        if event is not NEED_DATA:
            assert isinstance(event, ProxyHeader)
            assert (event.source is not None) == (event.kind is HeaderKind.PROXIED)
            return
    pytest.fail("EOF left the reader waiting")


cut_lists = st.lists(st.integers(min_value=0, max_value=64), max_size=16)


@given(st.binary(max_size=300), cut_lists)
def test_fuzz_random_octets(data: bytes, cuts: list[int]) -> None:
    """Random octets give a header, NEED_DATA or ProxyProtocolError, never another exception."""
    check_fuzz(data, cuts)


@given(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE]),
    st.binary(max_size=300),
    cut_lists,
)
def test_fuzz_after_a_signature(prefix: bytes, data: bytes, cuts: list[int]) -> None:
    """The same with a valid start, so that the fuzzer reaches the field parsers."""
    check_fuzz(prefix + data, cuts)


@given(st.sampled_from([0x20, 0x21]), st.sampled_from([0x00, 0x11, 0x21, 0x31]), st.binary())
def test_fuzz_v2_blocks(command: int, family: int, block: bytes) -> None:
    """Random address blocks and TLVs behind a valid fixed part."""
    header = V2_SIGNATURE + bytes([command, family]) + len(block).to_bytes(2, "big") + block
    check_fuzz(header, [])
