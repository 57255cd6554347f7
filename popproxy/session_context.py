"""What every session of one listener shares (``SessionContext``), fixed when the
session starts; ``popproxy/session.py`` runs the session over it."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from popproxy.auth.authenticator import Authenticator
from popproxy.auth.login import SourceMemory
from popproxy.auth.throttling import LoginThrottle
from popproxy.config import LimitsConfig, UserConfig
from popproxy.maildrop.base import Maildrop
from popproxy.metrics import Metrics

# (the local user, the session id for the audit trail) -> the user's maildrop
OpenMaildrop = Callable[[UserConfig, str], Awaitable[Maildrop]]


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What every session of one listener shares; fixed when the session starts."""

    listener: str
    limits: LimitsConfig
    authenticator: Authenticator
    open_maildrop: OpenMaildrop
    tls_context: ssl.SSLContext | None = None
    # RFC 2449 §6.7: CAPA's EXPIRE before login, from the retention policy of every
    # user (``n USER`` when it varies); after login the maildrop's own value.
    expire: str = "NEVER"
    # Names this process in its greeting, so that its own upstream leg can tell when
    # it has been pointed at itself (docs/proxy.md, loop detection).
    greeting_token: str = ""
    stls_available: bool = False
    implicit_tls: bool = False
    allow_plaintext_auth: bool = False
    # Where the session reports (popproxy/metrics.py); ``listener`` must be declared
    # there. By default a Metrics nobody reads (tests that do not look at metrics).
    metrics: Metrics = field(default_factory=Metrics.unexported)
    # Failures per client address and user name, one table per process (it outlives
    # a reload). None: no throttling or lockout (tests that do not look at them).
    throttle: LoginThrottle | None = None
    # The known-good sources of each user (popproxy/known_sources.py), one per process;
    # spared the user-name lockout. None: no source is known.
    known_sources: SourceMemory | None = None
