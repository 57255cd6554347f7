"""The ``Maildrop`` protocol: what a session needs from a mailbox (RFC 1939 §5, §6, §7).

A session talks to a ``Maildrop`` and never to files or upstream servers: the
listing it takes at login (numbers, exact sizes, UIDLs), a stream of CRLF chunks
for RETR and TOP, and one ``commit`` of the deletions marked before QUIT. The
local Maildir (``maildir.py``) and a live upstream (``upstream.py``) are the two
implementations; ``retention.py`` shows an upstream through the retention policy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Sequence, Set
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from popproxy.pop3.replies import ResponseCode

# Bound on each chunk ``Maildrop.retrieve`` yields, so a 50 MB message passes through
# the session in pieces of at most this many octets (no body is held whole). Each chunk
# costs a worker-thread round trip and a socket write; larger chunks are faster and
# cost more memory. docs/benchmarks.md has the figures: 128 KiB gives about 1.3x the
# throughput of 64 KiB for about 1 MB of RSS growth on a first 50 MB RETR (256 KiB:
# 1.45x, about 2.7 MB, past the 2 MB relay goal of the benchmarks issue).
RETRIEVE_CHUNK_BYTES = 128 * 1024


class MessageInfo(NamedTuple):
    """One message of a listing (RFC 1939 §5 LIST, §7 UIDL).

    ``uid`` is the unique-id listing: 1 to 70 octets in 0x21..0x7E (RFC 1939 §7),
    stable across sessions. ``size`` is the exact number of octets of the message
    in its CRLF form, before dot-stuffing: what RETR sends (RFC 1939 §5).

    A named tuple, not a frozen dataclass: a listing may have 100,000 of them, built
    at every login; a tuple is built in C and is not tracked by the cyclic collector.
    """

    uid: str
    size: int


@dataclass(frozen=True, slots=True)
class Committed:
    """What a QUIT's commit did (RFC 1939 §6 UPDATE): the ``session_end`` counts and the
    QUIT reply's text come from it, never from the client's DELE marks alone.

    ``deleted_upstream`` counts every message the upstream deleted at its QUIT (client
    DELEs under delete, retrievals under delete_after_retrieve, expiries); ``expired``
    and ``retrieved`` say how many of those the client never marked.
    """

    deleted_local: int = 0  # message files removed from a local Maildir
    deleted_upstream: int = 0  # deleted by the upstream (its QUIT answered +OK)
    hidden: int = 0  # client DELEs a keep rule overruled: left upstream, hidden for this user
    expired: int = 0  # of deleted_upstream: past their rule's expire_after_days
    retrieved: int = 0  # of deleted_upstream: RETR'd under delete_after_retrieve, no DELE


class MaildropError(Exception):
    """A maildrop failure the client hears about as ``-ERR [code] text`` (RFC 2449 §8).

    ``text`` is safe to send to a client: no paths, no exception class names.
    ``committed`` is what a failed commit did nevertheless (the upstream deleted, the
    store then failed), so that the session's log line stays true; None when nothing.
    """

    code: ResponseCode | None
    text: str
    committed: Committed | None

    def __init__(
        self, code: ResponseCode | None, text: str, *, committed: Committed | None = None
    ) -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text
        self.committed = committed

    def __str__(self) -> str:
        return self.text if self.code is None else f"[{self.code.value}] {self.text}"


class MaildropInUse(MaildropError):
    """The maildrop is already open in another session (RFC 2449 §8.1.1 ``[IN-USE]``)."""

    def __init__(self, text: str = "mailbox is locked by another session") -> None:
        super().__init__(ResponseCode.IN_USE, text)


class MessageChunks(Protocol):
    """What ``Maildrop.retrieve`` returns: a message's chunks as an async iterator, which
    the caller closes (``aclose``, ``contextlib.aclosing``) if it stops before the end.
    An async generator is one; the live upstream's is a small class (every RETR's path)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def __anext__(self) -> Awaitable[bytes]: ...

    def aclose(self) -> Awaitable[object]: ...


class Maildrop(Protocol):
    """A mailbox as a POP3 session sees it, from login to QUIT (RFC 1939 §5, §6)."""

    @property
    def dot_stuffed(self) -> bool:
        """True if ``retrieve`` yields wire octets already dot-stuffed (a relay, RFC 1939 §3)."""
        ...

    @property
    def keepalive_interval_seconds(self) -> float | None:
        """How often ``keep_alive`` should run while the client is idle; None: never."""
        ...

    @property
    def expire(self) -> str:
        """The CAPA EXPIRE argument once logged in (RFC 2449 §6.7): ``NEVER``, ``0`` or days."""
        ...

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The listing taken at open; index ``i`` is message number ``i + 1``."""
        ...

    def retrieve(self, index: int, *, body_lines: int | None = None) -> MessageChunks:
        """Stream message ``index`` as CRLF chunks (RFC 1939 §5 RETR, §7 TOP).

        Each chunk has at most ``RETRIEVE_CHUNK_BYTES`` octets. With ``body_lines``
        None: the whole message, exactly ``messages[index].size`` octets, ending with
        CRLF. Otherwise (TOP): the header, the blank line and the first
        ``body_lines`` lines of the body. The chunks are dot-stuffed exactly when
        ``dot_stuffed`` is true. Raises ``MaildropError`` if the message
        can no longer be read. Callers close the chunks (``contextlib.aclosing``)
        when they stop early, so files and upstream replies are released at once.
        """
        ...

    async def keep_alive(self) -> None:
        """Keep the maildrop usable while the client is idle (an upstream NOOP); never raises."""
        ...

    async def commit(self, deleted: Set[int]) -> Committed:
        """Apply the client's DELE marks at these indexes; called only on QUIT, also with
        none marked, and it must succeed before the client gets ``+OK`` (RFC 1939 §6).
        Returns what was done, which under retention policy is not what was marked."""
        ...

    async def aclose(self) -> None:
        """Release the maildrop (locks, handles); never deletes anything."""
        ...
