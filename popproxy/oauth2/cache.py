"""Access tokens per upstream account: cached, refreshed ahead of expiry, single-flight.

Theory of operation. ``TokenCache.access_token(account)`` returns a bearer token
for one upstream account (upstream name, upstream user). A cached token is used
until shortly before it expires (``refresh_margin``: a quarter of its lifetime,
at most ``REFRESH_AHEAD_SECONDS``), so a login never races the expiry. Otherwise
the caller refreshes it (RFC 6749 §6) while holding the account's lock; every
other session of that account waits on the same lock and then finds the fresh
token: one refresh per expiry however many sessions log in at once.

``stale``: a login the upstream refused with ``invalid_token`` passes the token it
used; if the cache still holds that token it is refreshed, if it already holds a
newer one (another session refreshed meanwhile), that one is returned.

The refresh token is read from the account's file at each refresh (so a file that
``popproxy oauth-login`` rewrote is picked up without a reload) and, when the
provider rotates it, the new one is written back before the new access token is
used (``token_file.py``: temporary file, fsync, rename, 0600).

Failures are remembered per account with a backoff (``BACKOFF_*``): until it
passes, logins get the same error at once and the endpoint is not asked again. A
revoked refresh token (``invalid_grant``) is ``[AUTH]`` with a log line telling the
operator to run ``popproxy oauth-login`` again; an endpoint that is down or
answers nonsense is ``[SYS/TEMP]``, and so is a client the provider refuses
(``invalid_client``: a configuration fault the operator fixes, not the user; RFC 3206
§4).

The cache lives as long as the process, not the config: a SIGHUP reload keeps
every token (``serve.py`` hands the same cache to the new runtime). Tokens are
``Secret`` values; nothing here logs one or puts one in a metric or an error.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import trio

from popproxy.config import OAuth2Config
from popproxy.oauth2.grants import TokenError, TokenErrorKind, TokenGrant, parse_token_answer
from popproxy.oauth2.http import HttpUnavailable, post_form
from popproxy.oauth2.token_file import TokenFileError, read_refresh_token, write_refresh_token
from popproxy.outcomes import TokenRefreshResult
from popproxy.secret import Secret

log = logging.getLogger("popproxy.oauth2")

# A token is refreshed when less than a quarter of its lifetime is left, and at the
# latest this long before it expires (an hour-long token: 60 s ahead).
REFRESH_AHEAD_SECONDS = 60.0
REFRESH_AHEAD_FRACTION = 0.25
# One token request (connect, TLS, the answer) may take this long: the login waits
# for it, and a login has login_timeout_seconds in all (30 s by default).
TOKEN_REQUEST_TIMEOUT_SECONDS = 10.0
# Token requests in flight at once, process-wide (each holds a worker thread).
MAX_CONCURRENT_TOKEN_REQUESTS = 4
# After a failed refresh the account's logins fail at once for this long, doubling per
# further failure up to the maximum: a provider that is down is not hammered by every
# client's poll, and an operator's fix is picked up within a minute.
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class TokenAccount:
    """One upstream account that logs in with tokens, and where its refresh token lives."""

    upstream: str
    user: str
    token_file: Path
    oauth2: OAuth2Config

    @property
    def key(self) -> tuple[str, str]:
        """The account's identity in the cache: a config reload may move its file."""
        return (self.upstream, self.user)


def refresh_margin(lifetime: float) -> float:
    """How long before expiry a token of ``lifetime`` seconds is refreshed."""
    return min(REFRESH_AHEAD_SECONDS, lifetime * REFRESH_AHEAD_FRACTION)


class TokenEndpoint:
    """Refreshes access tokens at an account's token endpoint (RFC 6749 §6): the standard
    library's HTTP client in a worker thread, behind a limiter, under a deadline."""

    def __init__(self, limiter: trio.CapacityLimiter | None = None) -> None:
        self.limiter = limiter or trio.CapacityLimiter(MAX_CONCURRENT_TOKEN_REQUESTS)

    async def refresh(self, account: TokenAccount, refresh_token: Secret) -> TokenGrant:
        """A new access token for ``account`` within ``TOKEN_REQUEST_TIMEOUT_SECONDS``.
        Raises ``TokenError``."""
        oauth2 = account.oauth2
        fields = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token.reveal().decode("ascii", "replace"),
            "client_id": oauth2.client_id,
        }
        if oauth2.client_secret is not None:
            fields["client_secret"] = oauth2.client_secret.reveal().decode("utf-8", "replace")

        def post() -> TokenGrant:
            try:
                answer = post_form(oauth2.token_url, fields, timeout=TOKEN_REQUEST_TIMEOUT_SECONDS)
            except HttpUnavailable as exc:
                raise TokenError(TokenErrorKind.UNAVAILABLE, str(exc)[:64]) from None
            return parse_token_answer(answer.status, answer.body)

        # The thread cannot be cancelled: on timeout it is abandoned (urllib's own
        # timeout ends it soon after) and the login goes on without it.
        with trio.move_on_after(TOKEN_REQUEST_TIMEOUT_SECONDS):
            return await trio.to_thread.run_sync(post, limiter=self.limiter, abandon_on_cancel=True)
        raise TokenError(TokenErrorKind.UNAVAILABLE, "timeout")


Refresher = Callable[[TokenAccount, Secret], Awaitable[TokenGrant]]
RefreshObserver = Callable[[str, TokenRefreshResult], None]  # (upstream, result)


_RESULTS = {
    TokenErrorKind.REVOKED: TokenRefreshResult.REVOKED,
    TokenErrorKind.REJECTED: TokenRefreshResult.REJECTED,
    TokenErrorKind.UNAVAILABLE: TokenRefreshResult.UNAVAILABLE,
    TokenErrorKind.PENDING: TokenRefreshResult.UNAVAILABLE,  # no answer to a refresh: nonsense
}


class _Entry:
    """One account's cached token, lock and failure state (mutable; one trio thread)."""

    __slots__ = ("backoff", "error", "expires_at", "lock", "obtained_at", "retry_at", "token")

    # obtained_at is on the ``age_clock`` (monotonic), expires_at and retry_at on trio's.

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.token: Secret | None = None
        self.obtained_at = 0.0
        self.expires_at = -math.inf
        self.error: TokenError | None = None
        self.retry_at = -math.inf
        self.backoff = 0.0


class TokenCache:
    """Access tokens of every token account of the process (see the module docstring)."""

    def __init__(
        self,
        refresher: Refresher | None = None,
        *,
        on_refresh: RefreshObserver | None = None,
        age_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._refresher = refresher or TokenEndpoint().refresh
        # Token ages are read at scrape time, outside trio: a clock of their own.
        self._age_clock = age_clock
        # File reads and the rotation's fsyncs: short, but blocking.
        self._file_limiter = trio.CapacityLimiter(MAX_CONCURRENT_TOKEN_REQUESTS)
        self._entries: dict[tuple[str, str], _Entry] = {}
        self.on_refresh = on_refresh

    def oldest_token_age(self, upstream: str) -> float:
        """Seconds since the oldest cached access token of ``upstream`` was obtained (0 with
        none): it grows past a token's lifetime only while refreshes fail. Safe to call
        from the exporter's thread (it only reads)."""
        now = self._age_clock()
        ages = [
            now - entry.obtained_at
            for (name, _), entry in list(self._entries.items())
            if name == upstream and entry.token is not None
        ]
        return max(ages, default=0.0)

    def failing_accounts(self, upstream: str, result: TokenRefreshResult) -> int:
        """How many accounts of ``upstream`` saw their last refresh end with ``result``
        (a failure: revoked, rejected, unavailable); each stays counted until a refresh
        succeeds, however seldom it is tried (a gateway source polled hourly). Safe to
        call from the exporter's thread (it only reads)."""
        return sum(
            1
            for (name, _), entry in list(self._entries.items())
            if name == upstream and entry.error is not None and _RESULTS[entry.error.kind] is result
        )

    def retain(self, accounts: Collection[tuple[str, str]]) -> None:
        """Forget every account but ``accounts`` ((upstream, upstream user) pairs): called
        when a reload swaps the config in, so an account no longer configured neither
        keeps a token nor counts as failing."""
        for key in [key for key in self._entries if key not in accounts]:
            del self._entries[key]

    async def access_token(
        self, account: TokenAccount, *, stale: Secret | None = None, session: str = ""
    ) -> Secret:
        """A bearer token for ``account``, refreshed if needed (single-flight).

        Raises ``TokenError``: ``REVOKED``, ``REJECTED`` or ``UNAVAILABLE`` (the last also
        when the refresh-token file cannot be read or a rotated token cannot be written).
        """
        entry = self._entries.get(account.key)
        if entry is None:
            entry = self._entries[account.key] = _Entry()
        token = self._usable(entry, stale)
        if token is not None:
            return token
        async with entry.lock:
            token = self._usable(entry, stale)
            if token is not None:
                return token
            if entry.error is not None and trio.current_time() < entry.retry_at:
                raise entry.error
            return await self._refresh(account, entry, session)

    def _usable(self, entry: _Entry, stale: Secret | None) -> Secret | None:
        token = entry.token
        if token is None or trio.current_time() >= entry.expires_at:
            return None
        if stale is not None and token.equals(stale):
            return None
        return token

    async def _refresh(self, account: TokenAccount, entry: _Entry, session: str) -> Secret:
        fields: dict[str, object] = {"upstream": account.upstream}
        if session:
            fields["session"] = session
        try:
            grant = await self._grant(account, fields)
        except TokenError as exc:
            self._failed(account, entry, exc, fields)
            raise
        now = trio.current_time()
        entry.token = grant.access_token
        entry.obtained_at = self._age_clock()
        entry.expires_at = now + grant.expires_in - refresh_margin(grant.expires_in)
        entry.error = None
        entry.backoff = 0.0
        entry.retry_at = -math.inf
        log.info(
            "oauth2_token_refreshed",
            extra={"fields": {**fields, "expires_in_seconds": round(grant.expires_in)}},
        )
        if self.on_refresh is not None:
            self.on_refresh(account.upstream, TokenRefreshResult.OK)
        return grant.access_token

    async def _grant(self, account: TokenAccount, fields: dict[str, object]) -> TokenGrant:
        """Read the refresh token, refresh, write a rotated refresh token back."""
        try:
            refresh_token = await trio.to_thread.run_sync(
                read_refresh_token, account.token_file, limiter=self._file_limiter
            )
            grant = await self._refresher(account, refresh_token)
            if grant.refresh_token is not None and not grant.refresh_token.equals(refresh_token):
                # Durable before use: the provider may already have retired the old one.
                await trio.to_thread.run_sync(
                    write_refresh_token,
                    account.token_file,
                    grant.refresh_token,
                    limiter=self._file_limiter,
                )
                log.info("oauth2_refresh_token_rotated", extra={"fields": fields})
        except TokenFileError as exc:
            problem = str(exc)
        else:
            return grant
        log.error("oauth2_token_file_error", extra={"fields": {**fields, "reason": problem}})
        raise TokenError(TokenErrorKind.UNAVAILABLE, "token file")

    def _failed(
        self,
        account: TokenAccount,
        entry: _Entry,
        error: TokenError,
        fields: dict[str, object],
    ) -> None:
        entry.backoff = min(
            BACKOFF_MAX_SECONDS, entry.backoff * 2 if entry.backoff else BACKOFF_INITIAL_SECONDS
        )
        entry.retry_at = trio.current_time() + entry.backoff
        entry.error = error
        # Kept for the age metric (an expired token is never handed out: expires_at).
        # A revoked grant's token may still be unexpired: it is dropped.
        if error.kind is TokenErrorKind.REVOKED:
            entry.token = None
        fields = {**fields, "reason": error.code, "retry_in_seconds": entry.backoff}
        match error.kind:
            case TokenErrorKind.REVOKED:
                log.error(
                    "oauth2_refresh_token_revoked",
                    extra={
                        "fields": {
                            **fields,
                            "upstream_user": account.user,
                            "action": "run `popproxy oauth-login` again for this account"
                            f" and write the token to {account.token_file}",
                        }
                    },
                )
            case _:
                log.warning("oauth2_refresh_failed", extra={"fields": fields})
        if self.on_refresh is not None:
            self.on_refresh(account.upstream, _RESULTS[error.kind])
