"""The PROXY protocol header, versions 1 and 2, sans-IO (HAProxy's proxy-protocol.txt).

A load balancer in TCP mode (HAProxy ``send-proxy``/``send-proxy-v2``, nginx
``proxy_protocol on;``) puts one header in front of the client's bytes that names
the client's address. ``ProxyHeaderReader`` is fed the first octets of a
connection and yields ``NEED_DATA``, a :class:`ProxyHeader`, or raises
:class:`ProxyProtocolError`; the octets after the header (POP3, or a TLS
handshake on an implicit TLS listener) are in ``trailing_data``.

Strict, as the specification asks (§2.1: "Any sequence which does not exactly
match the protocol must be discarded"): exact signatures, CRLF, single spaces,
dotted quads and ports without leading zeros, addresses of the announced family.
A header that cannot be valid any more is refused as soon as the octet that
breaks it arrives, not when the bound is reached.

The encoders (``encode_v1``, ``encode_v2``) are the sender's side, used by tests
and by tools that speak to a ``proxy_protocol: true`` listener.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from dataclasses import dataclass

from popproxy.peer import IPAddress, PeerAddress
from popproxy.pop3.events import NEED_DATA, NeedData

# §2.1: the version 1 line starts with "PROXY" and exactly one space.
V1_PREFIX = b"PROXY "
# §2.1: the longest version 1 line, CRLF included ("PROXY UNKNOWN" with two
# full-length IPv6 addresses and ports); a line without CRLF by then is invalid.
MAX_V1_LINE_BYTES = 107
# §2.2: the 12-octet signature that starts a version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# §2.2: signature, version and command, family and protocol, a 16-bit length.
V2_FIXED_BYTES = 16
# The address block and TLVs of a version 2 header, at most. §2 designs a header to
# fit one 536-octet segment; this leaves room for the largest block (AF_UNIX, 216
# octets) plus the TLVs HAProxy sends (§2.2.2 authority: a host name, at most 255;
# §2.2.5 unique ID: at most 128; §2.2.6 SSL: version, cipher, algorithms, CN).
MAX_V2_PAYLOAD_BYTES = 2048
# §2.2.5 TLVs: one octet of type and two of length before each value.
V2_TLV_HEAD_BYTES = 3
# The longest header this reader accepts, whichever the version.
MAX_HEADER_BYTES = V2_FIXED_BYTES + MAX_V2_PAYLOAD_BYTES

_V2_VERSION = 0x2
_V2_LOCAL = 0x0
_V2_PROXY = 0x1
# §2.2: the family/protocol octets a sender may emit, and the size of the address
# block each implies (two addresses, then two ports where the family has them).
_V2_ADDRESS_BYTES = {
    0x00: 0,  # UNSPEC
    0x11: 12,  # TCP over IPv4
    0x12: 12,  # UDP over IPv4
    0x21: 36,  # TCP over IPv6
    0x22: 36,  # UDP over IPv6
    0x31: 216,  # UNIX stream
    0x32: 216,  # UNIX datagram
}
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21

# §2.1: four decimal numbers, no heading zeroes (the range 0..255 is checked after).
_V1_IPV4 = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
# §2.1: hexadecimal groups and colons (inet_ntop also writes a trailing dotted quad
# for IPv4-mapped addresses); no zone index.
_V1_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")
# §2.1: a decimal port, no heading zeroes (the range 0..65535 is checked after).
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_MAX_PORT = 65535


class ProxyProtocolError(Exception):
    """The octets are not a valid PROXY protocol header; the connection must be
    dropped without a reply (§2.1). The message says why, for the log."""


class HeaderKind(enum.Enum):
    """What a header says about the connection."""

    PROXIED = "proxied"  # relayed for the client the header names
    LOCAL = "local"  # v2 LOCAL: the proxy's own connection (health checks, §2.2)
    UNKNOWN = "unknown"  # v1 UNKNOWN, or a v2 family/protocol other than TCP (§2.2)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. ``source`` and ``destination`` are set exactly when ``kind``
    is PROXIED; otherwise the connection's own endpoints stand (§2.1, §2.2)."""

    version: int
    kind: HeaderKind
    source: PeerAddress | None = None
    destination: PeerAddress | None = None


class ProxyHeaderReader:
    """Reads one PROXY protocol header, v1 or v2, from the start of a connection."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._closed = False
        self._header: ProxyHeader | None = None
        self._consumed = 0

    def receive_data(self, data: bytes) -> None:
        """Add octets received from the peer; ``b""`` means it closed its side."""
        if data:
            self._buffer += data
        else:
            self._closed = True

    @property
    def trailing_data(self) -> bytes:
        """The octets received after the header (empty until a header is parsed)."""
        if self._header is None:
            return b""
        return bytes(self._buffer[self._consumed :])

    def next_event(self) -> ProxyHeader | NeedData:
        """The header once complete, else ``NEED_DATA``; raises ProxyProtocolError."""
        if self._header is not None:
            return self._header
        parsed = _parse(self._buffer)
        if parsed is NEED_DATA:
            if self._closed:
                raise ProxyProtocolError("the connection closed before the end of the header")
            return NEED_DATA
        self._header, self._consumed = parsed
        return self._header


def _parse(buffer: bytearray) -> tuple[ProxyHeader, int] | NeedData:
    if not buffer:
        return NEED_DATA
    match buffer[0]:
        case 0x50:  # "P"
            return _parse_v1(buffer)
        case 0x0D:  # CR
            return _parse_v2(buffer)
        case _:
            raise ProxyProtocolError("not a PROXY protocol header")


def _check_prefix(buffer: bytearray, expected: bytes, what: str) -> None:
    length = min(len(buffer), len(expected))
    if buffer[:length] != expected[:length]:
        raise ProxyProtocolError(f"not a PROXY protocol header ({what})")


# -- version 1 ---------------------------------------------------------------------


def _parse_v1(buffer: bytearray) -> tuple[ProxyHeader, int] | NeedData:
    """§2.1: ``PROXY TCP4|TCP6 src dst sport dport CRLF`` or ``PROXY UNKNOWN ... CRLF``."""
    _check_prefix(buffer, V1_PREFIX, "version 1 signature")
    end = buffer.find(b"\r\n", 0, MAX_V1_LINE_BYTES)
    if end < 0:
        # §2.1: a lone CR or LF never ends the line, and nothing comes after 107 octets.
        window = buffer[:MAX_V1_LINE_BYTES]
        carriage_return = window.find(b"\r")
        if b"\n" in window or 0 <= carriage_return < len(window) - 1:
            raise ProxyProtocolError("version 1 line with a CR or LF that is not a CRLF")
        if len(buffer) >= MAX_V1_LINE_BYTES:
            raise ProxyProtocolError(f"version 1 line longer than {MAX_V1_LINE_BYTES} octets")
        return NEED_DATA
    line = bytes(buffer[len(V1_PREFIX) : end])
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError("version 1 line with a CR or LF that is not a CRLF")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("version 1 line that is not US-ASCII") from None
    return _v1_header(text), end + 2


def _v1_header(text: str) -> ProxyHeader:
    if text == "UNKNOWN" or text.startswith("UNKNOWN "):
        # §2.1: the receiver must ignore anything after UNKNOWN up to the CRLF.
        return ProxyHeader(1, HeaderKind.UNKNOWN)
    fields = text.split(" ")
    if len(fields) != 5:
        raise ProxyProtocolError("version 1 line without exactly five fields after PROXY")
    protocol, source, destination, source_port, destination_port = fields
    match protocol:
        case "TCP4":
            parse_address = _v1_ipv4
        case "TCP6":
            parse_address = _v1_ipv6
        case _:
            raise ProxyProtocolError("version 1 protocol other than TCP4, TCP6 or UNKNOWN")
    return ProxyHeader(
        1,
        HeaderKind.PROXIED,
        PeerAddress.of(parse_address(source), _v1_port(source_port)),
        PeerAddress.of(parse_address(destination), _v1_port(destination_port)),
    )


def _v1_ipv4(text: str) -> IPAddress:
    if _V1_IPV4.fullmatch(text) is None:
        raise ProxyProtocolError("version 1 TCP4 address that is not a plain dotted quad")
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ProxyProtocolError("version 1 TCP4 address out of range") from None


def _v1_ipv6(text: str) -> IPAddress:
    if _V1_IPV6.fullmatch(text) is None or ":" not in text:
        raise ProxyProtocolError("version 1 TCP6 address that is not an IPv6 address")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError("version 1 TCP6 address that is not an IPv6 address") from None


def _v1_port(text: str) -> int:
    if _V1_PORT.fullmatch(text) is None or int(text) > _MAX_PORT:
        raise ProxyProtocolError("version 1 port that is not a decimal 0..65535")
    return int(text)


# -- version 2 ---------------------------------------------------------------------


def _parse_v2(buffer: bytearray) -> tuple[ProxyHeader, int] | NeedData:
    """§2.2: signature, version and command, family and protocol, length, addresses, TLVs."""
    _check_prefix(buffer, V2_SIGNATURE, "version 2 signature")
    signature = len(V2_SIGNATURE)
    if len(buffer) > signature:
        version, command = buffer[signature] >> 4, buffer[signature] & 0x0F
        if version != _V2_VERSION:
            raise ProxyProtocolError("version 2 signature with a version other than 2")
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyProtocolError("version 2 command other than LOCAL or PROXY")
    if len(buffer) > signature + 1 and buffer[signature + 1] not in _V2_ADDRESS_BYTES:
        raise ProxyProtocolError("version 2 address family or protocol not in the specification")
    if len(buffer) < V2_FIXED_BYTES:
        return NEED_DATA
    length = int.from_bytes(buffer[signature + 2 : V2_FIXED_BYTES], "big")
    if length > MAX_V2_PAYLOAD_BYTES:
        raise ProxyProtocolError(f"version 2 header longer than {MAX_HEADER_BYTES} octets")
    end = V2_FIXED_BYTES + length
    if len(buffer) < end:
        return NEED_DATA
    command, family = buffer[signature] & 0x0F, buffer[signature + 1]
    payload = bytes(buffer[V2_FIXED_BYTES:end])
    if command == _V2_LOCAL:
        # §2.2: use the real endpoints and discard the block, family included.
        return ProxyHeader(2, HeaderKind.LOCAL), end
    return _v2_proxy(family, payload), end


def _v2_proxy(family: int, payload: bytes) -> ProxyHeader:
    address_bytes = _V2_ADDRESS_BYTES[family]
    if family == 0x00:
        # §2.2: UNSPEC carries no address; whatever follows is ignored.
        return ProxyHeader(2, HeaderKind.UNKNOWN)
    if len(payload) < address_bytes:
        raise ProxyProtocolError("version 2 length shorter than its address block")
    _check_tlvs(payload[address_bytes:])
    match family:
        case 0x11:
            size = 4
        case 0x21:
            size = 16
        case _:
            # §2.2: a receiver falls back to UNSPEC for what it does not support
            # (UDP, UNIX sockets): the connection's own endpoints stand.
            return ProxyHeader(2, HeaderKind.UNKNOWN)
    source = ipaddress.ip_address(payload[:size])
    destination = ipaddress.ip_address(payload[size : 2 * size])
    source_port, destination_port = struct.unpack_from("!HH", payload, 2 * size)
    return ProxyHeader(
        2,
        HeaderKind.PROXIED,
        PeerAddress.of(source, source_port),
        PeerAddress.of(destination, destination_port),
    )


def _check_tlvs(block: bytes) -> None:
    """§2.2.5: type, 16-bit length, value, to the end of the header; values are skipped."""
    offset = 0
    while offset < len(block):  # each turn moves at least V2_TLV_HEAD_BYTES ahead
        if len(block) - offset < V2_TLV_HEAD_BYTES:
            raise ProxyProtocolError("version 2 TLV cut short")
        offset += V2_TLV_HEAD_BYTES + int.from_bytes(block[offset + 1 : offset + 3], "big")
        if offset > len(block):
            raise ProxyProtocolError("version 2 TLV longer than the header")


# -- the sender's side --------------------------------------------------------------


def encode_v1(source: PeerAddress | None, destination: PeerAddress | None = None) -> bytes:
    """A version 1 line for a TCP connection from ``source`` to ``destination`` (§2.1);
    ``PROXY UNKNOWN`` when ``source`` is None."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    source_ip, destination_ip = _ip(source), _ip(destination)
    if source_ip.version != destination_ip.version:
        raise ValueError("source and destination of different address families")
    protocol = "TCP4" if source_ip.version == 4 else "TCP6"
    return (
        f"PROXY {protocol} {source_ip} {destination_ip} {source.port} {destination.port}\r\n"
    ).encode("ascii")


def encode_v2(
    source: PeerAddress | None, destination: PeerAddress | None = None, *, tlvs: bytes = b""
) -> bytes:
    """A version 2 header (§2.2): PROXY for TCP from ``source`` to ``destination``, or
    LOCAL when ``source`` is None. ``tlvs`` are appended as given (already framed)."""
    if source is None or destination is None:
        return V2_SIGNATURE + bytes([_V2_VERSION << 4 | _V2_LOCAL, 0x00]) + _length(tlvs) + tlvs
    source_ip, destination_ip = _ip(source), _ip(destination)
    if source_ip.version != destination_ip.version:
        raise ValueError("source and destination of different address families")
    family = _V2_TCP4 if source_ip.version == 4 else _V2_TCP6
    block = (
        source_ip.packed
        + destination_ip.packed
        + struct.pack("!HH", source.port, destination.port)
        + tlvs
    )
    return V2_SIGNATURE + bytes([_V2_VERSION << 4 | _V2_PROXY, family]) + _length(block) + block


def _ip(peer: PeerAddress) -> IPAddress:
    ip = peer.ip
    if ip is None:
        raise ValueError(f"not an IP address: {peer.host!r}")
    return ip


def _length(block: bytes) -> bytes:
    if len(block) > MAX_V2_PAYLOAD_BYTES:
        raise ValueError(f"a version 2 header carries at most {MAX_V2_PAYLOAD_BYTES} octets")
    return len(block).to_bytes(2, "big")
