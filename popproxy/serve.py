"""Listeners, the session limit and graceful shutdown.

Theory of operation. ``serve`` binds every configured listener, then runs one
accept loop per listening socket inside an *acceptor* nursery, and one task per
client inside a *session* nursery that outlives it. When ``shutdown`` is set it
stops accepting (the acceptor nursery is cancelled and the sockets closed),
gives live sessions ``shutdown_grace_seconds`` to finish, and then cancels
them. A cancelled session never reaches UPDATE, so it deletes nothing.

Over ``max_sessions``, a new connection gets ``-ERR [SYS/TEMP]`` and is closed
at once instead of waiting in the kernel backlog.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import ssl
from collections.abc import Mapping, Sequence

import trio

from popproxy.auth.authenticator import Authenticator
from popproxy.config import Config, ListenerConfig, TlsMode, UserConfig
from popproxy.maildrop.base import Maildrop, MaildropError
from popproxy.maildrop.maildir import open_maildir
from popproxy.maildrop.upstream import UpstreamAccount, open_upstream
from popproxy.pop3.replies import Err, ResponseCode
from popproxy.pop3.wire import format_status
from popproxy.session import SessionContext, run_session
from popproxy.tls import client_context, server_context

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


class ServeError(Exception):
    """The server cannot start as configured (bad certificate, port in use, ...)."""


class MaildropRouter:
    """Opens each local user's maildrop: its Maildir, or a session with its upstream
    account (DESIGN.md, routing). Several local users may share one upstream account.
    """

    def __init__(
        self,
        config: Config,
        upstream_tls: Mapping[str, ssl.SSLContext],
        *,
        greeting_token: str,
    ) -> None:
        self._upstreams = config.upstreams
        self._upstream_tls = upstream_tls
        self._greeting_token = greeting_token

    async def open(self, user: UserConfig) -> Maildrop:
        """The maildrop ``user`` is served from; ``MaildropError`` carries the client's -ERR."""
        if user.maildir is not None:
            return await open_maildir(user.maildir)
        if user.upstream is None or user.upstream_user is None or user.upstream_password is None:
            raise MaildropError(ResponseCode.SYS_PERM, "This account has no maildrop configured.")
        upstream = self._upstreams[user.upstream]
        account = UpstreamAccount(upstream, user.upstream_user, user.upstream_password)
        return await open_upstream(
            account,
            tls_context=self._upstream_tls.get(upstream.name),
            own_greeting_token=self._greeting_token,
        )


async def upstream_tls_contexts(config: Config) -> dict[str, ssl.SSLContext]:
    """A client TLS context per upstream that uses TLS, built once (reads CA files)."""
    contexts: dict[str, ssl.SSLContext] = {}
    for name, upstream in config.upstreams.items():
        if upstream.tls is TlsMode.NONE:
            continue
        try:
            contexts[name] = await trio.to_thread.run_sync(client_context, upstream)
        except (OSError, ssl.SSLError) as exc:
            raise ServeError(f"cannot load the CA file of upstream {name}: {exc}") from exc
    return contexts


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "-"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """The listeners and the sessions of one running configuration."""

    def __init__(
        self,
        config: Config,
        tls_context: ssl.SSLContext | None,
        upstream_tls: Mapping[str, ssl.SSLContext] | None = None,
    ) -> None:
        self.config = config
        self._tls_context = tls_context
        self._authenticator = Authenticator(config.users)
        # Random per process: a greeting with it, seen upstream, means a loop.
        self._greeting_token = secrets.token_hex(6)
        self._router = MaildropRouter(
            config, upstream_tls or {}, greeting_token=self._greeting_token
        )
        self._active = 0
        self._refusing = 0
        self._shutting_down = False
        self._drained = trio.Event()

    def session_context(self, listener: ListenerConfig) -> SessionContext:
        return SessionContext(
            listener=listener.name,
            limits=self.config.limits,
            authenticator=self._authenticator,
            open_maildrop=self._router.open,
            tls_context=self._tls_context,
            greeting_token=self._greeting_token,
            stls_available=listener.tls is TlsMode.STARTTLS,
            implicit_tls=listener.tls is TlsMode.IMPLICIT,
            allow_plaintext_auth=self.config.allow_plaintext_auth,
        )

    async def accept_loop(
        self, listener: trio.SocketListener, context: SessionContext, sessions: trio.Nursery
    ) -> None:
        """Accept clients until cancelled; each gets its own task (or a refusal)."""
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                log.warning("accept_failed", extra={"fields": {"errno": exc.errno}})
                await trio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            if self._active >= self.config.limits.max_sessions:
                log.warning("session_refused", extra={"fields": {"reason": "max_sessions"}})
                if self._refusing < MAX_PENDING_REFUSALS:
                    self._refusing += 1
                    sessions.start_soon(self._refuse, stream)
                else:
                    await trio.aclose_forcefully(stream)
            else:
                self._active += 1
                sessions.start_soon(self._handle, stream, context)

    async def _handle(self, stream: trio.SocketStream, context: SessionContext) -> None:
        try:
            await run_session(stream, _peer_name(stream), context)
        except Exception:
            # A bug in one session must not take the server down; the client sees a
            # closed connection, never an exception name (DESIGN.md, habit 6).
            log.exception("session_crashed")
        finally:
            self._active -= 1
            if self._shutting_down and self._active == 0:
                self._drained.set()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REFUSAL_SEND_TIMEOUT_SECONDS):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(format_status(TOO_MANY_SESSIONS))
            await trio.aclose_forcefully(stream)
        finally:
            self._refusing -= 1

    async def drain(self) -> None:
        """Give live sessions the grace period, then return (the caller cancels them)."""
        self._shutting_down = True
        if self._active == 0:
            return
        log.info("draining", extra={"fields": {"sessions": self._active}})
        with trio.move_on_after(self.config.limits.shutdown_grace_seconds):
            await self._drained.wait()


async def _bind(listener: ListenerConfig) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(listener.port, host=listener.address)
    except OSError as exc:
        raise ServeError(f"cannot listen on {listener.address}:{listener.port}: {exc}") from exc


async def serve(
    config: Config,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[Sequence[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the configured listeners until ``shutdown`` is set, then drain and return.

    ``task_status.started`` gets the bound (address, port) of each listener, in
    config order, so ``port: 0`` can be used in tests.
    """
    tls_context = None
    if config.tls is not None:
        try:
            tls_context = await trio.to_thread.run_sync(server_context, config.tls)
        except (OSError, ssl.SSLError) as exc:
            raise ServeError(f"cannot load the TLS certificate or key: {exc}") from exc
    server = Server(config, tls_context, await upstream_tls_contexts(config))
    bound: list[tuple[ListenerConfig, list[trio.SocketListener]]] = []
    try:
        for listener in config.listen:
            bound.append((listener, await _bind(listener)))
        await _run(server, bound, shutdown, task_status)
    finally:
        with trio.CancelScope(shield=True):
            for _, sockets in bound:
                for sock in sockets:
                    await sock.aclose()


async def _run(
    server: Server,
    bound: Sequence[tuple[ListenerConfig, Sequence[trio.SocketListener]]],
    shutdown: trio.Event,
    task_status: trio.TaskStatus[Sequence[tuple[str, int]]],
) -> None:
    ports: list[tuple[str, int]] = []
    async with trio.open_nursery() as sessions:
        async with trio.open_nursery() as acceptors:
            for listener, sockets in bound:
                context = server.session_context(listener)
                for sock in sockets:
                    acceptors.start_soon(server.accept_loop, sock, context, sessions)
                address, port = sockets[0].socket.getsockname()[:2]
                ports.append((address, port))
                log.info(
                    "listening",
                    extra={"fields": {"listener": listener.name, "address": address, "port": port}},
                )
            log.info("ready")
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
