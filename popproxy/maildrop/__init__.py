"""Maildrops: what a POP3 session reads and deletes (RFC 1939 §4-§7).

``base`` holds the ``Maildrop`` protocol and its errors; ``maildir`` the local
Maildir implementation, the embedded default; ``upstream`` a live upstream
session; ``retention`` an upstream seen through retention policy; ``router`` the
route of each local user and the opening of its maildrop. The package itself
re-exports only ``base`` (no I/O library is imported for it).
"""

from popproxy.maildrop.base import (
    RETRIEVE_CHUNK_BYTES,
    Committed,
    Maildrop,
    MaildropError,
    MaildropInUse,
    MessageInfo,
)

__all__ = [
    "RETRIEVE_CHUNK_BYTES",
    "Committed",
    "Maildrop",
    "MaildropError",
    "MaildropInUse",
    "MessageInfo",
]
