"""The ALPN protocols a TLS client offers, read from its ClientHello (RFC 8446 §4.1.2,
RFC 7301 §3.1); pure: bytes in, a verdict out, no I/O.

Python's ssl module says which protocol was selected, never what the client offered:
with no protocol in common, OpenSSL goes on without ALPN (CPython answers
``SSL_TLSEXT_ERR_NOACK``), so a browser sent to the POP3 port by a cross-protocol
attack (ALPACA, alpaca-attack.com) would complete the handshake. The listeners
therefore read the client's first flight as it passes to OpenSSL
(:class:`popproxy.tls.AlpnGuard`) and refuse a ClientHello that offers ALPN values
of which none is ``pop3`` (RFC 7301 §3.2: a fatal ``no_application_protocol`` alert).
A client that offers no ALPN is accepted.

The parser only looks; what it cannot parse (not a TLS handshake, a truncated or
malformed message) it leaves to OpenSSL, which refuses it on its own, with one
exception: a ClientHello longer than ``MAX_CLIENT_HELLO_BYTES``, or cut into more
than ``MAX_CLIENT_HELLO_RECORDS`` records, is refused, so a guard never buffers or
parses more than that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# The ALPN protocol id of POP3 (IANA "TLS Application-Layer Protocol Negotiation (ALPN)
# Protocol IDs" registry, RFC 9325 §3.4 asks servers to use ALPN).
POP3_ALPN = "pop3"

# TLS record and handshake framing (RFC 8446 §5.1, §4).
RECORD_HEADER_BYTES = 5
HANDSHAKE_HEADER_BYTES = 4
CONTENT_TYPE_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_ALPN = 16  # RFC 7301 §3.1
# A real ClientHello is well under 2 KiB (a few KiB with post-quantum key shares) and
# comes in one record (at most 16 KiB each, RFC 8446 §5.1); a longer one, or one cut
# into more records than this, is refused rather than buffered and parsed again and
# again (what a guard holds, and how often it parses, stay bounded).
MAX_CLIENT_HELLO_BYTES = 64 * 1024
MAX_CLIENT_HELLO_RECORDS = 8

# The fatal alert a server sends when no protocol fits (RFC 7301 §3.2): a plaintext
# alert record (TLS 1.2 record version, as before any key exchange), level 2 (fatal),
# description 120 (no_application_protocol).
NO_APPLICATION_PROTOCOL_ALERT = bytes([21, 3, 3, 0, 2, 2, 120])


class HelloVerdict(enum.Enum):
    """What the guard does with a client's first flight."""

    PENDING = "pending"  # not all of the ClientHello seen yet
    ACCEPT = "accept"  # pop3 offered, or no ALPN at all
    REFUSE = "refuse"  # ALPN offered without pop3, or a ClientHello too long to read
    UNREADABLE = "unreadable"  # not a ClientHello we can parse: OpenSSL decides


@dataclass(frozen=True, slots=True)
class Hello:
    """The verdict, and the ALPN values offered (None: no ALPN extension, or not known);
    while pending, ``need``: how many octets in all before parsing again can progress."""

    verdict: HelloVerdict
    offered: tuple[bytes, ...] | None = None
    need: int = 0


REFUSE = Hello(HelloVerdict.REFUSE)
UNREADABLE = Hello(HelloVerdict.UNREADABLE)


class _Malformed(Exception):
    """The handshake message is not a ClientHello this parser can read."""


def read_client_hello(data: bytes) -> Hello:
    """The verdict on ``data``, all the octets a client has sent so far (RFC 8446 §5.1:
    the ClientHello may be split over several handshake records)."""
    message = bytearray()
    offset = 0
    for _ in range(MAX_CLIENT_HELLO_RECORDS):
        if len(data) - offset < RECORD_HEADER_BYTES:
            return Hello(HelloVerdict.PENDING, need=offset + RECORD_HEADER_BYTES)
        content_type = data[offset]
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if content_type != CONTENT_TYPE_HANDSHAKE or data[offset + 1] != 3 or length == 0:
            return UNREADABLE
        body = data[offset + RECORD_HEADER_BYTES : offset + RECORD_HEADER_BYTES + length]
        message += body
        if len(message) >= HANDSHAKE_HEADER_BYTES:
            if message[0] != HANDSHAKE_CLIENT_HELLO:
                return UNREADABLE
            wanted = int.from_bytes(message[1:4], "big")
            if wanted > MAX_CLIENT_HELLO_BYTES:
                return REFUSE
            if len(message) >= HANDSHAKE_HEADER_BYTES + wanted:
                hello = bytes(message[HANDSHAKE_HEADER_BYTES : HANDSHAKE_HEADER_BYTES + wanted])
                try:
                    offered = _alpn_offered(hello)
                except _Malformed:
                    return UNREADABLE
                return judge(offered)
        if len(body) < length:
            return Hello(HelloVerdict.PENDING, need=offset + RECORD_HEADER_BYTES + length)
        offset += RECORD_HEADER_BYTES + length
    return REFUSE


def judge(offered: tuple[bytes, ...] | None) -> Hello:
    """Accept no ALPN, or ALPN that includes ``pop3``; refuse any other offer."""
    if offered is None or POP3_ALPN.encode() in offered:
        return Hello(HelloVerdict.ACCEPT, offered)
    return Hello(HelloVerdict.REFUSE, offered)


def _alpn_offered(hello: bytes) -> tuple[bytes, ...] | None:
    """The ALPN protocol names of a ClientHello body (RFC 8446 §4.1.2), None without
    the extension. Read by offsets, not a reader object: this runs for every TLS client
    (issue 15); what it reads past the end of a vector is malformed."""
    end = len(hello)
    at = 2 + 32  # legacy_version, random
    if at >= end:
        raise _Malformed
    at += 1 + hello[at]  # legacy_session_id<0..32>
    if at + 2 > end:
        raise _Malformed
    at += 2 + (hello[at] << 8 | hello[at + 1])  # cipher_suites<2..2^16-2>
    if at >= end:
        raise _Malformed
    at += 1 + hello[at]  # legacy_compression_methods<1..2^8-1>
    if at > end:
        raise _Malformed
    if at == end:
        return None  # no extensions at all (RFC 5246 §7.4.1.2 allows it)
    if at + 2 > end:
        raise _Malformed
    extensions_end = at + 2 + (hello[at] << 8 | hello[at + 1])
    if extensions_end > end:
        raise _Malformed
    at += 2
    found: tuple[bytes, ...] | None = None
    while at < extensions_end:
        if at + 4 > extensions_end:
            raise _Malformed
        kind = hello[at] << 8 | hello[at + 1]
        body_end = at + 4 + (hello[at + 2] << 8 | hello[at + 3])
        if body_end > extensions_end:
            raise _Malformed
        if kind == EXTENSION_ALPN:
            if found is not None:
                raise _Malformed  # one extension of a type at most (RFC 8446 §4.2)
            found = _protocol_names(hello, at + 4, body_end)
        at = body_end
    return found


def _protocol_names(hello: bytes, at: int, end: int) -> tuple[bytes, ...]:
    """The ProtocolNameList filling ``hello[at:end]`` (RFC 7301 §3.1)."""
    if at + 2 > end or at + 2 + (hello[at] << 8 | hello[at + 1]) != end:
        raise _Malformed  # the list must fill the extension exactly
    at += 2
    listed: list[bytes] = []
    while at < end:
        size = hello[at]
        at += 1
        if not size or at + size > end:
            raise _Malformed  # RFC 7301 §3.1: empty names are not allowed
        listed.append(hello[at : at + size])
        at += size
    if not listed:
        raise _Malformed
    return tuple(listed)
