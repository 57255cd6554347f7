"""Listeners, the session limit and graceful shutdown.

Theory of operation. ``serve`` binds every configured listener, then runs one
accept loop per listening socket inside an *acceptor* nursery, and one task per
client inside a *session* nursery that outlives it. When ``shutdown`` is set it
stops accepting (the acceptor nursery is cancelled and the sockets closed),
gives live sessions ``shutdown_grace_seconds`` to finish, and then cancels
them. A cancelled session never reaches UPDATE, so it deletes nothing.

Over ``max_sessions``, a new connection gets ``-ERR [SYS/TEMP]`` and is closed
at once instead of waiting in the kernel backlog; so does one from a client
address (an IPv6 /64) that already has ``max_sessions_per_ip`` sessions. On an
implicit TLS listener the refusal is a close without a word: a status line in
clear would only garble the client's TLS handshake.

PROXY protocol. On a listener with ``proxy_protocol: true`` a connection from
outside ``trusted_proxies`` is closed at once (as Dovecot's
``haproxy_trusted_networks``); from a trusted proxy, a v1 or v2 header must
arrive within ``PROXY_HEADER_TIMEOUT_SECONDS`` (and the login timeout, which
counts from the accept). The address it names is the session's peer: in the
logs, for the per-address limit and for login throttling. A v2 LOCAL header
(a health check) or an UNKNOWN one keeps the proxy's own address. Octets after
the header are the session's (a TLS handshake on an implicit TLS listener).

Reload. The settings a session reads live in one immutable ``Runtime`` (config,
server TLS context, authenticator, maildrop router with the upstream TLS contexts;
popproxy/runtime.py, which also holds the ``ProcessState`` that outlives reloads).
Each accepted connection takes the runtime current at that moment, so a session
keeps the config it started with. ``Server.reload`` has a new config loaded and
checked and all of these built first, and only then swaps the runtime in one
assignment; on any error the old one stays (popproxy/reload.py says which keys a
reload applies and which need a restart).

Metrics. One ``popproxy.metrics.Metrics`` per process, built by the caller (the
CLI) on its own registry and passed in. The server declares the listener and
upstream names in it before any session can use them (at start, and before a
reload swaps the runtime in), publishes the session limit and the reload gauges,
counts refusals, and hands it to every session and upstream connection. With
``metrics:`` configured, ``serve`` also runs the exporter (``start_exporter``),
which stays up through the drain and stops with the server.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence

import trio
from prometheus_client import CollectorRegistry

from popproxy.acceptor import Acceptor
from popproxy.background import Background, keep_snapshot
from popproxy.binding import bind_listener
from popproxy.config import Config, ListenerConfig, TlsMode
from popproxy.gateway.leases import LeasedPoller
from popproxy.gateway.schedule import Scheduler
from popproxy.maildrop.retention import Clock, utc_now
from popproxy.metrics import ConnectionRejection, Metrics
from popproxy.metrics_exporter import ExporterBindError, start_exporter
from popproxy.peer import PeerAddress
from popproxy.policy import DEFAULT_RULE
from popproxy.pop3.replies import Err, ResponseCode
from popproxy.pop3.wire import format_status
from popproxy.proxy_protocol import HeaderKind, ProxyHeader, ProxyProtocolError
from popproxy.proxy_stream import PrefixedStream, read_proxy_header
from popproxy.reload import ConfigLoader, ReloadOutcome
from popproxy.runtime import (
    ProcessState,
    ReloadFailed,
    Runtime,
    prepare_runtime,
    reload_summary,
)
from popproxy.sdnotify import Notifier
from popproxy.session import Session
from popproxy.session_context import SessionContext
from popproxy.socket_stream import TcpStream
from popproxy.state.audit_trim import trim_audit_periodically
from popproxy.state.base import StateError
from popproxy.tls import LoadedTls, TlsError, load_server_tls, upstream_tls_contexts

log = logging.getLogger("popproxy.serve")

# Accept errors that mean "out of a resource, try again soon" (as in trio's serve_listeners).
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_SECONDS = 0.1
# How long a refused client may take to receive its one -ERR line.
REFUSAL_SEND_TIMEOUT_SECONDS = 1.0
# Refusals being written at once; past this a connection over the limit is closed
# without a word, so a flood cannot hold more tasks and sockets than this.
MAX_PENDING_REFUSALS = 64
TOO_MANY_SESSIONS = Err("Too many connections, try again later.", ResponseCode.SYS_TEMP)
TOO_MANY_FROM_ADDRESS = Err("Too many connections from your address.", ResponseCode.SYS_TEMP)
# proxy-protocol.txt §2: a receiver may give up on a header not seen "within a few
# seconds (at least 3 seconds to cover a TCP retransmit)"; the proxy sends it at once.
PROXY_HEADER_TIMEOUT_SECONDS = 5.0

OnReload = Callable[[ReloadOutcome], None]


class ServeError(Exception):
    """The server cannot start as configured (bad certificate, port in use, ...)."""


class Server:
    """The listeners and the sessions of one running server, and its current config."""

    def __init__(
        self,
        config: Config,
        tls: LoadedTls | None,
        upstream_tls: Mapping[str, ssl.SSLContext] | None = None,
        *,
        notifier: Notifier | None = None,
        on_reload: OnReload | None = None,
        metrics: Metrics | None = None,
        clock: Clock = utc_now,
    ) -> None:
        # Without one from the caller the server counts into a registry of its own,
        # so every code path is the same with or without an exporter.
        self.metrics = metrics if metrics is not None else Metrics(CollectorRegistry())
        self.clock = clock  # what retention reads as now, and the audit trim's
        # Outlives reloads (popproxy/runtime.py): the store is a restart key, a mailbox
        # stays locked across config generations while a session of either one uses it.
        self._process = ProcessState.start(config, metrics=self.metrics, clock=clock)
        self.store = self._process.store
        self.shared = self._process.shared  # PostgreSQL only: leases, login failures
        # OAuth2 access tokens and mailbox locks: shared by sessions and gateway polls.
        self.tokens = self._process.maildrops.tokens
        self.locks = self._process.maildrops.locks
        self._declare(config)
        self._runtime = Runtime.build(config, tls, upstream_tls or {}, self._process)
        self._notifier = notifier if notifier is not None else Notifier(None)
        self._on_reload = on_reload
        self.last_reload = ReloadOutcome(ok=True, at=time.time(), config=config)
        # Each listener's SessionContext for the runtime it was built from: the same for
        # every session until a reload swaps the runtime (one per listener name).
        self._contexts: dict[str, tuple[Runtime, ListenerConfig, SessionContext]] = {}
        self._active = 0
        # Sessions per client address (PeerAddress.limit_key); an entry exists only while
        # its count is above 0, so the table never has more than max_sessions entries.
        self._per_address: dict[str, int] = {}
        self._refusing = 0
        self._shutting_down = False
        self._drained = trio.Event()

    @property
    def config(self) -> Config:
        """The config in effect for new sessions (listeners, metrics and state as started)."""
        return self._runtime.config

    async def start_background(self, nursery: trio.Nursery) -> None:
        """Start what runs beside the sessions for the whole life of the server: with a
        PostgreSQL store, the renewal of this process's leases and the pruning of the
        shared login failures (docs/scaling.md)."""
        await self._process.start_background(
            nursery, lambda: self._runtime.authenticator.throttle_policy
        )

    def _declare(self, config: Config) -> None:
        """Allow the names of ``config`` as metric labels (before any session can use them)."""
        token_upstreams = [up.name for up in config.upstreams.values() if up.oauth2 is not None]
        self.metrics.declare(
            listeners=[listener.name for listener in config.listen],
            upstreams=config.upstreams.keys(),
            rules=(*config.policy.rule_names, DEFAULT_RULE),
            oauth2_upstreams=token_upstreams,
        )
        tokens = self._process.maildrops.tokens
        for name in token_upstreams:
            self.metrics.track_oauth2_token_age(
                name, functools.partial(tokens.oldest_token_age, name)
            )
            self.metrics.track_oauth2_failing(name, tokens.failing_accounts)

    def session_context(self, listener: ListenerConfig) -> SessionContext:
        """The context of a session accepted now on ``listener`` (a listener bound at start):
        built once per listener and runtime, as nothing in it changes in between."""
        runtime = self._runtime
        cached = self._contexts.get(listener.name)
        if cached is not None and cached[0] is runtime and cached[1] is listener:
            return cached[2]
        context = self._build_context(runtime, listener)
        self._contexts[listener.name] = (runtime, listener, context)
        return context

    def _build_context(self, runtime: Runtime, listener: ListenerConfig) -> SessionContext:
        return SessionContext(
            listener=listener.name,
            limits=runtime.config.limits,
            authenticator=runtime.authenticator,
            open_maildrop=runtime.router.open,
            expire=runtime.expire,
            tls_context=runtime.tls.context if runtime.tls is not None else None,
            greeting_token=self._process.maildrops.greeting_token,
            stls_available=listener.tls is TlsMode.STARTTLS,
            implicit_tls=listener.tls is TlsMode.IMPLICIT,
            allow_plaintext_auth=runtime.config.allow_plaintext_auth,
            metrics=self.metrics,
            throttle=self._process.throttle,
            known_sources=self._process.known_sources,
        )

    async def accept_loop(
        self, sock: trio.SocketListener, listener: ListenerConfig, sessions: trio.Nursery
    ) -> None:
        """Accept clients until cancelled; each gets its own task (or a refusal)."""
        # popproxy's own stream (popproxy/socket_stream.py, popproxy/acceptor.py): an
        # accept, reply or command that the kernel completes at once skips trio's scheduler.
        with Acceptor(sock) as acceptor:
            while True:
                try:
                    stream, peer = await acceptor.accept()
                except OSError as exc:
                    if exc.errno not in _RESOURCE_ERRORS:
                        raise
                    log.warning("accept_failed", extra={"fields": {"errno": exc.errno}})
                    await trio.sleep(ACCEPT_RETRY_SECONDS)
                    continue
                if not peer.known:
                    # Reset before we got to it (a health check that connects and resets):
                    # nothing to serve, refuse or count.
                    await trio.aclose_forcefully(stream)
                elif self._active >= self.config.limits.max_sessions:
                    log.warning("session_refused", extra={"fields": {"reason": "max_sessions"}})
                    self.metrics.listener(listener.name).session_refused()
                    await self._refuse_soon(stream, listener, TOO_MANY_SESSIONS, sessions)
                elif not listener.proxy_protocol and not self._take_address_slot(peer):
                    # Counted here, before the next accept, so a burst cannot slip past it.
                    self._address_refused(peer, listener)
                    await self._refuse_soon(stream, listener, TOO_MANY_FROM_ADDRESS, sessions)
                else:
                    self._active += 1
                    context = self.session_context(listener)
                    sessions.start_soon(self._handle, stream, listener, peer, context)

    async def _handle(
        self,
        stream: TcpStream,
        listener: ListenerConfig,
        peer: PeerAddress,
        context: SessionContext,
    ) -> None:
        """Run one session; on a proxy_protocol listener, read the header first."""
        accepted_at = trio.current_time()
        counted: PeerAddress | None = None if listener.proxy_protocol else peer
        session_started = False  # from then on the session closes the stream
        try:
            client: trio.abc.Stream = stream
            if listener.proxy_protocol:
                proxied = await self._accept_proxied(stream, listener, peer, accepted_at)
                if proxied is None:
                    return
                header, prefix = proxied
                if header.kind is HeaderKind.PROXIED and header.source is not None:
                    peer = header.source
                    if not self._take_address_slot(peer):
                        self._address_refused(peer, listener)
                        await self._refuse(stream, _refusal(listener, TOO_MANY_FROM_ADDRESS))
                        return
                    counted = peer
                # else LOCAL (a health check) or UNKNOWN: the trusted proxy's own
                # connection, not a client's, so no per-address count.
                if prefix:
                    client = PrefixedStream(stream, prefix)
            session_started = True
            await Session(client, peer, context, accepted_at=accepted_at).run()
        except Exception:
            # A bug in one session must not take the server down; the client sees a
            # closed connection, never an exception name (DESIGN.md, habit 6).
            log.exception("session_crashed")
        finally:
            if not session_started:  # cancelled (shutdown) or failed before the session
                await trio.aclose_forcefully(stream)
            if counted is not None:
                self._release_address_slot(counted)
            self._active -= 1
            if self._shutting_down and self._active == 0:
                self._drained.set()

    async def _accept_proxied(
        self,
        stream: TcpStream,
        listener: ListenerConfig,
        proxy: PeerAddress,
        accepted_at: float,
    ) -> tuple[ProxyHeader, bytes] | None:
        """A trusted proxy's header and the octets after it, or None once the connection
        is closed (an untrusted source, a bad or late header)."""
        config = self.config
        ip = proxy.ip
        fields: dict[str, object] = {"listener": listener.name, "proxy": str(proxy)}
        if ip is None or not any(ip in network for network in config.trusted_proxies):
            log.warning("proxy_untrusted", extra={"fields": fields})
            self._rejected(listener, ConnectionRejection.UNTRUSTED_PROXY)
            await trio.aclose_forcefully(stream)
            return None
        wait = min(PROXY_HEADER_TIMEOUT_SECONDS, config.limits.login_timeout_seconds)
        try:
            with trio.fail_at(accepted_at + wait):
                header, prefix = await read_proxy_header(stream)
        except ProxyProtocolError as exc:
            fields["reason"] = str(exc)
        except trio.TooSlowError:
            fields["reason"] = "no complete header in time"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            fields["reason"] = "the connection was reset"
        else:
            return header, prefix
        log.warning("proxy_header_invalid", extra={"fields": fields})
        self._rejected(listener, ConnectionRejection.PROXY_HEADER)
        await trio.aclose_forcefully(stream)
        return None

    def _take_address_slot(self, peer: PeerAddress) -> bool:
        """Count a session for ``peer``'s address, unless it has max_sessions_per_ip."""
        key = peer.limit_key
        if not key:
            return True  # no address to count (the connection is already gone)
        count = self._per_address.get(key, 0)
        if count >= self.config.limits.max_sessions_per_ip:
            return False
        self._per_address[key] = count + 1
        return True

    def _release_address_slot(self, peer: PeerAddress) -> None:
        key = peer.limit_key
        if not key:
            return
        count = self._per_address[key] - 1
        if count:
            self._per_address[key] = count
        else:
            del self._per_address[key]

    def _address_refused(self, peer: PeerAddress, listener: ListenerConfig) -> None:
        fields = {"reason": "max_sessions_per_ip", "listener": listener.name, "peer": str(peer)}
        log.warning("session_refused", extra={"fields": fields})
        self._rejected(listener, ConnectionRejection.MAX_SESSIONS_PER_IP)

    def _rejected(self, listener: ListenerConfig, reason: ConnectionRejection) -> None:
        self.metrics.listener(listener.name).connection_rejected(reason)

    async def _refuse_soon(
        self,
        stream: TcpStream,
        listener: ListenerConfig,
        reply: Err,
        sessions: trio.Nursery,
    ) -> None:
        """Refuse in a task of its own, or close at once past MAX_PENDING_REFUSALS."""
        if self._refusing < MAX_PENDING_REFUSALS:
            self._refusing += 1
            sessions.start_soon(self._refuse_counted, stream, _refusal(listener, reply))
        else:
            await trio.aclose_forcefully(stream)

    async def _refuse_counted(self, stream: TcpStream, reply: Err | None) -> None:
        try:
            await self._refuse(stream, reply)
        finally:
            self._refusing -= 1

    async def _refuse(self, stream: TcpStream, reply: Err | None) -> None:
        """Send ``reply`` (if any) within REFUSAL_SEND_TIMEOUT_SECONDS, then close."""
        if reply is not None:
            with trio.move_on_after(REFUSAL_SEND_TIMEOUT_SECONDS):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(format_status(reply))
        await trio.aclose_forcefully(stream)

    async def reload(self, load: ConfigLoader) -> ReloadOutcome:
        """Load a new config and apply it to new sessions, all or nothing.

        ``load`` runs in a worker thread. The config, the server and upstream TLS
        contexts, the authenticator and the maildrop router are all built before
        anything is swapped; on any error the running config stays and
        ``msg=reload_failed`` says why. Keys that need a restart
        (popproxy.reload.RESTART_KEYS) are logged and left as they run.
        """
        self._notifier.reloading("reloading the config")
        try:
            runtime, changes = await prepare_runtime(self.config, load, self._process)
            # The last step before the swap, with no checkpoint in between: a session that
            # gets the new runtime finds its upstream's name declared (a name that cannot
            # be a label fails the reload here, and the running config stays).
            self._declare(runtime.config)
        except ReloadFailed as exc:
            outcome = self._reload_failed(str(exc))
        except Exception:
            # A bug in the reload path must not stop a server that is serving.
            log.exception("reload_crashed")
            outcome = self._reload_failed("internal error (see the reload_crashed line)")
        else:
            old = self._runtime
            self._runtime = runtime  # the one step that changes what new sessions get
            self._process.adopt(runtime.config)
            outcome = ReloadOutcome(ok=True, at=time.time(), config=runtime.config)
            if changes.restart_required:
                log.warning(
                    "restart_required",
                    extra={"fields": {"keys": ",".join(changes.restart_required)}},
                )
            log.info("reloaded", extra={"fields": reload_summary(changes, old, runtime)})
            self._notifier.ready("serving; config reloaded")
        self._record(outcome)
        if outcome.ok:
            await self.keep_snapshot()
        return outcome

    async def keep_snapshot(self) -> None:
        """Keep a copy of the files the running config was loaded from."""
        await keep_snapshot(self.config)

    def _reload_failed(self, reason: str) -> ReloadOutcome:
        log.error("reload_failed", extra={"fields": {"reason": reason}})
        self._notifier.ready(f"serving; the last reload failed: {reason}")
        return ReloadOutcome(ok=False, at=time.time(), config=self.config, reason=reason)

    def _record(self, outcome: ReloadOutcome) -> None:
        self.last_reload = outcome
        # The reload gauges: a failure keeps the time of the last success.
        self.metrics.config_loaded(successful=outcome.ok, timestamp=outcome.at)
        self.metrics.set_session_limit(outcome.config.limits.max_sessions)
        if self._on_reload is None:
            return
        try:
            self._on_reload(outcome)
        except Exception:
            # A broken hook (metrics) must not take down a server that is serving.
            log.exception("reload_hook_failed")

    def started(self, ports: Sequence[tuple[str, int]]) -> None:
        """Every listener is bound: log ``ready``, tell systemd, report the initial load."""
        log.info("ready")
        self._notifier.ready(f"serving on {len(ports)} listener(s)")
        self._record(self.last_reload)

    async def drain(self) -> None:
        """Give live sessions the grace period, then return (the caller cancels them)."""
        self._shutting_down = True
        self._notifier.stopping(f"stopping; {self._active} session(s) open")
        if self._active == 0:
            return
        log.info("draining", extra={"fields": {"sessions": self._active}})
        with trio.move_on_after(self.config.limits.shutdown_grace_seconds):
            await self._drained.wait()


def _refusal(listener: ListenerConfig, reply: Err) -> Err | None:
    """The refusal line for ``listener``: none where the client starts with TLS."""
    return None if listener.tls is TlsMode.IMPLICIT else reply


async def _bind(listener: ListenerConfig) -> list[trio.SocketListener]:
    try:
        return await bind_listener(listener)
    except OSError as exc:
        raise ServeError(f"cannot listen on {listener.address}:{listener.port}: {exc}") from exc


async def serve(
    config: Config,
    *,
    shutdown: trio.Event,
    reloads: trio.abc.ReceiveChannel[ConfigLoader] | None = None,
    notifier: Notifier | None = None,
    on_reload: OnReload | None = None,
    metrics: Metrics | None = None,
    clock: Clock = utc_now,
    poll_requests: trio.abc.ReceiveChannel[None] | None = None,
    task_status: trio.TaskStatus[Sequence[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the configured listeners until ``shutdown`` is set, then drain and return.

    ``task_status.started`` gets the bound (address, port) of each listener, in
    config order, so ``port: 0`` can be used in tests. Each loader received on
    ``reloads`` is applied with :meth:`Server.reload`, one at a time. ``notifier``
    gets READY/RELOADING/STOPPING (sd_notify); ``on_reload`` gets a
    :class:`ReloadOutcome` for the initial load and after every reload.

    ``clock`` is what retention policy reads as now (tests move it).
    The fetch gateway (popproxy/gateway/) runs beside the listeners, polling the
    ``fetch`` sources of the current config; each item received on ``poll_requests``
    (SIGUSR1) polls every source at once. It stops when the shutdown begins: a poll
    cut short deletes nothing upstream (docs/gateway.md).
    Everything is counted in ``metrics`` (one per process; a private one if None).
    With ``config.metrics`` set, its registry is served at ``/metrics`` from before
    ``msg=ready`` until the server has stopped (``msg=metrics_listening`` says where).
    """
    try:
        tls = await load_server_tls(config.tls)
        upstream_tls = await upstream_tls_contexts(config)
    except TlsError as exc:
        raise ServeError(str(exc)) from exc
    server = Server(
        config,
        tls,
        upstream_tls,
        notifier=notifier,
        on_reload=on_reload,
        metrics=metrics,
        clock=clock,
    )
    bound: list[tuple[ListenerConfig, list[trio.SocketListener]]] = []
    try:
        if config.uses_state:
            try:  # fail at start, not at the first login or poll
                await server.store.get()
                if server.shared is not None:
                    await server.shared.get()
            except StateError as exc:
                raise ServeError(str(exc)) from exc  # it names the store already
        for listener in config.listen:
            bound.append((listener, await _bind(listener)))
        async with trio.open_nursery() as exporter:
            if config.metrics is not None:
                try:
                    await start_exporter(exporter, config.metrics, server.metrics.registry)
                except ExporterBindError as exc:
                    raise ServeError(str(exc)) from exc
            gateway = Scheduler(
                LeasedPoller.fetching(
                    server.store.get, server.locks, clock, server.metrics, server.tokens
                ),
                lambda: server.config,
                metrics=server.metrics,
            )
            background = Background(reloads, gateway, poll_requests)
            # Beside the sessions, until they have drained: the lease renewer.
            await server.start_background(exporter)
            await _run(server, bound, shutdown, background, task_status)
            exporter.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for _, sockets in bound:
                for sock in sockets:
                    await sock.aclose()
            await server.store.aclose()
            if server.shared is not None:
                await server.shared.aclose()


async def _run(
    server: Server,
    bound: Sequence[tuple[ListenerConfig, Sequence[trio.SocketListener]]],
    shutdown: trio.Event,
    background: Background,
    task_status: trio.TaskStatus[Sequence[tuple[str, int]]],
) -> None:
    ports: list[tuple[str, int]] = []
    async with trio.open_nursery() as sessions:
        async with trio.open_nursery() as acceptors:
            for listener, sockets in bound:
                for sock in sockets:
                    acceptors.start_soon(server.accept_loop, sock, listener, sessions)
                address, port = sockets[0].socket.getsockname()[:2]
                ports.append((address, port))
                log.info(
                    "listening",
                    extra={"fields": {"listener": listener.name, "address": address, "port": port}},
                )
            server.started(ports)
            await server.keep_snapshot()
            acceptors.start_soon(background.apply_reloads, server)
            acceptors.start_soon(background.forward_poll_requests)
            await acceptors.start(background.gateway.run)
            if server.config.uses_state:
                # state is a restart key: the retention stays as the server started
                retention = server.config.state.audit_retention_days
                acceptors.start_soon(trim_audit_periodically, server.store, retention, server.clock)
            task_status.started(ports)
            await shutdown.wait()
            log.info("shutting_down")
            acceptors.cancel_scope.cancel()
        for _, sockets in bound:
            for sock in sockets:
                await sock.aclose()  # stop accepting: new clients are refused by the kernel
        await server.drain()
        sessions.cancel_scope.cancel()
    log.info("stopped")
