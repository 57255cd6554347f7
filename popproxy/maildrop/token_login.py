"""Logging in upstream with an OAuth2 access token: XOAUTH2 or OAUTHBEARER (docs/oauth2.md).

``TokenLogin`` is the ``Login`` (``upstream_login.py``) of an account whose upstream
has ``auth: xoauth2`` or ``oauthbearer``: one ``AUTH`` whose exchange the sans-IO
``pop3/oauth.py`` plays (initial response or two-step, error challenge answered).
It is not pipelined with the listing: a refused token is answered with a challenge,
and a command sent behind the AUTH would be read as the answer.

``open_token_connection`` gets the account's access token from the process's
``TokenCache`` (``popproxy/oauth2/cache.py``), logs in with it, and when the
upstream says the token is no longer good (``invalid_token``), gets a fresh one and
logs in once more on a new connection. A token that cannot be had is an
``UpstreamError`` like any other: ``[SYS/TEMP]`` while the endpoint is down,
``[AUTH]`` once the refresh token is revoked (RFC 3206).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from popproxy.config import UpstreamAuth
from popproxy.maildrop.connection import UpstreamError
from popproxy.metrics import UpstreamMetrics
from popproxy.oauth2.cache import TokenAccount, TokenCache
from popproxy.oauth2.grants import TokenError, TokenErrorKind
from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.client_replies import Capabilities
from popproxy.pop3.commands import Command, SaslLine
from popproxy.pop3.oauth import (
    OAuthExchange,
    OAuthMechanism,
    TokenVerdict,
    login_refusal,
)
from popproxy.pop3.replies import Err, ResponseCode
from popproxy.secret import Secret

log = logging.getLogger("popproxy.upstream")

_T = TypeVar("_T")

_MECHANISMS = {
    UpstreamAuth.XOAUTH2: OAuthMechanism.XOAUTH2,
    UpstreamAuth.OAUTHBEARER: OAuthMechanism.OAUTHBEARER,
}
_UNAVAILABLE = "The mail provider is unavailable, try again later."
_REVOKED = (
    "The mail provider no longer accepts popproxy's authorization for this account;"
    " contact your administrator."
)


class TokenRefused(UpstreamError):
    """The upstream refused the access token; ``retry``: a fresh token may do."""

    def __init__(
        self, failure: UpstreamFailure, code: ResponseCode | None, text: str, *, retry: bool
    ) -> None:
        super().__init__(failure, code, text)
        self.retry = retry


class TokenLogin:
    """One token login attempt (``AUTH XOAUTH2`` or ``AUTH OAUTHBEARER``), a ``Login``."""

    pipelined = False

    def __init__(
        self,
        mechanism: OAuthMechanism,
        user: str,
        token: Secret,
        *,
        upstream: str,
        host: str,
        port: int,
        retried: bool = False,
    ) -> None:
        self._exchange = OAuthExchange.for_token(mechanism, user, token, host=host, port=port)
        self._retried = retried
        self._upstream = upstream

    def commands(self, capabilities: Capabilities) -> tuple[Command, ...]:
        """The one AUTH, whatever CAPA lists: the upstream was configured for it."""
        return (self._exchange.command(),)

    def respond(self, challenge: bytes) -> SaslLine:
        """The response after an empty challenge, or the acknowledgement of an error
        (RFC 7628 §3.2.3); ``ValueError`` for a challenge out of turn."""
        return self._exchange.respond(challenge)

    def refused(self, reply: Err) -> UpstreamError:
        """The refusal as the client's reply; ``TokenRefused.retry`` on a first
        ``invalid_token`` (RFC 7628 §3.2.2, RFC 3206)."""
        error = self._exchange.error
        refusal = login_refusal(reply, error, retried=self._retried)
        log.warning(
            "upstream_token_refused",
            extra={
                "fields": {
                    "upstream": self._upstream,
                    "status": error.status if error is not None else "",
                    "retry": refusal.verdict is TokenVerdict.REFRESH_AND_RETRY,
                }
            },
        )
        return TokenRefused(
            refusal.failure,
            refusal.code,
            refusal.text,
            retry=refusal.verdict is TokenVerdict.REFRESH_AND_RETRY,
        )


def token_error(error: TokenError) -> UpstreamError:
    """The client's reply when no access token could be had (RFC 3206)."""
    match error.kind:
        case TokenErrorKind.REVOKED:
            return UpstreamError(UpstreamFailure.TOKEN_REJECTED, ResponseCode.AUTH, _REVOKED)
        case TokenErrorKind.REJECTED | TokenErrorKind.UNAVAILABLE | TokenErrorKind.PENDING:
            return UpstreamError(
                UpstreamFailure.TOKEN_UNAVAILABLE, ResponseCode.SYS_TEMP, _UNAVAILABLE
            )


async def open_token_connection(
    account: TokenAccount,
    *,
    mechanism: UpstreamAuth,
    host: str,
    port: int,
    tokens: TokenCache,
    metrics: UpstreamMetrics | None,
    session: str,
    connect: Callable[[TokenLogin], Awaitable[_T]],
) -> _T:
    """Log in with the account's access token through ``connect`` (which opens one
    connection with the login it is given); on a first ``invalid_token``, once more with a
    fresh token. Raises ``UpstreamError``."""
    oauth = _MECHANISMS[mechanism]
    stale: Secret | None = None
    for retried in (False, True):
        try:
            token = await tokens.access_token(account, stale=stale, session=session)
        except TokenError as exc:
            failure = token_error(exc)
            if metrics is not None:
                metrics.login_failed(failure.failure)
            raise failure from None
        login = TokenLogin(
            oauth,
            account.user,
            token,
            upstream=account.upstream,
            host=host,
            port=port,
            retried=retried,
        )
        try:
            return await connect(login)
        except TokenRefused as exc:
            if not exc.retry:
                raise
            stale = token
    raise AssertionError("unreachable: the second attempt never asks for a retry")
