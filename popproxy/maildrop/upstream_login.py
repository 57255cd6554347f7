"""Logging in upstream: the ``Login`` seam, password logins, and the opening steps.

``open_connection`` connects (``connection.py``), secures the connection as
configured (implicit TLS, or STLS that must be offered and must succeed before
any credential is sent; RFC 2595 §4, RFC 8314), checks the greeting, logs in
through a ``Login`` and takes the listing with UIDL and LIST. Where the
upstream advertises PIPELINING (RFC 2449 §6.6) the login and both listings go
out in one write, so a login costs one round trip after CAPA; and once an
upstream has said so (``CapabilityMemo``, kept per upstream), the next
connections send CAPA in that same write, so a login costs one round trip
after the greeting.

A ``Login`` says which commands log in to an upstream with the capabilities its
CAPA listed, and answers a SASL challenge. ``PasswordLogin`` is USER/PASS or
AUTH PLAIN with a stored password; token logins (XOAUTH2, OAUTHBEARER) are
further implementations of the same protocol.
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import trio

from popproxy import gc_pause
from popproxy.config import TlsMode, UpstreamConfig, UpstreamLogin
from popproxy.maildrop.connection import UpstreamConnection, UpstreamError, unavailable
from popproxy.maildrop.route import UpstreamCredential
from popproxy.maildrop.token_login import open_token_connection
from popproxy.metrics import Metrics, UpstreamMetrics
from popproxy.oauth2.cache import TokenAccount, TokenCache
from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.client_replies import (
    MAX_CAPABILITY_LINES,
    MAX_UPSTREAM_MESSAGES,
    Capabilities,
    ListedMessage,
    ListingError,
    login_refusal,
    parse_capabilities,
    parse_listings,
)
from popproxy.pop3.commands import Auth, Capa, Command, List, Pass, SaslLine, SaslResponse, Uidl
from popproxy.pop3.commands import User as UserCommand
from popproxy.pop3.events import SaslChallenge
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.secret import Secret

log = logging.getLogger("popproxy.upstream")

# SASL challenges one login answers: an empty one asking for the response, then an error
# (RFC 7628 §3.2.2); more is an upstream looping.
MAX_LOGIN_CHALLENGES = 2


class Login(Protocol):
    """A way to log in upstream, chosen per connection from the upstream's CAPA."""

    # Whether UIDL and LIST may follow the login commands in the same write (RFC 2449
    # §6.6). Not for a SASL exchange that may need a challenge answered: the server would
    # read the next command as the answer.
    @property
    def pipelined(self) -> bool:
        """True: the listing may be sent behind the login commands."""
        ...

    def commands(self, capabilities: Capabilities) -> tuple[Command, ...]:
        """The login commands for an upstream with ``capabilities`` (RFC 2449 §5), in order.

        The commands chosen for a remembered CAPA are compared with those for the
        fresh one, so equal inputs must give equal commands.
        """
        ...

    def respond(self, challenge: bytes) -> SaslLine:
        """The answer to a SASL challenge (decoded) to the AUTH sent (RFC 5034 §4).

        ``ValueError``: a challenge this login has no answer for (a protocol error).
        """
        ...

    def refused(self, reply: Err) -> UpstreamError:
        """What a ``-ERR`` to the login means for the local client (RFC 3206)."""
        ...


@dataclass(frozen=True, slots=True)
class PasswordLogin:
    """USER/PASS (RFC 1939 §7) or AUTH PLAIN (RFC 5034 §4, RFC 4616) with a password."""

    user: str
    password: Secret
    method: UpstreamLogin = UpstreamLogin.AUTO
    pipelined: bool = True  # USER/PASS and AUTH PLAIN with an initial response: one write

    def commands(self, capabilities: Capabilities) -> tuple[Command, ...]:
        """USER and PASS, or AUTH PLAIN with an initial response; ``auto`` takes PLAIN
        where CAPA lists it under SASL (RFC 2449 §6.3)."""
        method = self.method
        if method is UpstreamLogin.AUTO:
            sasl = {m.upper() for m in capabilities.get("SASL", ())}
            method = UpstreamLogin.PLAIN if "PLAIN" in sasl else UpstreamLogin.USER
        if method is UpstreamLogin.PLAIN:
            return (Auth("PLAIN", self._plain()),)
        return (UserCommand(self.user), Pass(self.password, self.user))

    def respond(self, challenge: bytes) -> SaslLine:
        """An upstream without initial-response support sends an empty challenge: the
        answer is the PLAIN response (RFC 5034 §4)."""
        return SaslResponse(self._plain())

    def refused(self, reply: Err) -> UpstreamError:
        """The stored password was refused, or the upstream says why not (RFC 3206)."""
        return _login_failure(reply)

    def _plain(self) -> Secret:
        """SASL PLAIN: empty authzid, authcid, password (RFC 4616 §2)."""
        return Secret(b"\0" + self.user.encode("utf-8") + b"\0" + self.password.reveal())


@dataclass(frozen=True, slots=True)
class UpstreamAccount:
    """Where and as whom one local user logs in upstream (DESIGN.md, routing): with a
    password, or with OAuth2 access tokens got with the refresh token in a file."""

    upstream: UpstreamConfig
    user: str
    credential: UpstreamCredential

    def login(self) -> Login:
        """The password login of this account, as the upstream's ``login`` says (a token
        account logs in through ``open_account``, which gets its token first)."""
        if not isinstance(self.credential, Secret):
            raise TypeError("a token account logs in through open_account")
        return PasswordLogin(self.user, self.credential, self.upstream.login)

    def token_account(self) -> TokenAccount | None:
        """The account's identity in the token cache, if it logs in with tokens."""
        credential = self.credential
        oauth2 = self.upstream.oauth2
        if isinstance(credential, Secret) or oauth2 is None:
            return None
        return TokenAccount(self.upstream.name, self.user, credential.path, oauth2)


@dataclass(slots=True)
class CapabilityMemo:
    """What one upstream's last CAPA reply said (RFC 2449 §5), kept between sessions.

    Once an upstream has said PIPELINING, the next session sends CAPA, the login
    and both listings in one write right after the greeting, and checks the fresh
    CAPA reply as it arrives: a login then costs one round trip. Every session's
    CAPA reply is compared with what is kept and replaces it when it differs, so a
    change on the upstream is seen at once (``remember``).
    Not frozen: shared by the sessions of one upstream (one trio thread).
    """

    capabilities: Capabilities | None = None  # None: no CAPA seen yet
    # The lines of the last CAPA reply ``remember_reply`` parsed, and what they gave.
    _reply: tuple[list[bytes], Capabilities] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def remember_reply(self, lines: list[bytes]) -> Capabilities:
        """``remember`` of the CAPA reply whose body is ``lines``: the same lines as the
        last reply's give the kept value without parsing them again (every login)."""
        kept = self._reply
        if kept is not None and kept[1] is self.capabilities and kept[0] == lines:
            return kept[1]
        capabilities = self.remember(parse_capabilities(lines))
        self._reply = (lines, capabilities)
        return capabilities

    def remember(self, capabilities: Capabilities) -> Capabilities:
        """Keep ``capabilities``, a session's fresh CAPA reply, as the last one, and
        return what the session is to hold: the kept value itself when the reply is
        equal to it, so that the sessions of one upstream share one read-only mapping
        (about 1 KiB each otherwise) while a changed reply still replaces it."""
        if self.capabilities is None or self.capabilities != capabilities:
            self.capabilities = MappingProxyType(dict(capabilities))
        return self.capabilities

    @property
    def pipelining(self) -> bool:
        """Whether the upstream's last CAPA listed PIPELINING (RFC 2449 §6.6)."""
        return self.capabilities is not None and "PIPELINING" in self.capabilities


async def open_account(
    account: UpstreamAccount,
    *,
    tls_context: ssl.SSLContext | None,
    tokens: TokenCache | None = None,
    own_greeting_token: str | None = None,
    metrics: UpstreamMetrics | None = None,
    capabilities: CapabilityMemo | None = None,
    session: str = "",
) -> tuple[UpstreamConnection, list[ListedMessage]]:
    """``open_connection`` with the account's own login: its password, or an OAuth2 access
    token from ``tokens`` (one refresh and one retry when the upstream says the token is
    no longer good; ``token_login.py``). ``session`` goes into the token log lines."""

    # A partial, not a closure: a password login calls open_connection with no frame of
    # its own between (every login).
    connect = functools.partial(
        open_connection,
        account.upstream,
        tls_context=tls_context,
        own_greeting_token=own_greeting_token,
        metrics=metrics,
        capabilities=capabilities,
    )
    token_account = account.token_account()
    if token_account is None:
        return await connect(account.login())
    if tokens is None:
        raise RuntimeError(f"upstream {account.upstream.name} logs in with tokens: pass tokens")
    return await open_token_connection(
        token_account,
        mechanism=account.upstream.auth,
        host=account.upstream.host,
        port=account.upstream.port,
        tokens=tokens,
        metrics=metrics,
        session=session,
        connect=connect,
    )


async def open_connection(
    upstream: UpstreamConfig,
    login: Login,
    *,
    tls_context: ssl.SSLContext | None,
    own_greeting_token: str | None = None,
    metrics: UpstreamMetrics | None = None,
    capabilities: CapabilityMemo | None = None,
) -> tuple[UpstreamConnection, list[ListedMessage]]:
    """Log in upstream and take the listing (RFC 1939 §4-§7, RFC 2449, RFC 2595, RFC 5034).

    Returns the logged-in connection and the upstream's messages in its order.
    Raises ``UpstreamError`` carrying the client's reply: ``[SYS/TEMP]`` when the
    upstream is unreachable, slow, not secured as configured or breaks the
    protocol; ``[SYS/PERM]`` when it rejects the stored credentials; its
    ``[IN-USE]`` and ``[LOGIN-DELAY]`` passed through (RFC 3206, RFC 2449 §8.1).
    An upstream greeting that holds ``own_greeting_token`` is this process itself.
    After the TCP connect (``connect_timeout_seconds``), TLS, greeting, login and
    listing all run under the upstream's ``login_timeout_seconds``.

    ``metrics``, bound to this upstream's name, gets the connect and login times,
    the attempt's outcome (one ``UpstreamFailure`` for a failed one; a cancelled
    attempt is not counted) and, through the connection, the rest of the session.
    Without it (tests) they go to an unexported Metrics, which nobody reads.

    ``capabilities``, one per upstream and shared by its sessions, remembers the
    upstream's last CAPA reply: where it listed PIPELINING, CAPA, the login and the
    listings go out in one write after the greeting (see ``CapabilityMemo``).
    """
    # Without the server's, a Metrics nobody reads: every path below counts the same.
    counted = metrics if metrics is not None else Metrics.unexported().upstream(upstream.name)
    try:
        connection = await UpstreamConnection.connect(upstream, counted)
        listing: list[ListedMessage] | None = None
        try:
            # A plain scope, not fail_after (a generator context manager): every session.
            deadline = trio.current_time() + upstream.login_timeout_seconds
            with trio.CancelScope(deadline=deadline):
                listing = await _open(
                    connection, login, tls_context, own_greeting_token, capabilities
                )
        except trio.TooSlowError:
            await connection.aclose()
            raise _login_timeout(upstream) from None
        except BaseException:
            await connection.aclose()
            raise
        if listing is None:  # the deadline passed
            await connection.aclose()
            raise _login_timeout(upstream)
    except UpstreamError as exc:
        counted.login_failed(exc.failure)
        if exc.failure in _NOT_LOGGED_YET:
            log.warning(
                "upstream_login_failed",
                extra={
                    "fields": {
                        "upstream": upstream.name,
                        "kind": exc.failure.value,
                        "reason": exc.detail,
                    }
                },
            )
        raise
    return connection, listing


def _login_timeout(upstream: UpstreamConfig) -> UpstreamError:
    return unavailable(
        UpstreamFailure.TIMEOUT,
        f"the login did not finish within {upstream.login_timeout_seconds:g} s",
    )


# Failures that no line of their own has logged by the time open_connection sees them
# (connect, TLS, STLS, protocol errors, a loop and a missing UIDL each have one).
_NOT_LOGGED_YET = frozenset(
    {
        UpstreamFailure.TIMEOUT,
        UpstreamFailure.REJECTED,
        UpstreamFailure.AUTH_REJECTED,
        UpstreamFailure.IN_USE,
        UpstreamFailure.LOGIN_DELAY,
    }
)


def _login_failure(reply: Err) -> UpstreamError:
    refusal = login_refusal(reply)
    code = f"[{reply.code.value}] " if reply.code is not None else ""
    return UpstreamError(
        refusal.failure,
        refusal.code,
        refusal.text,
        f"the upstream answered -ERR {code}to the login",
    )


async def _open(
    connection: UpstreamConnection,
    login: Login,
    context: ssl.SSLContext | None,
    own_greeting_token: str | None,
    memo: CapabilityMemo | None,
) -> list[ListedMessage]:
    upstream = connection.upstream
    if upstream.tls is TlsMode.IMPLICIT:
        await connection.secure(context)
    elif upstream.tls is TlsMode.NONE:
        connection.secured()
    greeting = await connection.status()
    if isinstance(greeting, Err):
        # No credential was sent: only [IN-USE] and [LOGIN-DELAY] say more than "unavailable".
        if greeting.code in (ResponseCode.IN_USE, ResponseCode.LOGIN_DELAY):
            raise _login_failure(greeting)
        raise unavailable(UpstreamFailure.REJECTED, "the upstream's greeting was -ERR")
    if own_greeting_token and own_greeting_token in greeting.text:
        log.error("upstream_is_popproxy_itself", extra={"fields": {"upstream": upstream.name}})
        raise UpstreamError(
            UpstreamFailure.LOOP,
            ResponseCode.SYS_PERM,
            "popproxy is configured to proxy to itself; contact your administrator.",
        )
    if upstream.tls is TlsMode.STARTTLS:
        await connection.starttls(context, await _capa(connection))
        # RFC 2595 §4: what was said in clear is forgotten; CAPA is asked again below.
    capabilities, login_seconds, uidl, sizes = await _capa_login_and_list(connection, login, memo)
    try:
        with gc_pause.paused():  # up to 100,000 entries
            listing = parse_listings(uidl, sizes)
    except ListingError as exc:
        raise connection.protocol_error(str(exc)) from None
    connection.logged_in(capabilities, login_seconds)
    return listing


async def _capa(connection: UpstreamConnection, memo: CapabilityMemo | None = None) -> Capabilities:
    """CAPA (RFC 2449 §5); an upstream without it has no capabilities."""
    await connection.send(Capa())
    return await _capa_reply(connection, memo)


async def _capa_reply(connection: UpstreamConnection, memo: CapabilityMemo | None) -> Capabilities:
    """The reply to a CAPA sent: ``-ERR`` means no capabilities (RFC 2449 §5); kept in
    ``memo`` if there is one (``CapabilityMemo.remember``)."""
    if isinstance(await connection.status(), Err):
        return {} if memo is None else memo.remember({})
    lines = await connection.body_lines(MAX_CAPABILITY_LINES)
    return parse_capabilities(lines) if memo is None else memo.remember_reply(lines)


async def _capa_login_and_list(
    connection: UpstreamConnection, login: Login, memo: CapabilityMemo | None
) -> tuple[Capabilities, float, list[bytes], list[bytes]]:
    """CAPA, then log in and list: in one write when ``memo`` says the upstream
    pipelines (a login in one round trip), else CAPA first and the rest as it says.

    The memo is updated from this session's CAPA reply either way; the reply is
    returned with the login's time and the two listings.
    """
    if memo is None or memo.capabilities is None or not memo.pipelining:
        capabilities = await _capa(connection, memo)
        commands = login.commands(capabilities)
        pipelining = "PIPELINING" in capabilities
        listed = await _login_and_list(connection, login, commands, pipelining=pipelining)
        return (capabilities, *listed)
    remembered = memo.capabilities
    commands = login.commands(remembered)
    sent_at = trio.current_time()
    listing = (Uidl(), List()) if login.pipelined else ()
    await connection.send(Capa(), *commands, *listing)
    capabilities = await _capa_reply(connection, memo)
    # An unchanged reply is the remembered mapping itself (``remember``), whose commands
    # are those sent: equal inputs give equal commands (``Login.commands``).
    stale = "PIPELINING" not in capabilities or (
        capabilities is not remembered and login.commands(capabilities) != commands
    )
    listed = await _login_and_list(
        connection, login, commands, pipelining=True, sent_at=sent_at, stale=stale
    )
    return (capabilities, *listed)


async def _login_and_list(
    connection: UpstreamConnection,
    login: Login,
    commands: Sequence[Command],
    *,
    pipelining: bool,
    sent_at: float | None = None,
    stale: bool = False,
) -> tuple[float, list[bytes], list[bytes]]:
    """Log in, then UIDL and LIST; one write for all of it with PIPELINING (RFC 2449 §6.6).
    Returns the login's time (sent to its +OK) and the two listings.

    Pipelined, a refused login makes UIDL and LIST fail harmlessly in AUTHORIZATION;
    their replies are not waited for: a server may close the connection after a refusal,
    and the refusal (``[IN-USE]``, ``[AUTH]``, ...) is what the client must hear.

    ``sent_at``: the commands already went out (behind a CAPA) at that time. ``stale``:
    they were chosen from a memo that this session's CAPA reply contradicts, so a
    refusal may be this popproxy's doing and is reported as temporary (RFC 3206
    ``[SYS/TEMP]``); the next session goes by the fresh reply.
    """
    started = trio.current_time() if sent_at is None else sent_at
    # The listing goes in the login's write only for a login that allows it (a password
    # login: one round trip); after a SASL exchange that may be challenged, it waits.
    listing_sent = pipelining and login.pipelined
    if sent_at is None and pipelining:
        await connection.send(*commands, *((Uidl(), List()) if listing_sent else ()))
    for command in commands:
        if not pipelining:
            await connection.send(command)
        reply = await connection.event()
        challenges = 0
        while isinstance(reply, SaslChallenge) and not listing_sent:
            # A challenge to the AUTH sent (RFC 5034 §4): the empty one of an exchange
            # without an initial response, or a token login's error (RFC 7628 §3.2.2).
            challenges += 1
            if challenges > MAX_LOGIN_CHALLENGES:
                raise connection.protocol_error("too many SASL challenges")
            try:
                answer = login.respond(reply.data)
            except ValueError as exc:
                raise connection.protocol_error(str(exc)) from None
            await connection.send(answer)
            reply = await connection.event()
        if not isinstance(reply, Ok | Err):
            raise connection.protocol_error("expected a status line")
        if isinstance(reply, Err):
            if stale:
                raise unavailable(
                    UpstreamFailure.REJECTED,
                    "the upstream refused a login its last CAPA reply had offered",
                )
            raise login.refused(reply)
    login_seconds = trio.current_time() - started
    if pipelining and not listing_sent:
        await connection.send(Uidl(), List())
    elif not pipelining:
        await connection.send(Uidl())
    uidl = await _listing(connection)
    if not pipelining:
        await connection.send(List())
    sizes = await _listing(connection)
    if uidl is None or sizes is None:
        log.warning(
            "upstream_without_uidl", extra={"fields": {"upstream": connection.upstream.name}}
        )
        raise UpstreamError(
            UpstreamFailure.UNSUPPORTED,
            ResponseCode.SYS_PERM,
            "The mail provider does not support unique ids (UIDL).",
        )
    return login_seconds, uidl, sizes


async def _listing(connection: UpstreamConnection) -> list[bytes] | None:
    """The body of the next multi-line reply, or None if it was ``-ERR``."""
    if isinstance(await connection.status(), Err):
        return None
    return await connection.body_lines(MAX_UPSTREAM_MESSAGES)
