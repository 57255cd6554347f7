"""What a new session reads (one ``Runtime`` per config generation) and what outlives
every generation (one ``ProcessState`` per process).

A reload builds a whole new ``Runtime`` (config, server TLS context, authenticator,
maildrop router) with ``prepare_runtime`` and the server swaps it in one
assignment; on any error the old one stays. Whatever must survive a reload lives in
``ProcessState`` instead, made once at start: the password-hash queue, the credential
cache and the login-failure table (a reload never adds threads and never forgets who
failed or who was verified, docs/security.md), and the router's resources (the state
store, the mailbox locks, the upstream capability memos, the greeting token). With a
PostgreSQL store, also what every instance shares beside it (leases, login failures;
docs/scaling.md): the mailbox locks are then leases there. The OAuth2
access tokens live there too, so a reload never makes every account refresh its token.
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from popproxy.auth.authenticator import Authenticator, HashQueue
from popproxy.auth.cache import CredentialCache
from popproxy.auth.throttle import ThrottlePolicy, ThrottleTable
from popproxy.auth.throttling import LocalThrottle, LoginThrottle, SharedThrottle
from popproxy.config import Config, ConfigError
from popproxy.known_sources import KnownSourcePolicy, KnownSources
from popproxy.locks import InProcessLocks, MailboxLocks
from popproxy.maildrop.retention import Clock
from popproxy.maildrop.route import (
    RefreshTokenFile,
    Route,
    UpstreamRoute,
    route_of,
    source_route,
)
from popproxy.maildrop.router import CapabilityMemos, MaildropRouter, RouterResources
from popproxy.metrics import Metrics
from popproxy.oauth2.cache import TokenCache
from popproxy.reload import (
    ConfigChanges,
    ConfigLoader,
    config_changes,
    effective_config,
    reload_problem,
)
from popproxy.shared_locks import SharedLocks
from popproxy.state import POSTGRES_SCHEMES
from popproxy.state.facts_cache import FactsCache
from popproxy.state.opener import SharedOpener, StoreOpener
from popproxy.tls import LoadedTls, TlsError, load_server_tls, upstream_tls_contexts

# A reload_failed line names at most this many config problems (check-config lists all).
MAX_REASON_ISSUES = 3


@dataclass(frozen=True, slots=True)
class ProcessState:
    """Everything that outlives reloads: made once per process, shared by every
    config generation (the values are fixed; the objects they name keep their state)."""

    hash_queue: HashQueue
    credentials: CredentialCache
    throttle: LoginThrottle  # this process's counts, or (PostgreSQL) every instance's
    store: StoreOpener  # opened on first need, closed when the server stops
    maildrops: RouterResources
    known_sources: KnownSources  # in the store; this process's memory of it
    # With a PostgreSQL store: the leases and login failures shared by every instance
    # (docs/scaling.md), and the mailbox locks on those leases (also in ``maildrops``).
    shared: SharedOpener | None = None
    shared_locks: SharedLocks | None = None

    @classmethod
    def start(cls, config: Config, *, metrics: Metrics, clock: Clock) -> ProcessState:
        """The process state of a server started with ``config``."""
        store = StoreOpener(config.state, metrics)
        shared: SharedOpener | None = None
        shared_locks: SharedLocks | None = None
        locks: MailboxLocks = InProcessLocks()
        throttle: LoginThrottle = LocalThrottle(ThrottleTable())
        if config.state.url.startswith(POSTGRES_SCHEMES):
            shared = SharedOpener(config.state, metrics)
            locks = shared_locks = SharedLocks(shared, lease_seconds=config.state.lease_seconds)
            throttle = SharedThrottle(shared)
        tokens = TokenCache(on_refresh=metrics.oauth2_refresh)
        return cls(
            hash_queue=HashQueue(),
            credentials=CredentialCache(config.limits.auth_cache_size),
            throttle=throttle,
            store=store,
            known_sources=KnownSources(store, KnownSourcePolicy.of(config.limits), clock),
            shared=shared,
            shared_locks=shared_locks,
            maildrops=RouterResources(
                store=store,
                locks=locks,
                capabilities=CapabilityMemos(),
                # Random per process: a greeting with it, seen upstream, means a loop.
                greeting_token=secrets.token_hex(6),
                clock=clock,
                metrics=metrics,
                tokens=tokens,
                # sqlite: one process writes the file, so it can keep the facts coherent.
                facts=FactsCache() if config.state.url.startswith("sqlite:///") else None,
            ),
        )

    async def start_background(
        self, nursery: trio.Nursery, policy: Callable[[], ThrottlePolicy]
    ) -> None:
        """Start the tasks of the process state in ``nursery`` (cancelled with the
        server): with a PostgreSQL store, the renewal of this process's leases and the
        pruning of the shared login failures (``policy``: the current knobs)."""
        if self.shared_locks is not None:
            await nursery.start(self.shared_locks.run)
        if isinstance(self.throttle, SharedThrottle):
            await nursery.start(self.throttle.run, policy)

    def adopt(self, config: Config) -> None:
        """Fit the caches to the config just swapped in: a changed or removed
        password_hash invalidates its cached logins at once (a lookup checks the hash
        too; this frees their memory), and upstreams no longer configured are forgotten."""
        users = config.users
        self.credentials.retain({name: user.password_hash for name, user in users.items()})
        self.credentials.resize(config.limits.auth_cache_size)
        self.known_sources.adopt(config.limits)
        self.maildrops.capabilities.retain(config.upstreams.values())
        self.maildrops.tokens.retain(token_accounts(config))


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything a new session reads, swapped whole by a reload."""

    config: Config
    tls: LoadedTls | None
    authenticator: Authenticator
    router: MaildropRouter
    expire: str  # CAPA EXPIRE before login (RFC 2449 §6.7)

    @classmethod
    def build(
        cls,
        config: Config,
        tls: LoadedTls | None,
        upstream_tls: Mapping[str, ssl.SSLContext],
        process: ProcessState,
    ) -> Runtime:
        """The runtime of ``config``, sharing ``process``'s state."""
        return cls(
            config,
            tls,
            Authenticator(
                config.users, config.limits, queue=process.hash_queue, cache=process.credentials
            ),
            MaildropRouter(config, upstream_tls, process.maildrops),
            config.policy.expire_before_login(),
        )


class ReloadFailed(Exception):
    """A reload was refused; the message is the reason logged (never a secret)."""


async def prepare_runtime(
    running: Config, load: ConfigLoader, process: ProcessState
) -> tuple[Runtime, ConfigChanges]:
    """Load a new config (in a worker thread) and build its runtime, changing nothing.

    Keys that need a restart keep their running values (``effective_config``).
    ``ReloadFailed`` says why the new config cannot be used.
    """
    try:
        new = await trio.to_thread.run_sync(load)
    except ConfigError as exc:
        raise ReloadFailed(_config_error_reason(exc)) from None
    effective = effective_config(running, new)
    problem = reload_problem(effective)
    if problem is not None:
        raise ReloadFailed(problem)
    try:
        tls = await load_server_tls(effective.tls)
        upstream_tls = await upstream_tls_contexts(effective)
    except TlsError as exc:
        raise ReloadFailed(str(exc)) from None
    return Runtime.build(effective, tls, upstream_tls, process), config_changes(running, new)


def _config_error_reason(exc: ConfigError) -> str:
    """The first few config problems on one line (each names file, key path and what was wrong)."""
    shown = "; ".join(str(issue) for issue in exc.issues[:MAX_REASON_ISSUES])
    more = len(exc.issues) - MAX_REASON_ISSUES
    return shown + (f"; and {more} more (run popproxy check-config)" if more > 0 else "")


def reload_summary(changes: ConfigChanges, old: Runtime, new: Runtime) -> dict[str, object]:
    """The fields of the ``reloaded`` line: what changed, in counts (no user names)."""
    if new.tls is None:
        tls = "none"
    elif old.tls is None or old.tls.digest != new.tls.digest:
        tls = "changed"
    else:
        tls = "unchanged"
    return {
        "changed": ",".join(changes.sections) or "none",
        "users": len(new.config.users),
        "users_added": len(changes.users.added),
        "users_removed": len(changes.users.removed),
        "users_changed": len(changes.users.changed),
        "tls": tls,
        "restart_required": len(changes.restart_required),
    }


def token_accounts(config: Config) -> set[tuple[str, str]]:
    """The (upstream, upstream user) of every account of ``config`` that logs in with
    OAuth2 tokens: proxy users' and gateway sources' routes (``TokenCache.retain``)."""
    upstreams = config.upstreams
    users = config.users.values()
    routes: list[Route] = [route_of(user, upstreams) for user in users]
    routes += [source_route(source, upstreams) for user in users for source in user.fetch]
    return {
        (route.upstream.name, route.user)
        for route in routes
        if isinstance(route, UpstreamRoute) and isinstance(route.credential, RefreshTokenFile)
    }
