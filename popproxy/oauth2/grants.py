"""Token endpoint answers, parsed: a grant or a classified error (RFC 6749 §5.1, §5.2).

Pure: ``parse_token_answer`` takes the HTTP status and the JSON object, and says
what a refresh (RFC 6749 §6) or a code or device grant (§4.1.3, RFC 8628 §3.4)
gave. The error decides what a login gets (RFC 3206): a refresh token the provider
no longer honours (``invalid_grant``: revoked, expired, password changed) is
``[AUTH]`` and wants ``popproxy oauth-login`` again; a client the provider refuses
(``invalid_client``, a wrong secret or id) is a configuration fault; anything that
is not a clear answer (a 5xx, a 429, garbage) is the endpoint being unavailable.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from popproxy.secret import Secret

# RFC 6749 §5.1 makes expires_in RECOMMENDED; without it a token is trusted this long.
DEFAULT_EXPIRES_IN_SECONDS = 300.0
# An expires_in above a day is taken as a day: providers issue hour-long tokens.
MAX_EXPIRES_IN_SECONDS = 86400.0
# Tokens longer than this are refused (Microsoft's are about 2 KiB; RFC 6749 sets no bound).
MAX_TOKEN_CHARS = 16 * 1024


class TokenErrorKind(enum.Enum):
    """Why no access token came; the value is the metric's ``result`` label."""

    REVOKED = "revoked"  # invalid_grant: the refresh token is no longer good
    REJECTED = "rejected"  # the client or the request is refused: a configuration fault
    UNAVAILABLE = "unavailable"  # no clear answer: down, slow, 5xx, 429, not JSON
    PENDING = "pending"  # device flow: authorization_pending or slow_down (RFC 8628 §3.5)


class TokenError(Exception):
    """A token request that gave no token. ``code`` is the provider's ``error`` value (or
    the HTTP status, or the network reason), short and safe to log."""

    def __init__(self, kind: TokenErrorKind, code: str) -> None:
        super().__init__(f"{kind.value}: {code}")
        self.kind = kind
        self.code = code


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a token endpoint granted (RFC 6749 §5.1)."""

    access_token: Secret
    expires_in: float
    refresh_token: Secret | None = None  # a new one when the provider rotates them


_REVOKED = {"invalid_grant"}
_PENDING = {"authorization_pending", "slow_down"}
_REJECTED = {
    "invalid_client",
    "unauthorized_client",
    "invalid_scope",
    "unsupported_grant_type",
    "invalid_request",
    "access_denied",
    "expired_token",  # RFC 8628 §3.5: the device code expired
}


def _token(value: object) -> Secret | None:
    if not isinstance(value, str) or not value or len(value) > MAX_TOKEN_CHARS:
        return None
    if not value.isascii() or not value.isprintable() or " " in value:
        return None
    return Secret.from_str(value)


def parse_token_answer(status: int, body: Mapping[str, object]) -> TokenGrant:
    """The grant in a token endpoint's answer, or raise the ``TokenError`` it amounts to."""
    if status == 200:
        access = _token(body.get("access_token"))
        token_type = body.get("token_type")
        if access is None or not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise TokenError(TokenErrorKind.UNAVAILABLE, "malformed token response")
        expires = body.get("expires_in")
        if isinstance(expires, str) and expires.isdigit():
            expires = int(expires)  # some endpoints send it as a string
        if isinstance(expires, bool) or not isinstance(expires, int | float) or expires <= 0:
            expires_in = DEFAULT_EXPIRES_IN_SECONDS
        else:
            expires_in = min(float(expires), MAX_EXPIRES_IN_SECONDS)
        return TokenGrant(access, expires_in, _token(body.get("refresh_token")))
    error = body.get("error")
    code = error[:64] if isinstance(error, str) and error.isprintable() else f"http {status}"
    if status in (400, 401) and code in _REVOKED:
        raise TokenError(TokenErrorKind.REVOKED, code)
    if status in (400, 401) and code in _PENDING:
        raise TokenError(TokenErrorKind.PENDING, code)
    if status in (400, 401, 403) and code in _REJECTED:
        raise TokenError(TokenErrorKind.REJECTED, code)
    raise TokenError(TokenErrorKind.UNAVAILABLE, code)
