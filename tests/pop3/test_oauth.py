"""Token logins, sans-IO (popproxy.pop3.oauth): XOAUTH2 and OAUTHBEARER.

The vectors are the examples of RFC 7628 §4 (OAUTHBEARER: the successful exchange of
§4.1 and the failed one of §4.3, moved from IMAP to POP3's AUTH) and of Google's XOAUTH2
documentation ("The SASL XOAUTH2 Mechanism": the initial client response and the error
challenge), written out here from the published text. Every exchange runs through the
client core twice: the server's octets whole and one octet at a time.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pop3_helpers import FAST, byte_chunks

from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.client import ClientConnection
from popproxy.pop3.commands import Auth, SaslEmpty, SaslResponse, serialize_command
from popproxy.pop3.events import NEED_DATA, SaslChallenge
from popproxy.pop3.limits import MAX_COMMAND_LINE_OCTETS
from popproxy.pop3.oauth import (
    MAX_ERROR_JSON_OCTETS,
    OAuthError,
    OAuthErrorKind,
    OAuthExchange,
    OAuthMechanism,
    TokenVerdict,
    fits_initial_response,
    gs2_saslname,
    login_refusal,
    oauthbearer_response,
    parse_error_challenge,
    xoauth2_response,
)
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.secret import Secret

# RFC 7628 §4.1: user@example.com at server.example.com:143 with this bearer token.
RFC7628_TOKEN = Secret(b"vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==")
RFC7628_PAYLOAD = (
    b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
    b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
)
# The same, as the RFC prints it base64-encoded (one line here).
RFC7628_BASE64 = (
    b"bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVy"
    b"IHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
)
# RFC 7628 §4.3: the server's error challenge, base64 as printed, and what it decodes to.
RFC7628_ERROR_BASE64 = (
    b"eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGFtcGxlX3Njb3BlIiwib3BlbmlkLWNvbmZpZ3Vy"
    b"YXRpb24iOiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxsLWtub3duL29wZW5pZC1jb25maWd1cmF0aW9uIn0="
)
RFC7628_ERROR_JSON = (
    b'{"status":"invalid_token","scope":"example_scope",'
    b'"openid-configuration":"https://example.com/.well-known/openid-configuration"}'
)
# Google's XOAUTH2 example: someuser@example.com with the token below.
GOOGLE_TOKEN = Secret(b"ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
GOOGLE_PAYLOAD = (
    b"user=someuser@example.com\x01"
    b"auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
)
GOOGLE_BASE64 = (
    b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNr"
    b"QmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
)
GOOGLE_ERROR_BASE64 = (
    b"eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xl"
    b"LmNvbS8ifQ=="
)
GOOGLE_ERROR_JSON = b'{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}'


def test_rfc7628_payload_byte_for_byte() -> None:
    payload = oauthbearer_response(
        "user@example.com", RFC7628_TOKEN, host="server.example.com", port=143
    )
    assert payload.reveal() == RFC7628_PAYLOAD
    assert base64.b64encode(payload.reveal()) == RFC7628_BASE64


def test_google_xoauth2_payload_byte_for_byte() -> None:
    payload = xoauth2_response("someuser@example.com", GOOGLE_TOKEN)
    assert payload.reveal() == GOOGLE_PAYLOAD
    assert base64.b64encode(payload.reveal()) == GOOGLE_BASE64


def test_error_examples_decode_to_their_json() -> None:
    assert base64.b64decode(RFC7628_ERROR_BASE64) == RFC7628_ERROR_JSON
    assert base64.b64decode(GOOGLE_ERROR_BASE64) == GOOGLE_ERROR_JSON
    assert parse_error_challenge(RFC7628_ERROR_JSON) == OAuthError(
        OAuthErrorKind.INVALID_TOKEN, "invalid_token", "example_scope"
    )
    assert parse_error_challenge(GOOGLE_ERROR_JSON) == OAuthError(
        OAuthErrorKind.INVALID_TOKEN, "401", "https://mail.google.com/"
    )


def test_oauthbearer_without_host_and_port() -> None:
    payload = oauthbearer_response("a@b", Secret(b"tok"))
    assert payload.reveal() == b"n,a=a@b,\x01auth=Bearer tok\x01\x01"


def test_gs2_saslname_escapes_comma_and_equals() -> None:
    # RFC 5801 §4: "=" becomes "=3D" and "," becomes "=2C" (in that order, so "=2C" in
    # a name is not mistaken for an escape).
    assert gs2_saslname("a,b=c=2C") == "a=2Cb=3Dc=3D2C"
    payload = oauthbearer_response("x,y", Secret(b"t"))
    assert payload.reveal().startswith(b"n,a=x=2Cy,\x01")


@pytest.mark.parametrize("user", ["a\x01b", "a\rb", "a\nb", "a\x00b"])
def test_control_characters_in_the_user_are_refused(user: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        xoauth2_response(user, Secret(b"t"))
    with pytest.raises(ValueError, match="control character"):
        oauthbearer_response(user, Secret(b"t"))


@pytest.mark.parametrize("token", [b"", b"a b", b"a\x01", b"a\r\n", "é".encode()])
def test_a_token_that_is_not_a_b64token_is_refused(token: bytes) -> None:
    with pytest.raises(ValueError, match="b64token"):
        xoauth2_response("u", Secret(token))


def test_secrets_stay_hidden() -> None:
    payload = xoauth2_response("someuser@example.com", GOOGLE_TOKEN)
    exchange = OAuthExchange(OAuthMechanism.XOAUTH2, payload)
    assert "ya29" not in repr(payload) + repr(exchange.command())


# ---------------------------------------------------------------------------------------
# The initial response on the AUTH line, or after an empty challenge (RFC 5034 §4)


def test_line_limit_decides_the_initial_response() -> None:
    # The longest token whose AUTH line is exactly 255 octets with CRLF, and one more.
    prefix = len(b"AUTH XOAUTH2 \r\n")
    fixed = len(b"user=u\x01auth=Bearer \x01\x01")
    room = (MAX_COMMAND_LINE_OCTETS - prefix) // 4 * 3 - fixed
    fitting = Secret(b"t" * room)
    assert len(serialize_command(Auth("XOAUTH2", xoauth2_response("u", fitting)))) <= 255
    assert fits_initial_response("XOAUTH2", xoauth2_response("u", fitting))
    longer = Secret(b"t" * (room + 3))
    assert len(serialize_command(Auth("XOAUTH2", xoauth2_response("u", longer)))) > 255
    assert not fits_initial_response("XOAUTH2", xoauth2_response("u", longer))


@given(st.integers(min_value=1, max_value=400))
@FAST
def test_the_auth_line_never_passes_255_octets(length: int) -> None:
    for mechanism in OAuthMechanism:
        exchange = OAuthExchange.for_token(mechanism, "user@example.com", Secret(b"x" * length))
        line = serialize_command(exchange.command())
        assert len(line) <= MAX_COMMAND_LINE_OCTETS
        assert exchange.initial_response == (exchange.command().initial_response is not None)


def converse(exchange: OAuthExchange, chunks: Iterable[bytes]) -> tuple[bytes, list[object]]:
    """Run one exchange through the client core: the octets the client sent and the events
    it read, with the server's octets fed in ``chunks``."""
    conn = ClientConnection(expect_greeting=False)
    sent = conn.send(exchange.command())
    events: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, SaslChallenge):
                sent += conn.send(exchange.respond(event.data))
    return sent, events


def both_ways(
    exchange_of: Callable[[], OAuthExchange], server: bytes
) -> tuple[bytes, list[object]]:
    """``converse`` with the server's octets whole and one by one: both the same."""
    whole = converse(exchange_of(), [server])
    one_by_one = converse(exchange_of(), byte_chunks(server))
    assert whole == one_by_one
    return whole


def rfc7628_exchange() -> OAuthExchange:
    return OAuthExchange.for_token(
        OAuthMechanism.OAUTHBEARER,
        "user@example.com",
        RFC7628_TOKEN,
        host="server.example.com",
        port=143,
    )


def google_exchange() -> OAuthExchange:
    return OAuthExchange.for_token(OAuthMechanism.XOAUTH2, "someuser@example.com", GOOGLE_TOKEN)


def test_rfc7628_success_with_initial_response() -> None:
    # RFC 7628 §4.1: the response fits on the AUTH line; the server accepts.
    server = b"+OK Welcome\r\n"
    sent, events = both_ways(rfc7628_exchange, server)
    assert sent == b"AUTH OAUTHBEARER " + RFC7628_BASE64 + b"\r\n"
    assert events == [Ok("Welcome")]


def test_rfc7628_failure_is_acknowledged_with_0x01() -> None:
    # RFC 7628 §4.3 and §3.2.3: the error challenge, the client's %x01, then the failure.
    exchange = rfc7628_exchange()
    server = b"+ " + RFC7628_ERROR_BASE64 + b"\r\n-ERR [AUTH] Authentication failed.\r\n"
    sent, events = converse(exchange, byte_chunks(server))
    assert sent == (b"AUTH OAUTHBEARER " + RFC7628_BASE64 + b"\r\n" + b"AQ==\r\n")
    assert base64.b64decode(b"AQ==") == b"\x01"
    assert events == [
        SaslChallenge(RFC7628_ERROR_JSON),
        Err("Authentication failed.", ResponseCode.AUTH),
    ]
    assert exchange.error == OAuthError(
        OAuthErrorKind.INVALID_TOKEN, "invalid_token", "example_scope"
    )


def test_google_xoauth2_success_with_initial_response() -> None:
    server = b"+OK Welcome.\r\n"
    sent, events = both_ways(google_exchange, server)
    assert sent == b"AUTH XOAUTH2 " + GOOGLE_BASE64 + b"\r\n"
    assert events == [Ok("Welcome.")]


def test_google_xoauth2_failure_is_acknowledged_with_an_empty_line() -> None:
    exchange = google_exchange()
    server = b"+ " + GOOGLE_ERROR_BASE64 + b"\r\n-ERR [AUTH] Invalid credentials.\r\n"
    sent, events = converse(exchange, byte_chunks(server))
    assert sent == b"AUTH XOAUTH2 " + GOOGLE_BASE64 + b"\r\n" + b"\r\n"
    assert events == [
        SaslChallenge(GOOGLE_ERROR_JSON),
        Err("Invalid credentials.", ResponseCode.AUTH),
    ]
    assert exchange.error is not None and exchange.error.kind is OAuthErrorKind.INVALID_TOKEN


LONG_TOKEN = Secret(b"EwBgA8l6BAAU" + b"x" * 300)  # the size of a real Microsoft token


def long_exchange() -> OAuthExchange:
    return OAuthExchange.for_token(OAuthMechanism.XOAUTH2, "user@contoso.com", LONG_TOKEN)


def test_two_step_exchange_for_a_long_token() -> None:
    # Microsoft's documented POP exchange: AUTH XOAUTH2, "+", then the response.
    server = b"+ \r\n+OK User successfully authenticated.\r\n"
    sent, events = both_ways(long_exchange, server)
    response = base64.b64encode(xoauth2_response("user@contoso.com", LONG_TOKEN).reveal())
    assert sent == b"AUTH XOAUTH2\r\n" + response + b"\r\n"
    assert events == [SaslChallenge(b""), Ok("User successfully authenticated.")]


def test_bare_plus_is_an_empty_challenge_too() -> None:
    server = b"+\r\n+OK\r\n"
    sent, events = both_ways(long_exchange, server)
    assert sent.startswith(b"AUTH XOAUTH2\r\n")
    assert events == [SaslChallenge(b""), Ok("")]


def test_two_step_exchange_failure() -> None:
    exchange = long_exchange()
    error = base64.b64encode(b'{"status":"invalid_token","schemes":"bearer","scope":"mail"}')
    server = b"+ \r\n+ " + error + b"\r\n-ERR [AUTH] Authentication failed.\r\n"
    sent, events = converse(exchange, byte_chunks(server))
    assert sent.endswith(b"\r\n\r\n")  # the response line, then the empty acknowledgement
    assert events[-1] == Err("Authentication failed.", ResponseCode.AUTH)
    assert exchange.error == OAuthError(OAuthErrorKind.INVALID_TOKEN, "invalid_token", "mail")


def test_oauthbearer_two_step_failure_acknowledges_with_0x01() -> None:
    exchange = OAuthExchange.for_token(OAuthMechanism.OAUTHBEARER, "u", LONG_TOKEN)
    assert not exchange.initial_response
    assert exchange.respond(b"") == SaslResponse(oauthbearer_response("u", LONG_TOKEN))
    assert exchange.respond(RFC7628_ERROR_JSON) == SaslResponse(Secret(b"\x01"))


def test_a_third_challenge_is_refused() -> None:
    exchange = long_exchange()
    exchange.respond(b"")
    assert exchange.respond(b"{}") == SaslEmpty()
    with pytest.raises(ValueError, match="too many"):
        exchange.respond(b"{}")


def test_a_second_challenge_after_an_initial_response_is_refused() -> None:
    exchange = google_exchange()
    exchange.respond(GOOGLE_ERROR_JSON)
    with pytest.raises(ValueError, match="too many"):
        exchange.respond(b"")


def test_a_non_empty_first_challenge_in_the_two_step_exchange_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        long_exchange().respond(b"x")


# ---------------------------------------------------------------------------------------
# The error JSON and what it leads to (RFC 7628 §3.2.2, RFC 3206)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b'{"status":"invalid_token"}', OAuthErrorKind.INVALID_TOKEN),
        (b'{"status":"INVALID_TOKEN"}', OAuthErrorKind.INVALID_TOKEN),
        (b'{"status":"401"}', OAuthErrorKind.INVALID_TOKEN),
        (b'{"status":"insufficient_scope"}', OAuthErrorKind.INSUFFICIENT_SCOPE),
        (b'{"status":"403"}', OAuthErrorKind.INSUFFICIENT_SCOPE),
        (b'{"status":"invalid_request"}', OAuthErrorKind.INVALID_REQUEST),
        (b'{"status":"400"}', OAuthErrorKind.INVALID_REQUEST),
        (b'{"status":"500"}', OAuthErrorKind.OTHER),
        (b'{"status":7}', OAuthErrorKind.OTHER),
        (b"[1,2]", OAuthErrorKind.OTHER),
        (b"not json", OAuthErrorKind.OTHER),
        (b"\xff\xfe", OAuthErrorKind.OTHER),
        (b"", OAuthErrorKind.OTHER),
        (b"[" * 100_000, OAuthErrorKind.OTHER),
    ],
)
def test_error_kinds(data: bytes, kind: OAuthErrorKind) -> None:
    assert parse_error_challenge(data).kind is kind


def test_an_oversized_error_is_not_parsed() -> None:
    big = json.dumps({"status": "invalid_token", "pad": "x" * MAX_ERROR_JSON_OCTETS}).encode()
    assert parse_error_challenge(big) == OAuthError(OAuthErrorKind.OTHER)


@given(st.binary(max_size=300))
@FAST
def test_any_challenge_parses_to_an_error(data: bytes) -> None:
    error = parse_error_challenge(data)
    assert len(error.status) <= 64 and len(error.scope) <= 256


INVALID = OAuthError(OAuthErrorKind.INVALID_TOKEN, "invalid_token")
AUTH_ERR = Err("Authentication failed.", ResponseCode.AUTH)


def test_invalid_token_gets_one_refresh_and_one_retry() -> None:
    first = login_refusal(AUTH_ERR, INVALID, retried=False)
    assert first.verdict is TokenVerdict.REFRESH_AND_RETRY
    second = login_refusal(AUTH_ERR, INVALID, retried=True)
    assert second.verdict is TokenVerdict.REFUSED
    assert (second.code, second.failure) == (ResponseCode.AUTH, UpstreamFailure.TOKEN_REJECTED)


def test_an_err_without_a_challenge_counts_as_a_refused_token() -> None:
    for reply in (AUTH_ERR, Err("no")):
        assert login_refusal(reply, None, retried=False).verdict is TokenVerdict.REFRESH_AND_RETRY
        assert login_refusal(reply, None, retried=True).code is ResponseCode.AUTH


@pytest.mark.parametrize(
    ("reply", "error", "code", "failure"),
    [
        (
            AUTH_ERR,
            OAuthError(OAuthErrorKind.INSUFFICIENT_SCOPE),
            ResponseCode.AUTH,
            UpstreamFailure.TOKEN_REJECTED,
        ),
        (
            AUTH_ERR,
            OAuthError(OAuthErrorKind.INVALID_REQUEST),
            ResponseCode.SYS_TEMP,
            UpstreamFailure.REJECTED,
        ),
        (
            AUTH_ERR,
            OAuthError(OAuthErrorKind.OTHER),
            ResponseCode.SYS_TEMP,
            UpstreamFailure.REJECTED,
        ),
        (
            Err("busy", ResponseCode.SYS_TEMP),
            INVALID,
            ResponseCode.SYS_TEMP,
            UpstreamFailure.REJECTED,
        ),
        (
            Err("gone", ResponseCode.SYS_PERM),
            INVALID,
            ResponseCode.SYS_PERM,
            UpstreamFailure.AUTH_REJECTED,
        ),
        (Err("locked", ResponseCode.IN_USE), INVALID, ResponseCode.IN_USE, UpstreamFailure.IN_USE),
        (
            Err("wait", ResponseCode.LOGIN_DELAY),
            INVALID,
            ResponseCode.LOGIN_DELAY,
            UpstreamFailure.LOGIN_DELAY,
        ),
    ],
)
def test_other_refusals_map_per_rfc3206(
    reply: Err, error: OAuthError, code: ResponseCode, failure: UpstreamFailure
) -> None:
    refusal = login_refusal(reply, error, retried=False)
    assert refusal.verdict is TokenVerdict.REFUSED
    assert (refusal.code, refusal.failure) == (code, failure)
    assert refusal.text and "Bearer" not in refusal.text
