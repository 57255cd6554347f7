"""Maildrops: what a POP3 session reads and deletes (RFC 1939 §4-§7).

``base`` holds the ``Maildrop`` protocol and its errors; ``maildir`` the local
Maildir implementation, the embedded default.
"""

from popproxy.maildrop.base import (
    RETRIEVE_CHUNK_BYTES,
    Maildrop,
    MaildropError,
    MaildropInUse,
    MessageInfo,
)
from popproxy.maildrop.maildir import MaildirMaildrop, open_maildir

__all__ = [
    "RETRIEVE_CHUNK_BYTES",
    "MaildirMaildrop",
    "Maildrop",
    "MaildropError",
    "MaildropInUse",
    "MessageInfo",
    "open_maildir",
]
