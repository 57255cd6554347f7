"""A wrapper for passwords and credentials whose repr never shows the value."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string: printing, logging or repr() shows ``Secret('***')``.

    The value is reachable only through :meth:`reveal`, so that every place a
    secret leaves the process is easy to find with grep.
    """

    _value: bytes = field(repr=False)

    @classmethod
    def from_str(cls, value: str) -> Secret:
        """Wrap a text secret, stored as UTF-8."""
        return cls(value.encode("utf-8"))

    def reveal(self) -> bytes:
        """Return the secret octets."""
        return self._value

    def equals(self, other: Secret) -> bool:
        """Constant-time comparison."""
        return hmac.compare_digest(self._value, other._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __len__(self) -> int:
        return len(self._value)
