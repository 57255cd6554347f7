"""The verified-credential cache: recent successful logins, so a repeat costs an HMAC, not a scrypt.

Pure and standard library only; the clock is passed in. One entry per user name,
holding a keyed digest of the password that was verified (HMAC-SHA256 under a
random key made per process, never the password itself), the stored hash it was
verified against, and when it expires. A login hits only if the user's configured
hash is still the one the entry was verified against, the entry has not expired,
and the digests are equal (compared in constant time). A failed check never enters
the cache; changing or removing a user's ``password_hash`` makes its entry useless
at once, and :meth:`CredentialCache.retain` drops it at a reload.

The trade-off (docs/security.md): a dump of the process's memory holds, for each
user who logged in within the TTL, a digest under a key that is in the same memory.
That is not the password, but it can be guessed against at HMAC speed rather than
scrypt speed. The same dump would also hold the upstream passwords, which popproxy
must keep in clear to log in upstream.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from popproxy.secret import Secret

# RFC 2104 §3: an HMAC key should be at least as long as the hash output (32 octets).
DIGEST_KEY_BYTES = 32
# A user name is length-prefixed in the digested message, so ("ab", "c") and
# ("a", "bc") differ; four octets hold any name that fits a command line.
_NAME_LENGTH_BYTES = 4


@dataclass(frozen=True, slots=True)
class _Cached:
    digest: bytes = field(repr=False)
    password_hash: str = field(repr=False)
    expires: float


class CredentialCache:
    """At most ``size`` verified credentials, least recently used evicted first; 0 disables it."""

    def __init__(self, size: int, *, key: bytes | None = None) -> None:
        self._size = size
        self._key = key if key is not None else secrets.token_bytes(DIGEST_KEY_BYTES)
        # The HMAC keyed once; each digest continues a copy of it (the key is not
        # processed again, nor OpenSSL's SHA-256 looked up again).
        self._keyed = hmac.new(self._key, digestmod=hashlib.sha256)
        self._entries: OrderedDict[str, _Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """The most entries kept."""
        return self._size

    def digest(self, user: str, password: Secret) -> bytes:
        """HMAC-SHA256 of the user name and password under this process's key."""
        name = user.encode("utf-8", "surrogateescape")
        message = len(name).to_bytes(_NAME_LENGTH_BYTES, "big") + name + password.reveal()
        keyed = self._keyed.copy()
        keyed.update(message)
        return keyed.digest()

    def hit(self, user: str, digest: bytes, password_hash: str, *, now: float) -> bool:
        """Whether ``digest`` was verified for ``user`` against ``password_hash`` and is fresh."""
        entry = self._entries.get(user)
        if entry is None:
            return False
        if now >= entry.expires or entry.password_hash != password_hash:
            del self._entries[user]
            return False
        if not hmac.compare_digest(entry.digest, digest):
            return False
        self._entries.move_to_end(user)
        return True

    def store(
        self, user: str, digest: bytes, password_hash: str, *, now: float, ttl: float
    ) -> None:
        """Remember a password check that succeeded (and only such a check)."""
        if self._size <= 0 or ttl <= 0:
            return
        self._entries[user] = _Cached(digest, password_hash, now + ttl)
        self._entries.move_to_end(user)
        self._shrink()

    def resize(self, size: int) -> None:
        """Keep at most ``size`` entries from now on (a reload may change it)."""
        self._size = size
        self._shrink()

    def retain(self, password_hashes: Mapping[str, str]) -> None:
        """Drop the entries of users not in ``password_hashes`` (name -> configured hash)
        or whose hash changed: called when a reload swaps the users in."""
        for user in [
            name
            for name, entry in self._entries.items()
            if password_hashes.get(name) != entry.password_hash
        ]:
            del self._entries[user]

    def _shrink(self) -> None:
        while len(self._entries) > max(self._size, 0):
            self._entries.popitem(last=False)
