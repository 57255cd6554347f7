"""Opening each local user's maildrop, and the process-lifetime state it shares.

``MaildropRouter`` serves one config generation: it turns a user's route
(``route.py``) into an open ``Maildrop``, either its Maildir or a session with its
upstream account seen through retention policy (DESIGN.md, routing). A reload
builds a new router; what must outlive reloads is in ``RouterResources``, made once
per process and handed to every router: the state store, the mailbox locks (an
account stays locked across config generations while a session of either uses it),
the upstream capability memos, the greeting token and the OAuth2 access tokens.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import trio

from popproxy.config import Config, TlsMode, UpstreamConfig, UserConfig
from popproxy.locks import MailboxLocks, UpstreamMailbox, upstream_mailbox
from popproxy.maildrop.base import Maildrop, MaildropError
from popproxy.maildrop.maildir import open_maildir
from popproxy.maildrop.retention import (
    Clock,
    RetainedMaildrop,
    RetentionContext,
    open_retained,
)
from popproxy.maildrop.route import MaildirRoute, NoRoute, Route, UpstreamRoute, route_of
from popproxy.maildrop.upstream import CapabilityMemo, UpstreamAccount, open_upstream
from popproxy.metrics import Metrics
from popproxy.oauth2.cache import TokenCache
from popproxy.pop3.replies import ResponseCode
from popproxy.state.base import AccountKey, StateError, StateStore
from popproxy.state.facts_cache import FactsCache

# The logger the state_unavailable line has always had (the router lived in serve.py).
log = logging.getLogger("popproxy.serve")

_UpstreamServer = tuple[str, int, TlsMode]


class StoreSource(Protocol):
    """The state store, opened when first needed (``popproxy.state.opener.StoreOpener``)."""

    async def get(self) -> StateStore:
        """The open store; ``StateError`` if it cannot be opened."""
        ...


class CapabilityMemos:
    """Each upstream server's last CAPA reply (``CapabilityMemo``), so that its next
    logins pipeline CAPA too. Keyed by host, port and TLS mode, not by the upstream's
    name, so a reload that points a name elsewhere starts afresh. Bounded by the
    upstreams configured: ``retain`` drops the others at each reload.
    """

    def __init__(self) -> None:
        self._memos: dict[_UpstreamServer, CapabilityMemo] = {}

    def of(self, upstream: UpstreamConfig) -> CapabilityMemo:
        """The memo of ``upstream``'s server, shared by all of its sessions."""
        key = _server(upstream)
        memo = self._memos.get(key)
        if memo is None:
            memo = self._memos[key] = CapabilityMemo()
        return memo

    def retain(self, upstreams: Iterable[UpstreamConfig]) -> None:
        """Forget the servers no upstream of the running config names."""
        keep = {_server(upstream) for upstream in upstreams}
        for key in self._memos.keys() - keep:
            del self._memos[key]


def _server(upstream: UpstreamConfig) -> _UpstreamServer:
    return (upstream.host.lower(), upstream.port, upstream.tls)


@dataclass(frozen=True, slots=True)
class RouterResources:
    """What every config generation's router shares: made once per process, it
    outlives reloads (the values are fixed; the objects they name keep their state)."""

    store: StoreSource
    locks: MailboxLocks
    capabilities: CapabilityMemos
    greeting_token: str  # random per process: a greeting with it, seen upstream, means a loop
    clock: Clock  # what retention policy reads as now (tests move it)
    # The upstream names of each config are declared in it; by default a Metrics nobody
    # reads (explain, tests).
    metrics: Metrics = field(default_factory=Metrics.unexported)
    # OAuth2 access tokens of the token upstreams' accounts (a reload keeps them).
    tokens: TokenCache = field(default_factory=TokenCache)
    # The store's facts kept in memory, where this process is the store's one writer
    # (sqlite); None reads the store at every login.
    facts: FactsCache | None = None


def mailbox_of(route: UpstreamRoute) -> UpstreamMailbox:
    """The lock key of an upstream account: the mailbox itself (host, port, user)."""
    return upstream_mailbox(route.upstream.host, route.upstream.port, route.user)


class MaildropRouter:
    """Opens each local user's maildrop: its Maildir, or a session with its upstream
    account seen through retention policy (DESIGN.md, routing). Several local users
    may share one upstream account; their sessions take turns (``MailboxLocks``).
    """

    def __init__(
        self,
        config: Config,
        upstream_tls: Mapping[str, ssl.SSLContext],
        shared: RouterResources,
    ) -> None:
        self._upstreams = config.upstreams
        self._policy = config.policy
        self._wait_seconds = config.limits.account_wait_seconds
        self._upstream_tls = upstream_tls
        self._shared = shared

    def route(self, user: UserConfig) -> Route:
        """The route ``user`` is served by (``NoRoute`` if its config names none)."""
        return route_of(user, self._upstreams)

    async def open(self, user: UserConfig, session_id: str) -> Maildrop:
        """The maildrop ``user`` is served from; ``MaildropError`` carries the client's -ERR."""
        try:
            route = self.route(user)
        except NoRoute:
            raise MaildropError(
                ResponseCode.SYS_PERM, "This account has no maildrop configured."
            ) from None
        match route:
            case MaildirRoute(path):
                # A Maildir is refused at once while another session has it (RFC 1939 §4).
                return await open_maildir(path, locks=self._shared.locks)
            case UpstreamRoute():
                return await self.open_upstream(route, user.name, session_id)

    async def open_upstream(
        self, route: UpstreamRoute, user: str, session_id: str
    ) -> RetainedMaildrop:
        """Log in to ``route``'s account for local user ``user`` and build its view.

        With ``exclusive_sessions`` the account's lock is held until the maildrop is
        closed: a second session waits ``limits.account_wait_seconds``, then gets
        ``[IN-USE]``. ``MaildropError`` carries the client's -ERR.
        """
        upstream = route.upstream
        if not upstream.exclusive_sessions:
            # No lock to hold: nothing to release when the maildrop closes.
            return await self._log_in(route, user, session_id, on_close=None)
        lock = contextlib.AsyncExitStack()
        try:
            hold = self._shared.locks.hold(mailbox_of(route), wait_seconds=self._wait_seconds)
            held = await lock.enter_async_context(hold)
            return await self._log_in(
                route, user, session_id, on_close=lock.aclose, confirm=held.confirm
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await lock.aclose()
            raise

    async def _log_in(
        self,
        route: UpstreamRoute,
        user: str,
        session_id: str,
        *,
        on_close: Callable[[], Awaitable[object]] | None,
        confirm: Callable[[], Awaitable[None]] | None = None,
    ) -> RetainedMaildrop:
        """``open_upstream`` once the account's lock, if any, is held: ``on_close``
        releases it (None: no lock), ``confirm`` is its ``Hold.confirm``."""
        shared = self._shared
        upstream = route.upstream
        store = await self._store()
        inner = await open_upstream(
            UpstreamAccount(upstream, route.user, route.credential),
            tls_context=self._upstream_tls.get(upstream.name),
            own_greeting_token=shared.greeting_token,
            metrics=shared.metrics.upstream(upstream.name),
            capabilities=shared.capabilities.of(upstream),
            session_id=session_id,
            tokens=shared.tokens,
        )
        retention = RetentionContext(
            account=AccountKey(upstream.name, route.user),
            user=user,
            session_id=session_id,
            policy=self._policy.for_user(user, upstream.name),
            store=store,
            clock=shared.clock,
            metrics=shared.metrics,
            facts_cache=shared.facts,
        )
        try:
            return await open_retained(inner, retention, on_close=on_close, confirm=confirm)
        except BaseException:
            with trio.CancelScope(shield=True):
                await inner.aclose()
            raise

    async def _store(self) -> StateStore:
        try:
            return await self._shared.store.get()
        except StateError as exc:
            log.error(  # noqa: TRY400 (the reason is in the line; a traceback adds nothing)
                "state_unavailable", extra={"fields": {"reason": str(exc)}}
            )
            raise MaildropError(ResponseCode.SYS_TEMP, "Mailbox state is unavailable.") from None
