"""Closed sets of outcomes that several layers name: logs, metrics labels, errors.

Defined once, below everything that uses them (standard library only), so that the
session, the upstream maildrop and ``metrics.py`` cannot drift apart.
"""

from __future__ import annotations

import enum


class SessionResult(enum.Enum):
    """How a client session ended; used in the ``session_end`` log line and metrics."""

    QUIT = "quit"
    EOF = "eof"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol_error"
    TLS_ERROR = "tls_error"
    MAILDROP_ERROR = "maildrop_error"
    # The local login succeeded but its upstream could not be opened (connect, TLS,
    # login, [IN-USE]), and no later login of the session did better.
    UPSTREAM_ERROR = "upstream_error"
    SHUTDOWN = "shutdown"


class UpstreamFailure(enum.Enum):
    """Why an upstream connection, login or command failed (docs/proxy.md, error mapping)."""

    CONNECT = "connect"  # TCP connect failed or was refused
    TLS = "tls"  # handshake or certificate verification failed
    TIMEOUT = "timeout"  # a deadline from config expired
    AUTH_REJECTED = "auth_rejected"  # the stored credentials were refused ([AUTH], [SYS/PERM])
    PROTOCOL = "protocol"  # the upstream broke RFC 1939 (bad greeting, reply, listing)
    IN_USE = "in_use"  # [IN-USE]: the maildrop is locked by another session (RFC 2449 §8.1.1)
    LOGIN_DELAY = "login_delay"  # [LOGIN-DELAY]: logged in too recently (RFC 2449 §8.1.2)
    CLOSED = "closed"  # the upstream closed the connection mid-session
    STLS_UNAVAILABLE = "stls_unavailable"  # tls: starttls, but no STLS in CAPA (RFC 2595 §4)
    LOOP = "loop"  # the upstream is this popproxy itself
    UNSUPPORTED = "unsupported"  # the upstream lacks something required (UIDL, RFC 1939 §7)
    TOKEN_REJECTED = "token_rejected"  # the OAuth2 access token or its grant was refused
    TOKEN_UNAVAILABLE = "token_unavailable"  # no access token: the token endpoint failed
    REJECTED = "rejected"  # -ERR to a greeting, DELE, QUIT or NOOP, or [SYS/TEMP] (RFC 3206 §4)


class PollResult(enum.Enum):
    """How one gateway poll of a source ended (logs, metrics, ``popproxy state show``)."""

    OK = "ok"  # listed, fetched what was new, deleted what the rules allowed, QUIT +OK
    AUTH_FAILED = "auth_failed"  # the upstream refused the stored credentials
    UPSTREAM_ERROR = "upstream_error"  # unreachable, slow, broke the protocol, or closed
    MAILDIR_FULL = "maildir_full"  # ENOSPC or EDQUOT writing the Maildir
    MAILDIR_ERROR = "maildir_error"  # another write failure: read-only, permissions
    STATE_ERROR = "state_error"  # the state store could not be read or written
    INTERNAL_ERROR = "internal_error"  # a bug in popproxy (logged with its traceback)
    # Not polled this round: another poll or session (of any instance sharing the
    # store) holds the upstream mailbox. Not a failure: no backoff.
    BUSY = "busy"
    # Stopped: the mailbox's lease was lost mid-poll (renewal failed, or taken over);
    # nothing deleted upstream.
    LEASE_LOST = "lease_lost"


class TokenRefreshResult(enum.Enum):
    """How an OAuth2 access-token refresh ended (popproxy/oauth2/cache.py, docs/oauth2.md)."""

    OK = "ok"
    REVOKED = "revoked"  # invalid_grant: the refresh token is dead; run oauth-login again
    REJECTED = "rejected"  # the provider refuses the client (id, secret, scope)
    UNAVAILABLE = "unavailable"  # the token endpoint is down, slow or answers nonsense
