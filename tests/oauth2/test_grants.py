"""Token endpoint answers (popproxy.oauth2.grants): grants and classified errors (RFC 6749 §5)."""

from __future__ import annotations

import pytest

from popproxy.oauth2.grants import (
    DEFAULT_EXPIRES_IN_SECONDS,
    MAX_EXPIRES_IN_SECONDS,
    TokenError,
    TokenErrorKind,
    TokenGrant,
    parse_token_answer,
)
from popproxy.secret import Secret


def test_a_grant_with_a_rotated_refresh_token() -> None:
    grant = parse_token_answer(
        200,
        {
            "access_token": "ya29.a",
            "token_type": "Bearer",
            "expires_in": 3599,
            "refresh_token": "1//r",
        },
    )
    assert grant == TokenGrant(Secret(b"ya29.a"), 3599.0, Secret(b"1//r"))
    assert "ya29" not in repr(grant)


@pytest.mark.parametrize(
    ("expires_in", "seconds"),
    [
        (None, DEFAULT_EXPIRES_IN_SECONDS),
        ("3600", 3600.0),
        (0, DEFAULT_EXPIRES_IN_SECONDS),
        (-5, DEFAULT_EXPIRES_IN_SECONDS),
        (True, DEFAULT_EXPIRES_IN_SECONDS),
        (10**9, MAX_EXPIRES_IN_SECONDS),
        (2.5, 2.5),
    ],
)
def test_expires_in(expires_in: object, seconds: float) -> None:
    body: dict[str, object] = {"access_token": "t", "token_type": "bearer"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    assert parse_token_answer(200, body).expires_in == seconds


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"access_token": "t"},  # no token_type
        {"access_token": "t", "token_type": "mac"},
        {"access_token": "", "token_type": "Bearer"},
        {"access_token": "a b", "token_type": "Bearer"},
        {"access_token": 7, "token_type": "Bearer"},
        {"access_token": "x" * 20000, "token_type": "Bearer"},
    ],
)
def test_a_malformed_grant_is_the_endpoint_being_unavailable(body: dict[str, object]) -> None:
    with pytest.raises(TokenError) as info:
        parse_token_answer(200, body)
    assert info.value.kind is TokenErrorKind.UNAVAILABLE


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (400, {"error": "invalid_grant"}, TokenErrorKind.REVOKED, "invalid_grant"),
        (401, {"error": "invalid_client"}, TokenErrorKind.REJECTED, "invalid_client"),
        (400, {"error": "invalid_scope"}, TokenErrorKind.REJECTED, "invalid_scope"),
        (400, {"error": "unauthorized_client"}, TokenErrorKind.REJECTED, "unauthorized_client"),
        (400, {"error": "authorization_pending"}, TokenErrorKind.PENDING, "authorization_pending"),
        (400, {"error": "slow_down"}, TokenErrorKind.PENDING, "slow_down"),
        (400, {"error": "expired_token"}, TokenErrorKind.REJECTED, "expired_token"),
        (
            503,
            {"error": "temporarily_unavailable"},
            TokenErrorKind.UNAVAILABLE,
            "temporarily_unavailable",
        ),
        (500, {}, TokenErrorKind.UNAVAILABLE, "http 500"),
        (429, {}, TokenErrorKind.UNAVAILABLE, "http 429"),
        (400, {"error": "invalid_grant\n fake=line"}, TokenErrorKind.UNAVAILABLE, "http 400"),
        (502, {"error": "invalid_grant"}, TokenErrorKind.UNAVAILABLE, "invalid_grant"),
    ],
)
def test_errors(status: int, body: dict[str, object], kind: TokenErrorKind, code: str) -> None:
    with pytest.raises(TokenError) as info:
        parse_token_answer(status, body)
    assert (info.value.kind, info.value.code) == (kind, code)
