"""One client session: drives ``pop3.ServerConnection`` against a ``Maildrop``.

Theory of operation. The session owns the client stream, a sans-IO
``ServerConnection`` and, once logged in, a ``Maildrop``. It loops: take the
next event from the core, answer it, and read more octets only when the core
needs them. Replies are gathered in an output buffer that is flushed before
each read and whenever it grows past ``FLUSH_THRESHOLD_BYTES``, so a pipelined
burst gets batched answers and a RETR streams with back-pressure chunk by chunk.

Deadlines (DESIGN.md, habit 4): the whole AUTHORIZATION phase, TLS handshakes
included, must end within ``login_timeout_seconds``; after login each read
waits at most ``idle_timeout_seconds`` (RFC 1939 §3: at least ten minutes);
each write waits at most ``send_timeout_seconds``.

Deletions are only marks until QUIT in TRANSACTION (RFC 1939 §6); then the
maildrop commits them, and only then does the client get ``+OK``. Any other
end of the session (EOF, reset, timeout, shutdown, error) commits nothing.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import ssl
from collections.abc import Callable, Iterable, Sequence
from operator import attrgetter

import trio

from popproxy.auth.credentials import Credentials, login_credentials, plain_credentials
from popproxy.auth.login import LoginAttempt, LoginClient, LoginOutcome, log_in
from popproxy.config import UserConfig
from popproxy.logfmt import SESSION_ID
from popproxy.maildrop.base import Maildrop, MaildropError, MessageInfo
from popproxy.metrics import CommandResult, LoginMechanism, LoginResult, TlsResult
from popproxy.native_tls import accept_tls
from popproxy.outcomes import SessionResult
from popproxy.peer import PeerAddress
from popproxy.pop3 import sasl
from popproxy.pop3.capabilities import capabilities
from popproxy.pop3.commands import (
    Auth,
    Capa,
    Command,
    Dele,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    Rset,
    SaslCancel,
    SaslLine,
    SaslResponse,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    Verb,
)
from popproxy.pop3.errors import RemoteProtocolError
from popproxy.pop3.events import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    EndOfData,
    SaslChallenge,
    StuffedData,
)
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.pop3.sasl import LOGIN_PASSWORD_PROMPT, LOGIN_USERNAME_PROMPT
from popproxy.pop3.server import Reply, ServerConnection, ServerSettings
from popproxy.pop3.state import Phase
from popproxy.pop3.wire import format_status
from popproxy.secret import Secret
from popproxy.session_context import SessionContext
from popproxy.session_summary import (
    FAILURE_REASONS,
    FAILURE_RESULTS,
    LoginFailure,
    SessionSummary,
    quit_text,
)
from popproxy.socket_stream import TcpStream, wait_bounded
from popproxy.tls import AlpnRefused

# One read from the client; commands are tiny, so this only bounds a flood.
RECEIVE_CHUNK_BYTES = 16 * 1024
# Replies are batched up to this size before a write (pipelining, RFC 2449 §6.6).
FLUSH_THRESHOLD_BYTES = 64 * 1024
# How long a closing session may spend on a goodbye line or a TLS close_notify.
CLOSE_TIMEOUT_SECONDS = 2.0

GREETING_TEXT = "popproxy ready."
# Every failed login gets this line: wrong password, unknown user, and a lockout alike
# (docs/security.md, "Throttling and lockout": RFC 3206 §4 includes "an attempt to
# authenticate in violation of policy" in [AUTH]; RFC 2449 §8.1.2 [LOGIN-DELAY] is
# about logging in too often, not failing; Dovecot answers every failure so).
AUTH_FAILED = Err("Authentication failed.", ResponseCode.AUTH)
# RFC 3206 §4: [SYS/TEMP] is a temporary problem on the server's side; try again later.
VERIFICATION_BUSY = Err("Too many logins at once, try again later.", ResponseCode.SYS_TEMP)
# The shared login-failure counts cannot be read (docs/scaling.md): refused, no hash run.
LOGIN_UNAVAILABLE = Err("Logins are unavailable for now, try again later.", ResponseCode.SYS_TEMP)
NO_SUCH_MESSAGE = Err("There's no message with that number.")
MESSAGE_DELETED = Err("That message is deleted.")
_END_OF_DATA = EndOfData()
_SIZE = attrgetter("size")


class _SessionEnd(Exception):
    """Internal: unwinds the command loop with the way the session ended."""

    def __init__(self, result: SessionResult) -> None:
        super().__init__(result.value)
        self.result = result


class Session:
    """A POP3 server session over one client stream (RFC 1939, 2449, 2595, 5034)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: PeerAddress,
        context: SessionContext,
        *,
        accepted_at: float | None = None,
    ) -> None:
        """``peer`` is the client (behind a PROXY protocol header, the one it names);
        ``accepted_at`` (trio time, default now) starts the session's clock, so time
        spent on a PROXY protocol header counts against the login timeout."""
        self._stream = stream
        self._context = context
        self.peer = peer
        self._tls_active = False
        self._conn = ServerConnection(self._settings())
        self._out = bytearray()
        self._maildrop: Maildrop | None = None
        self._deleted: set[int] = set()
        # The last local login's upstream could not be opened (result upstream_error).
        self._upstream_failed = False
        self._login_scope = trio.CancelScope()
        self.summary = SessionSummary(secrets.token_hex(4), context.listener, str(peer))
        if accepted_at is not None:
            self.summary.started = accepted_at
        self._metrics = context.metrics
        # Bound once: the per-write byte counts of a RETR cost no label lookup.
        self._traffic = context.metrics.listener(context.listener)
        # The command whose status line is due (commands metric): its verb, None for
        # a line that did not parse. Counted when _queue sends the +OK or -ERR.
        self._verb: Verb | None = None
        self._status_due = False

    def _settings(self) -> ServerSettings:
        ctx = self._context
        return ServerSettings(
            stls_available=ctx.stls_available and not self._tls_active,
            plaintext_auth_allowed=self._tls_active or ctx.allow_plaintext_auth,
            max_bad_commands=ctx.limits.max_bad_commands,
            max_command_line_octets=ctx.limits.max_command_line_bytes,
            max_sasl_line_octets=ctx.limits.max_sasl_line_bytes,
            max_sasl_payload_octets=ctx.limits.max_sasl_payload_bytes,
        )

    async def run(self) -> SessionSummary:
        """Serve the client until QUIT, EOF, a timeout or a fatal error; never raises
        for the client's behaviour. Cancellation (shutdown) is recorded and re-raised."""
        limits = self._context.limits
        logging_as = SESSION_ID.set(self.summary.session_id)
        self._login_scope.deadline = self.summary.started + limits.login_timeout_seconds
        self._traffic.session_started()
        try:
            with self._login_scope:
                await self._serve()
            if self._login_scope.cancelled_caught:
                self.summary.result = SessionResult.TIMEOUT
                handshaking = self._conn.phase is Phase.TLS_HANDSHAKE or (
                    self._context.implicit_tls and not self._tls_active
                )
                if not handshaking:  # a status line in clear would garble a TLS handshake
                    await self._goodbye(Err("Disconnected: login timeout.", ResponseCode.SYS_TEMP))
        except _SessionEnd as end:
            self.summary.result = end.result
        except trio.Cancelled:
            self.summary.result = SessionResult.SHUTDOWN
            raise
        finally:
            self.summary.settle(len(self._deleted), upstream_failed=self._upstream_failed)
            await self._close()
            self._traffic.session_ended(self.summary.result)
            self.summary.log_end()
            SESSION_ID.reset(logging_as)
        return self.summary

    async def _serve(self) -> None:
        if self._context.implicit_tls:
            await self._start_tls()
            self._conn = ServerConnection(self._settings())
        token = self._context.greeting_token
        # Not in angle brackets: that would read as an APOP timestamp (RFC 1939 §7).
        self._queue(Ok(f"{GREETING_TEXT} ({token})" if token else GREETING_TEXT))
        while self._conn.phase is not Phase.CLOSED:
            try:
                event = self._conn.next_event()
            except RemoteProtocolError as exc:
                self._expect_status(self._conn.rejected_verb)
                self._queue(exc.reply)
                if exc.fatal:
                    await self._flush()
                    raise _SessionEnd(SessionResult.PROTOCOL_ERROR) from None
                continue
            if event is NEED_DATA:
                await self._flush()
                await self._receive()
            elif isinstance(event, ConnectionClosed):
                raise _SessionEnd(SessionResult.EOF)
            else:
                self.summary.commands += 1
                self._expect_status(event.verb)
                await self._dispatch(event)
        await self._flush()
        self.summary.result = SessionResult.QUIT

    async def _dispatch(self, command: Command | SaslLine) -> None:
        match command:  # the commands of TRANSACTION first: they come most often
            case Retr(msg=msg):
                if (found := self._message(msg)) is not None:
                    await self._stream_message(msg, f"{found.size} octets", None)
            case Top(msg=msg, lines=body_lines):
                if self._message(msg) is not None:
                    await self._stream_message(msg, "Top of message follows", body_lines)
            case Dele(msg=msg):
                if self._message(msg) is not None:
                    self._deleted.add(msg - 1)
                    self._queue(Ok(f"Message {msg} marked for deletion."))
            case Stat():
                count, octets = self._totals()
                self._queue(Ok(f"{count} {octets}"))
            case List(msg=None):
                await self._scan_listing(lambda n, m: f"{n} {m.size}")
            case List(msg=int(msg)):
                if (found := self._message(msg)) is not None:
                    self._queue(Ok(f"{msg} {found.size}"))
            case Uidl(msg=None):
                await self._scan_listing(lambda n, m: f"{n} {m.uid}")
            case Uidl(msg=int(msg)):
                if (found := self._message(msg)) is not None:
                    self._queue(Ok(f"{msg} {found.uid}"))
            case Noop():
                self._queue(Ok())
            case Rset():
                self._deleted.clear()
                count, octets = self._totals()
                self._queue(Ok(f"Maildrop has {count} messages ({octets} octets)."))
            case Quit():
                await self._quit()
            case Capa():
                expire = self._context.expire if self._maildrop is None else self._maildrop.expire
                lines = capabilities(self._conn.settings, phase=self._conn.phase, expire=expire)
                await self._queue_multiline("Capability list follows", lines)
            case User():
                self._queue(Ok())
            case Pass(user=user, password=password):
                await self._login(Credentials(user, password), LoginMechanism.USER)
            case Auth(mechanism=None):
                # RFC 1734 §2 style listing, as Dovecot answers a bare AUTH.
                settings = self._conn.settings
                mechanisms = settings.sasl_mechanisms if settings.plaintext_auth_allowed else ()
                await self._queue_multiline("Supported SASL mechanisms follow", mechanisms)
            case Auth(mechanism=sasl.LOGIN, initial_response=None):
                self._queue(SaslChallenge(LOGIN_USERNAME_PROMPT))
            case Auth(mechanism=sasl.LOGIN) | SaslResponse(mechanism=sasl.LOGIN, earlier=()):
                self._queue(SaslChallenge(LOGIN_PASSWORD_PROMPT))
            case SaslResponse(mechanism=sasl.LOGIN, earlier=(name, *_), data=password):
                await self._login(login_credentials(name, password), LoginMechanism.LOGIN)
            case Auth(initial_response=None):
                self._queue(SaslChallenge(b""))
            case Auth(initial_response=Secret() as response) | SaslResponse(data=response):
                await self._login(plain_credentials(response), LoginMechanism.PLAIN)
            case SaslCancel():
                self._queue(Err("Authentication cancelled."))
            case Stls():
                self._queue(Ok("Begin TLS negotiation now."))
                await self._flush()
                await self._start_tls()
                self._conn.tls_established(self._settings())

    # -- AUTHORIZATION -------------------------------------------------------------

    async def _login(self, credentials: Credentials | None, mechanism: LoginMechanism) -> None:
        """Log in (popproxy/auth/login.py: throttle, verify, record), then open the
        maildrop (DESIGN.md, session data flow step 2).

        A throttle delay waits after what is queued has been sent; every refusal but
        a full hash queue gets the reply any failure gets, after the failure delay.
        """
        context = self._context
        client = LoginClient(self.summary.session_id, self.peer)
        attempt = await log_in(
            context.authenticator,
            context.throttle,
            client,
            credentials,
            before_wait=self._flush,
            known=context.known_sources,
        )
        match attempt:
            case LoginAttempt(user=UserConfig() as account):
                pass
            case LoginAttempt(outcome=LoginOutcome.BUSY):
                self._metrics.login(mechanism, LoginResult.ERROR)
                self.summary.login_failed(mechanism, LoginFailure.BUSY)
                self._queue(VERIFICATION_BUSY)
                return
            case LoginAttempt(outcome=LoginOutcome.UNAVAILABLE):
                self._metrics.login(mechanism, LoginResult.ERROR)
                self._queue(LOGIN_UNAVAILABLE)
                return
            case LoginAttempt(outcome=outcome):
                self._metrics.login(mechanism, FAILURE_RESULTS[outcome])
                reason = FAILURE_REASONS[outcome] if credentials is not None else None
                self.summary.login_failed(mechanism, reason or LoginFailure.MALFORMED)
                # Dovecot's auth_failure_delay: slow down guessing, same reply for every cause.
                await self._flush()
                await trio.sleep(context.limits.auth_failure_delay_seconds)
                self._queue(AUTH_FAILED)
                return
        # The local login succeeded: the session is this user's from here on, also if
        # its upstream then fails (the session_end line names who it failed for).
        self.summary.user = account.name
        self.summary.upstream = account.upstream
        try:
            maildrop = await context.open_maildrop(account, self.summary.session_id)
        except MaildropError as exc:
            # The password was right, but there is nothing to serve: an error, not a failure.
            self._metrics.login(mechanism, LoginResult.ERROR)
            self._upstream_failed = account.upstream is not None
            self._queue(Err(exc.text, exc.code))
            return
        self._metrics.login(mechanism, LoginResult.OK)
        self._upstream_failed = False
        self._maildrop = maildrop
        self._login_scope.deadline = math.inf
        count, octets = self._totals()
        self._queue(Ok(f"Logged in, {count} messages ({octets} octets)."))

    async def _start_tls(self) -> None:
        """Handshake as the TLS server (RFC 2595 §4, RFC 8314 §3.3) under the login deadline."""
        context = self._context.tls_context
        if context is None:  # the config loader makes this impossible for TLS listeners
            raise _SessionEnd(SessionResult.TLS_ERROR)
        done = False
        try:  # popproxy/native_tls.py: the ALPN check (ALPACA, RFC 7301), then OpenSSL
            tls = await accept_tls(self._stream, context)
            done = True
        except AlpnRefused as exc:
            self.summary.alpn_refused(exc.offered or ())
            raise _SessionEnd(SessionResult.TLS_ERROR) from None
        except (trio.BrokenResourceError, ssl.SSLError, OSError):
            raise _SessionEnd(SessionResult.TLS_ERROR) from None
        finally:
            # Not done also when the login deadline or a shutdown cut the handshake off.
            self._traffic.tls_handshake(TlsResult.OK if done else TlsResult.FAILED)
        self._stream = tls
        self._tls_active = True

    # -- TRANSACTION ---------------------------------------------------------------

    @property
    def _messages(self) -> Sequence[MessageInfo]:
        return self._maildrop.messages if self._maildrop is not None else ()

    def _totals(self) -> tuple[int, int]:
        """Messages not marked, and their octets (one pass in C with none marked: the
        login's and most STATs' case, over up to 100,000 messages)."""
        messages, deleted = self._messages, self._deleted
        if not deleted:
            return len(messages), sum(map(_SIZE, messages))
        live = [m for i, m in enumerate(messages) if i not in deleted]
        return len(live), sum(map(_SIZE, live))

    def _message(self, msg: int) -> MessageInfo | None:
        """The message numbered ``msg``, or queue the -ERR and return None (RFC 1939 §5)."""
        messages = self._messages
        if msg > len(messages):
            self._queue(NO_SUCH_MESSAGE)
            return None
        if msg - 1 in self._deleted:
            self._queue(MESSAGE_DELETED)
            return None
        return messages[msg - 1]

    async def _scan_listing(self, line: Callable[[int, MessageInfo], str]) -> None:
        """LIST / UIDL without an argument: one line per message not marked (RFC 1939 §5, §7)."""
        count, octets = self._totals()
        lines = (
            line(index + 1, info)
            for index, info in enumerate(self._messages)
            if index not in self._deleted
        )
        await self._queue_multiline(f"{count} messages ({octets} octets)", lines)

    async def _queue_multiline(self, text: str, lines: Iterable[str]) -> None:
        """``+OK text``, then one ASCII line each, then the terminator (RFC 1939 §3); the
        lines go to the core in ``FLUSH_THRESHOLD_BYTES`` blocks, not one event each."""
        self._queue(Ok(text))
        conn, block = self._conn, bytearray()
        for line in lines:
            block += line.encode("ascii")
            block += b"\r\n"
            if len(block) >= FLUSH_THRESHOLD_BYTES:
                self._out += conn.send(Data(bytes(block)))
                block.clear()
                await self._flush()
        if block:
            self._out += conn.send(Data(bytes(block)))
        self._out += conn.send(_END_OF_DATA)

    async def _stream_message(self, msg: int, text: str, body_lines: int | None) -> None:
        """RETR / TOP: stream the maildrop's chunks through the dot-stuffer, or as
        they are when the maildrop relays them already stuffed.

        A message that cannot be opened gets ``-ERR`` and the session goes on, as
        Dovecot answers an expunged one. Once ``+OK`` is out, a failure can only be
        reported by closing without the terminator: a truncated message must never
        look complete (RFC 1939 §3).
        """
        maildrop = self._maildrop
        assert maildrop is not None  # TRANSACTION implies a maildrop
        chunks = maildrop.retrieve(msg - 1, body_lines=body_lines)
        try:
            try:  # contextlib.aclosing's work, without its objects: every RETR's path
                try:
                    first = await anext(chunks, b"")  # opens the message: nothing sent yet
                except MaildropError as exc:
                    self._queue(Err(exc.text, exc.code))
                    return
                wrap = StuffedData if maildrop.dot_stuffed else Data
                self._queue(Ok(text))
                # Each chunk is sent once the next one is in hand, so the last one
                # leaves with the terminator: a small message is a single write.
                pending = first
                async for chunk in chunks:
                    await self._send_now(wrap(pending))
                    pending = chunk
                # Body and end: no status line, so straight to the core, not _queue.
                self._out += self._conn.send(wrap(pending))
            finally:
                await chunks.aclose()
        except MaildropError:
            self.summary.retrieve_failed(msg)
            raise _SessionEnd(SessionResult.MAILDROP_ERROR) from None
        self._out += self._conn.send(_END_OF_DATA)

    async def _quit(self) -> None:
        """QUIT: in TRANSACTION, commit the marked deletions first (RFC 1939 §6)."""
        if self._conn.phase is not Phase.UPDATE or self._maildrop is None:
            self._queue(Ok("Logging out."))
            return
        try:
            # Also with nothing marked: an upstream's QUIT must answer +OK first.
            committed = await self._maildrop.commit(frozenset(self._deleted))
        except MaildropError as exc:
            if exc.committed is not None:  # done upstream before the failure: say so in the log
                self.summary.committed = exc.committed
            self._queue(Err(exc.text, exc.code))  # RFC 1939 §6: "some deleted messages not removed"
            return
        self.summary.committed = committed
        self._queue(Ok(quit_text(committed)))

    # -- I/O -----------------------------------------------------------------------

    def _expect_status(self, verb: Verb | None) -> None:
        """A command (or a rejected line) is now due its +OK or -ERR."""
        self._verb = verb
        self._status_due = True

    def _queue(self, reply: Reply) -> None:
        self._out += self._conn.send(reply)
        if self._status_due and isinstance(reply, (Ok, Err)):
            # A multi-line reply counts by its status line; an AUTH by its final
            # answer (SASL challenges in between are not status lines).
            self._status_due = False
            result = CommandResult.OK if isinstance(reply, Ok) else CommandResult.ERR
            self._metrics.command(self._verb, result)

    async def _send_now(self, reply: Reply) -> None:
        """Send what is queued and ``reply`` in one write (the RETR hot path: a
        message chunk is not copied into the queue first)."""
        await self._flush(self._conn.send(reply))

    async def _flush(self, tail: bytes = b"") -> None:
        """Write the queued replies, then ``tail``, waiting at most the send timeout. On
        a plain ``TcpStream`` a write the kernel takes at once costs no cancel scope
        (popproxy/socket_stream.py): this runs for every reply and every relayed chunk."""
        data = bytes(self._out) + tail if self._out else tail
        self._out.clear()
        if not data:
            return
        wait = self._context.limits.send_timeout_seconds
        try:
            await wait_bounded(self._stream).send_all(data, wait_seconds=wait)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _SessionEnd(SessionResult.EOF) from None
        except trio.TooSlowError:
            raise _SessionEnd(SessionResult.TIMEOUT) from None
        self._sent(len(data))

    async def _receive(self) -> None:
        maildrop = self._maildrop
        if maildrop is None:
            data = await self._receive_some()  # the login deadline bounds the wait
        else:
            data = await self._receive_logged_in(maildrop)
        self.summary.bytes_in += len(data)
        self._traffic.bytes_received(len(data))
        self._conn.receive_data(data)

    async def _receive_some(self) -> bytes | bytearray:
        """The client's next octets, b"" at its end."""
        try:
            return await self._stream.receive_some(RECEIVE_CHUNK_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            return b""

    async def _receive_logged_in(self, maildrop: Maildrop) -> bytes | bytearray:
        """Wait for the client at most ``idle_timeout_seconds`` (RFC 1939 §3 autologout),
        keeping the maildrop alive every ``keepalive_interval_seconds`` of silence (an
        upstream would otherwise log the session out).

        Each wait ends at whichever of the two comes first: this runs before every
        command. Cancelling a receive that has not completed loses nothing (for
        TLS, OpenSSL keeps what it decrypted: popproxy/native_tls.py). A keep-alive is
        shielded: it ends by its own deadline, so the upstream is never left with half
        a reply read.
        """
        wait = idle_seconds = self._context.limits.idle_timeout_seconds
        idle_deadline = trio.current_time() + idle_seconds
        interval = maildrop.keepalive_interval_seconds
        bounded = wait_bounded(self._stream)
        while True:
            if interval is not None and interval < wait:
                wait = interval
            try:  # on a plain TcpStream, a cancel scope only once the read has to wait
                return await bounded.receive_some(RECEIVE_CHUNK_BYTES, wait_seconds=wait)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                return b""
            except trio.TooSlowError:
                if trio.current_time() >= idle_deadline:
                    await self._goodbye(Err("Disconnected for inactivity."))
                    raise _SessionEnd(SessionResult.TIMEOUT) from None
            with trio.CancelScope(shield=True):
                await maildrop.keep_alive()
            wait = idle_deadline - trio.current_time()

    async def _goodbye(self, reply: Err) -> None:
        """Best effort: tell the client why it is being disconnected."""
        data = bytes(self._out) + format_status(reply)
        self._out.clear()
        with trio.move_on_after(CLOSE_TIMEOUT_SECONDS):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.send_all(data)
                self._sent(len(data))

    def _sent(self, octets: int) -> None:
        self.summary.bytes_out += octets
        self._traffic.bytes_sent(octets)

    async def _close(self) -> None:
        """Release the maildrop, then close the client stream; shielded from a shutdown's
        cancel. A plain ``TcpStream`` closes at once: no scope, no checkpoint (issue 15)."""
        if self._maildrop is not None:
            with trio.CancelScope(shield=True):
                await self._maildrop.aclose()  # releases the lock; never deletes
        stream = self._stream
        if type(stream) is TcpStream:
            stream.close()
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT_SECONDS) as scope:
                await stream.aclose()
            if scope.cancelled_caught:
                await trio.aclose_forcefully(stream)
