"""The client's address as a session sees it: a value, not a log string.

Behind a trusted proxy that sends a PROXY protocol header (popproxy/proxy_protocol.py)
this is the address the header names, not the proxy's; otherwise it is the TCP
peer of the accepted socket. Logs print it with ``str()``; the per-address session
limit and login throttling key on ``host``.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# What a per-address limit counts as one client on IPv6: a /64, the size of one
# subnet (RFC 4291 §2.5.4), which one host or one site routinely gets whole, so
# counting single addresses would let one machine take as many slots as it likes.
IPV6_LIMIT_PREFIX = 64
# Client hosts whose parsed forms are remembered: a session asks at the accept, for
# the per-address limit (twice) and at the login, and parsing an address each time
# is a noticeable part of a short session's CPU (issue 15).
HOSTS_REMEMBERED = 4096


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """An IP address (text, as ``getpeername`` gives it) and a TCP port; ``host`` is
    empty when the address could not be read (the socket was already reset)."""

    host: str
    port: int

    @classmethod
    def of(cls, address: IPAddress, port: int) -> PeerAddress:
        """The peer at ``address``, written in its compressed form (RFC 5952 §4); an
        IPv4-mapped IPv6 address (RFC 4291 §2.5.5.2) as the IPv4 address it maps."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return cls(str(address), port)

    @property
    def known(self) -> bool:
        """Whether there is an address at all."""
        return bool(self.host)

    @property
    def ip(self) -> IPAddress | None:
        """``host`` parsed (a scope such as ``%eth0`` is dropped); None if not an IP address."""
        try:
            return ipaddress.ip_address(self.host.split("%", 1)[0])
        except ValueError:
            return None

    @property
    def limit_key(self) -> str:
        """What per-address limits count this peer as: the IPv4 address, or the IPv6
        /64 it is in (``IPV6_LIMIT_PREFIX``); empty when there is no address."""
        return _limit_key(self.host)

    def __str__(self) -> str:
        """``192.0.2.1:110``, ``[2001:db8::1]:110`` (RFC 3986 §3.2.2), or ``-`` if unknown."""
        if not self.host:
            return "-"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


UNKNOWN_PEER = PeerAddress("", 0)


def socket_peer(address: object) -> PeerAddress:
    """The ``PeerAddress`` of a ``getpeername()`` result (an (host, port, ...) tuple)."""
    if not isinstance(address, tuple) or len(address) < 2:
        return UNKNOWN_PEER
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return UNKNOWN_PEER
    return PeerAddress(_canonical_host(host), port)


@functools.lru_cache(maxsize=HOSTS_REMEMBERED)
def _canonical_host(host: str) -> str:
    """``host`` as ``PeerAddress.of`` writes it, or as it is if it is no IP address."""
    try:
        return PeerAddress.of(ipaddress.ip_address(host), 0).host
    except ValueError:
        return host


@functools.lru_cache(maxsize=HOSTS_REMEMBERED)
def _limit_key(host: str) -> str:
    """``PeerAddress.limit_key`` of a peer at ``host``."""
    ip = PeerAddress(host, 0).ip
    if ip is None:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_LIMIT_PREFIX), strict=False))
    return str(ip)
