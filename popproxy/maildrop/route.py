"""Where a local user's mail comes from: one route value per user (DESIGN.md, routing).

The config says it with keys (``maildir``, or ``upstream`` with ``upstream_user`` and
a password or a refresh-token file); ``route_of`` turns them into one frozen value,
so code that serves, explains or describes a user dispatches with ``match`` on the
route instead of testing keys for None. Pure: no I/O library is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from popproxy.config import FetchSource, UpstreamConfig, UserConfig
from popproxy.secret import Secret


@dataclass(frozen=True, slots=True)
class MaildirRoute:
    """The user is served from a local Maildir (the embedded default)."""

    path: Path


@dataclass(frozen=True, slots=True)
class RefreshTokenFile:
    """An upstream account that logs in with OAuth2 access tokens (``auth: xoauth2`` or
    ``oauthbearer``): the file holding its refresh token (docs/oauth2.md)."""

    path: Path


# What popproxy logs in upstream with: the stored password, or the refresh-token file.
UpstreamCredential = Secret | RefreshTokenFile


@dataclass(frozen=True, slots=True)
class UpstreamRoute:
    """The user is served live from an account on an upstream server (proxy mode)."""

    upstream: UpstreamConfig
    user: str  # the upstream user name
    credential: UpstreamCredential


Route = MaildirRoute | UpstreamRoute


class NoRoute(Exception):
    """The user has neither a Maildir nor a complete upstream account (a config that
    did not come through the loader, which refuses such a user)."""


def route_of(user: UserConfig, upstreams: Mapping[str, UpstreamConfig]) -> Route:
    """The route ``user`` is served by; ``NoRoute`` if its config names none."""
    if user.maildir is not None:
        return MaildirRoute(user.maildir)
    if user.upstream is None or user.upstream_user is None:
        raise NoRoute(f"user {user.name!r} has no maildrop configured")
    credential = _credential(user.upstream_password, user.upstream_refresh_token_file)
    if credential is None:
        raise NoRoute(f"user {user.name!r} has no maildrop configured (no upstream credential)")
    return UpstreamRoute(upstreams[user.upstream], user.upstream_user, credential)


def source_route(source: FetchSource, upstreams: Mapping[str, UpstreamConfig]) -> UpstreamRoute:
    """The upstream account a gateway source is fetched from, with its password or its
    refresh-token file; ``NoRoute`` if the source has no credential."""
    credential = _credential(source.upstream_password, source.upstream_refresh_token_file)
    if credential is None:
        raise NoRoute(f"source {source.label!r} has no upstream credential")
    return UpstreamRoute(upstreams[source.upstream], source.upstream_user, credential)


def _credential(password: Secret | None, token_file: Path | None) -> UpstreamCredential | None:
    if token_file is not None:
        return RefreshTokenFile(token_file)
    return password
