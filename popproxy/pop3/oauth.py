"""OAuth 2.0 bearer-token logins to an upstream, sans-IO: XOAUTH2 and OAUTHBEARER.

Theory of operation. A login with a token is ``AUTH mechanism`` (RFC 5034 §4)
whose SASL response carries the access token:

- OAUTHBEARER (RFC 7628 §3.1): a GS2 header ``n,a=USER,`` (RFC 5801 §4), then
  key-value pairs each ended by %x01 (``host=``, ``port=`` and ``auth=Bearer TOKEN``),
  and a final %x01.
- XOAUTH2 (Google's and Microsoft's older mechanism, the same idea without the GS2
  header): ``user=USER`` %x01 ``auth=Bearer TOKEN`` %x01 %x01.

The response goes on the AUTH line as its initial response, unless the line would
then pass the 255 octets RFC 2449 §4 allows a command (RFC 5034 §4: the client then
sends ``AUTH mechanism`` alone and the response after the server's empty ``+``
challenge). Access tokens from Google and Microsoft are long, so in practice it is
the two-step exchange; Microsoft documents only that one.

A refused token is answered with a challenge holding a JSON error (RFC 7628 §3.2.2;
Google sends the same for XOAUTH2), which the client must acknowledge before the
server sends its ``-ERR``: with %x01 for OAUTHBEARER (RFC 7628 §3.2.3) and with an
empty line for XOAUTH2 (Google's documentation). ``OAuthExchange`` plays the
client's part: it gives the AUTH command, answers each challenge, and keeps the
parsed error, whose ``status`` decides what happens next (``login_refusal``):
``invalid_token`` (or Google's ``401``) means the access token expired or was
revoked: one refresh and one retry; anything else is an ``[AUTH]`` or a
``[SYS/TEMP]`` for the local client (RFC 3206).

Standard library only; the upstream connection module drives this.
"""

from __future__ import annotations

import base64
import enum
import json
from dataclasses import dataclass

from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.commands import Auth, SaslEmpty, SaslLine, SaslResponse
from popproxy.pop3.limits import MAX_COMMAND_LINE_OCTETS
from popproxy.pop3.replies import Err, ResponseCode
from popproxy.secret import Secret

# A JSON error challenge longer than this is not parsed (RFC 7628 §3.2.2 defines three
# short members; a reply line is at most 512 octets by RFC 2449 §4, so 4 KiB of JSON is
# far more than any provider sends).
MAX_ERROR_JSON_OCTETS = 4096
# Challenges one exchange answers: the empty one asking for the response (two-step
# exchange), then the error. A third is a protocol error.
MAX_CHALLENGES = 2


class OAuthMechanism(enum.Enum):
    """The SASL mechanism that carries a bearer token; the value is its wire name."""

    XOAUTH2 = "XOAUTH2"
    OAUTHBEARER = "OAUTHBEARER"  # RFC 7628 §3


def _check_text(name: str, value: str) -> None:
    # %x01 separates the fields and a line end would end the SASL line (RFC 7628 §3.1).
    if any(c in value for c in "\x00\x01\r\n"):
        raise ValueError(f"{name} holds a control character that SASL cannot carry")


def _check_token(token: Secret) -> None:
    # RFC 6750 §2.1 b64token: ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/", then "="s.
    if not token.reveal() or any(
        not (chr(b).isalnum() and b < 0x80) and b not in b"-._~+/=" for b in token.reveal()
    ):
        raise ValueError("the access token is not an RFC 6750 b64token")


def gs2_saslname(user: str) -> str:
    """The user name as a GS2 ``saslname``: ``,`` as ``=2C`` and ``=`` as ``=3D`` (RFC 5801 §4)."""
    return user.replace("=", "=3D").replace(",", "=2C")


def xoauth2_response(user: str, token: Secret) -> Secret:
    """The XOAUTH2 client response: ``user=USER^Aauth=Bearer TOKEN^A^A``, not yet base64."""
    _check_text("the user name", user)
    _check_token(token)
    return Secret(
        b"user=" + user.encode("utf-8") + b"\x01auth=Bearer " + token.reveal() + b"\x01\x01"
    )


def oauthbearer_response(
    user: str, token: Secret, *, host: str | None = None, port: int | None = None
) -> Secret:
    """The OAUTHBEARER client response (RFC 7628 §3.1), not yet base64.

    The GS2 header names ``user`` as the authorization identity (``n,a=USER,``); ``host``
    and ``port`` say where the client connected (optional keys of RFC 7628 §3.1).
    """
    _check_text("the user name", user)
    _check_token(token)
    pairs = b""
    if host is not None:
        _check_text("the host name", host)
        pairs += b"host=" + host.encode("ascii") + b"\x01"
    if port is not None:
        pairs += b"port=%d\x01" % port
    header = b"n,a=" + gs2_saslname(user).encode("utf-8") + b","
    return Secret(header + b"\x01" + pairs + b"auth=Bearer " + token.reveal() + b"\x01\x01")


def fits_initial_response(mechanism: str, response: Secret) -> bool:
    """Whether ``AUTH mechanism base64(response)`` CRLF stays within 255 octets (RFC 2449 §4,
    RFC 5034 §4)."""
    encoded = len(base64.b64encode(response.reveal())) if len(response) else 1
    return len(b"AUTH ") + len(mechanism) + 1 + encoded + 2 <= MAX_COMMAND_LINE_OCTETS


class OAuthErrorKind(enum.Enum):
    """What a provider's error status says (RFC 7628 §3.2.2, RFC 6750 §3.1); Google puts
    the HTTP status there instead ("401", "403", "400")."""

    INVALID_TOKEN = "invalid_token"  # expired, revoked or malformed: refresh and retry
    INSUFFICIENT_SCOPE = "insufficient_scope"  # the grant lacks the mail scope
    INVALID_REQUEST = "invalid_request"  # the SASL message was malformed
    OTHER = "other"  # no status, or one nobody documented


_KINDS = {
    "invalid_token": OAuthErrorKind.INVALID_TOKEN,
    "401": OAuthErrorKind.INVALID_TOKEN,
    "insufficient_scope": OAuthErrorKind.INSUFFICIENT_SCOPE,
    "403": OAuthErrorKind.INSUFFICIENT_SCOPE,
    "invalid_request": OAuthErrorKind.INVALID_REQUEST,
    "400": OAuthErrorKind.INVALID_REQUEST,
}


@dataclass(frozen=True, slots=True)
class OAuthError:
    """The error a server sent in its challenge (RFC 7628 §3.2.2), as far as it parsed."""

    kind: OAuthErrorKind
    status: str = ""  # as sent, at most 64 characters: safe to log (no secret in it)
    scope: str = ""


def parse_error_challenge(data: bytes) -> OAuthError:
    """The error a failed token login's challenge holds (RFC 7628 §3.2.2), already base64-decoded.

    Anything that is not a JSON object with a string ``status`` is an ``OTHER`` error:
    the login failed either way, and the ``-ERR`` that follows still counts.
    """
    if len(data) > MAX_ERROR_JSON_OCTETS:
        return OAuthError(OAuthErrorKind.OTHER)
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return OAuthError(OAuthErrorKind.OTHER)
    if not isinstance(parsed, dict):
        return OAuthError(OAuthErrorKind.OTHER)
    status = parsed.get("status")
    scope = parsed.get("scope")
    status = status[:64] if isinstance(status, str) else ""
    scope = scope[:256] if isinstance(scope, str) else ""
    return OAuthError(_KINDS.get(status.lower(), OAuthErrorKind.OTHER), status, scope)


def error_acknowledgement(mechanism: OAuthMechanism) -> SaslLine:
    """What the client answers an error challenge with, so the server sends its ``-ERR``:
    %x01 for OAUTHBEARER (RFC 7628 §3.2.3), an empty line for XOAUTH2."""
    match mechanism:
        case OAuthMechanism.OAUTHBEARER:
            return SaslResponse(Secret(b"\x01"))
        case OAuthMechanism.XOAUTH2:
            return SaslEmpty()


class OAuthExchange:
    """The client's side of one token login (RFC 5034 §4 with RFC 7628 or XOAUTH2).

    ``command()`` is the AUTH to send; ``respond(challenge)`` answers each challenge:
    the empty one of the two-step exchange with the response, and an error with the
    acknowledgement, after which ``error`` holds what the server said. Not frozen: one
    exchange per login attempt.
    """

    __slots__ = ("_challenges", "_initial", "_response", "error", "mechanism")

    def __init__(self, mechanism: OAuthMechanism, response: Secret) -> None:
        self.mechanism = mechanism
        self._response = response
        self._initial = fits_initial_response(mechanism.value, response)
        self._challenges = 0
        self.error: OAuthError | None = None

    @classmethod
    def for_token(
        cls,
        mechanism: OAuthMechanism,
        user: str,
        token: Secret,
        *,
        host: str | None = None,
        port: int | None = None,
    ) -> OAuthExchange:
        """The exchange that logs ``user`` in with ``token`` (``host`` and ``port`` go only
        into an OAUTHBEARER response, RFC 7628 §3.1)."""
        match mechanism:
            case OAuthMechanism.XOAUTH2:
                response = xoauth2_response(user, token)
            case OAuthMechanism.OAUTHBEARER:
                response = oauthbearer_response(user, token, host=host, port=port)
        return cls(mechanism, response)

    @property
    def initial_response(self) -> bool:
        """Whether the response rides on the AUTH line (else it follows an empty challenge)."""
        return self._initial

    def command(self) -> Auth:
        """``AUTH mechanism [initial-response]`` (RFC 5034 §4)."""
        return Auth(self.mechanism.value, self._response if self._initial else None)

    def respond(self, challenge: bytes) -> SaslLine:
        """The answer to the server's next challenge (decoded).

        Raises ``ValueError`` for a challenge the exchange has no room for (more than
        ``MAX_CHALLENGES``): the caller treats it as an upstream protocol error.
        """
        self._challenges += 1
        if self._challenges > MAX_CHALLENGES or (self._initial and self._challenges > 1):
            raise ValueError("too many SASL challenges in a token login")
        if not self._initial and self._challenges == 1:
            if challenge:
                raise ValueError("a non-empty first challenge in a two-step token login")
            return SaslResponse(self._response)
        self.error = parse_error_challenge(challenge)
        return error_acknowledgement(self.mechanism)


class TokenVerdict(enum.Enum):
    """What a refused token login leads to."""

    REFRESH_AND_RETRY = "refresh_and_retry"  # the access token is no longer good
    REFUSED = "refused"  # the local client gets the mapped -ERR


@dataclass(frozen=True, slots=True)
class TokenRefusal:
    """A refused token login: what to do, and what the local client hears (RFC 3206)."""

    verdict: TokenVerdict
    failure: UpstreamFailure
    code: ResponseCode
    text: str


_TOKEN_REJECTED = (
    "The mail provider rejected popproxy's access token for this account;"
    " contact your administrator."
)
_UNAVAILABLE = "The mail provider is unavailable, try again later."


def login_refusal(reply: Err, error: OAuthError | None, *, retried: bool) -> TokenRefusal:
    """Map the ``-ERR`` to a token login, and the error challenge before it, to what comes next.

    ``invalid_token`` (``401``) on the first attempt: refresh and retry once. After the
    retry, and for ``insufficient_scope`` (``403``), the grant itself is wrong: ``[AUTH]``
    (RFC 3206 §5; the fix is ``popproxy oauth-login`` again). The upstream's own
    ``[IN-USE]`` and ``[LOGIN-DELAY]`` pass through (RFC 2449 §8.1); ``[SYS/TEMP]``, a
    malformed-request error or one nobody documented is ``[SYS/TEMP]`` (RFC 3206 §4).
    """
    match reply.code:
        case ResponseCode.IN_USE:
            return TokenRefusal(
                TokenVerdict.REFUSED,
                UpstreamFailure.IN_USE,
                ResponseCode.IN_USE,
                "The mailbox is in use upstream.",
            )
        case ResponseCode.LOGIN_DELAY:
            return TokenRefusal(
                TokenVerdict.REFUSED,
                UpstreamFailure.LOGIN_DELAY,
                ResponseCode.LOGIN_DELAY,
                "The mail provider asks to wait before logging in again.",
            )
        case ResponseCode.SYS_TEMP:
            return TokenRefusal(
                TokenVerdict.REFUSED, UpstreamFailure.REJECTED, ResponseCode.SYS_TEMP, _UNAVAILABLE
            )
        case ResponseCode.SYS_PERM:
            return TokenRefusal(
                TokenVerdict.REFUSED,
                UpstreamFailure.AUTH_REJECTED,
                ResponseCode.SYS_PERM,
                _TOKEN_REJECTED,
            )
        case ResponseCode.AUTH | None:
            pass
    # No error challenge: the -ERR alone says the token was refused (as a password
    # login's -ERR says the password was).
    kind = error.kind if error is not None else OAuthErrorKind.INVALID_TOKEN
    if kind is OAuthErrorKind.INVALID_TOKEN:
        if not retried:
            return TokenRefusal(
                TokenVerdict.REFRESH_AND_RETRY,
                UpstreamFailure.TOKEN_REJECTED,
                ResponseCode.AUTH,
                _TOKEN_REJECTED,
            )
        return TokenRefusal(
            TokenVerdict.REFUSED, UpstreamFailure.TOKEN_REJECTED, ResponseCode.AUTH, _TOKEN_REJECTED
        )
    if kind is OAuthErrorKind.INSUFFICIENT_SCOPE:
        return TokenRefusal(
            TokenVerdict.REFUSED, UpstreamFailure.TOKEN_REJECTED, ResponseCode.AUTH, _TOKEN_REJECTED
        )
    return TokenRefusal(
        TokenVerdict.REFUSED, UpstreamFailure.REJECTED, ResponseCode.SYS_TEMP, _UNAVAILABLE
    )
