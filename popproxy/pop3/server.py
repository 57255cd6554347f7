"""The server role of the sans-IO core: faces POP3 clients.

Theory of operation. The session feeds received octets to ``receive_data``
and pulls commands from ``next_event``; each command must be answered with
``send`` before the next one is handed out, so pipelined input (RFC 2449 §6.6)
is served strictly in order. A reply is a status line (``Ok``/``Err``), a SASL
challenge, or, where the command calls for it, ``Ok`` followed by ``Data``
chunks and ``EndOfData``; the core dot-stuffs the data as it streams.

Input that is not a valid command in the current phase raises
``RemoteProtocolError`` whose ``reply`` the session sends with ``send``; the
session goes on unless ``fatal`` is set (too many bad commands, or STLS with
pipelined bytes behind it, RFC 2595 §4). Phases move only through the tables
of ``pop3/state.py``: ``ON_COMMAND`` and ``ON_REPLY`` for commands and their
replies, ``ON_TRIGGER`` for a refused greeting, a fatal ``-ERR`` and the end of
the STLS handshake.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NoReturn

from popproxy.pop3.commands import (
    Apop,
    Auth,
    Command,
    Pass,
    SaslCancel,
    SaslLine,
    SaslResponse,
    Stls,
    User,
    Verb,
    multiline_on_ok,
    parse_command,
    parse_sasl_line,
)
from popproxy.pop3.dotstuff import DotStuffer
from popproxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from popproxy.pop3.events import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    EndOfData,
    NeedData,
    SaslChallenge,
    StuffedData,
)
from popproxy.pop3.limits import (
    MAX_BAD_COMMANDS,
    MAX_COMMAND_LINE_OCTETS,
    MAX_SASL_LINE_OCTETS,
    MAX_SASL_PAYLOAD_OCTETS,
)
from popproxy.pop3.lines import LineBuffer, Overlong
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.pop3.sasl import MAX_SASL_RESPONSES, PLAINTEXT_MECHANISMS, SERVER_MECHANISMS
from popproxy.pop3.state import (
    ALLOWED,
    ON_COMMAND,
    ON_REPLY,
    Outcome,
    Phase,
    Trigger,
    next_phase,
    phase_after,
)
from popproxy.pop3.wire import format_challenge, format_status
from popproxy.secret import Secret

SASL_TOO_LONG = Err("Authentication data too long")
PLAINTEXT_DISALLOWED = Err(
    "Plaintext authentication disallowed on non-secure (SSL/TLS) connections.", ResponseCode.AUTH
)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What this listener and session allow; set by the session, not the client."""

    stls_available: bool = False
    plaintext_auth_allowed: bool = True
    sasl_mechanisms: tuple[str, ...] = SERVER_MECHANISMS
    max_bad_commands: int = MAX_BAD_COMMANDS
    # Octets with the line end (RFC 2449 §4); an AUTH line and SASL responses get the
    # longer bound, their decoded data the payload bound (RFC 5034 §4). Floors and
    # ceilings are in pop3/limits.py; the config loader keeps to them.
    max_command_line_octets: int = MAX_COMMAND_LINE_OCTETS
    max_sasl_line_octets: int = MAX_SASL_LINE_OCTETS
    max_sasl_payload_octets: int = MAX_SASL_PAYLOAD_OCTETS


class _Rejected(enum.Enum):
    """Marker for "an -ERR is due for input that was not a command"."""

    REJECTED = "rejected"


_REJECTED = _Rejected.REJECTED
# The commands ``_check`` has more to check for than the phase.
_POLICY_CHECKED = frozenset({User, Pass, Apop, Auth, Stls})
ServerEvent = Command | SaslLine | ConnectionClosed | NeedData


@dataclass(frozen=True, slots=True)
class _Exchange:
    """The AUTH exchange in progress: its mechanism and the client's responses so far."""

    mechanism: str
    responses: tuple[Secret, ...]


Reply = Ok | Err | SaslChallenge | Data | StuffedData | EndOfData


class ServerConnection:
    """One POP3 session as seen from the server (RFC 1939, 2449, 2595, 5034)."""

    def __init__(self, settings: ServerSettings | None = None) -> None:
        self.settings = settings or ServerSettings()
        self.phase = Phase.AUTHORIZATION
        self._lines = LineBuffer()
        self._greeted = False
        self._due: Command | SaslLine | _Rejected | None = None
        self._close_after_reply = False
        self._stuffer: DotStuffer | None = None
        self._user: str | None = None
        self._bad_commands = 0
        self._rejected_verb: Verb | None = None
        self._exchange: _Exchange | None = None

    @property
    def user(self) -> str | None:
        """The name from an accepted USER, awaiting PASS."""
        return self._user

    @property
    def rejected_verb(self) -> Verb | None:
        """The verb of the command the last ``RemoteProtocolError`` rejected.

        None when the line did not parse as a command (unknown verb, bad arguments,
        control characters, too long): the ``unknown`` verb of the commands metric.
        An AUTH exchange's rejected SASL line counts as AUTH (RFC 5034 §4).
        """
        return self._rejected_verb

    @property
    def reply_due(self) -> bool:
        """Whether the last command still needs (the rest of) its reply."""
        return self._due is not None

    @property
    def buffered(self) -> int:
        """Octets received and not yet consumed."""
        return len(self._lines.buffer)

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed octets from the client; ``b""`` means the client closed."""
        self._lines.receive(data)

    def next_event(self) -> ServerEvent:
        """The next command, ``NEED_DATA``, or ``ConnectionClosed``.

        Raises RemoteProtocolError for bad input; send its ``reply`` next.
        """
        if not self._greeted or self._due is not None:
            raise LocalProtocolError("a reply is due before the next command")
        if self.phase in (Phase.TLS_HANDSHAKE, Phase.UPDATE, Phase.CLOSED):
            raise LocalProtocolError(f"no commands are read in phase {self.phase.name}")
        lines = self._lines
        buf = lines.buffer
        if not buf and not lines.eof:  # nothing buffered: no line under any bound
            return NEED_DATA
        in_sasl = self.phase is Phase.SASL
        settings = self.settings
        limit = settings.max_command_line_octets
        sasl_limit = settings.max_sasl_line_octets
        if in_sasl or (
            # An AUTH line gets the SASL bound. A buffer shorter than both bounds reads
            # the same under either: no need to look (every command's path).
            len(buf) >= (limit if limit < sasl_limit else sasl_limit)
            and buf[:5].upper() == b"AUTH "
        ):
            limit = sasl_limit
        line = lines.next_line(limit)
        if line is None:
            return ConnectionClosed() if lines.eof else NEED_DATA
        if isinstance(line, Overlong):
            if in_sasl:
                # RFC 5034 §4: an -ERR ends the AUTH exchange; the next line is a command.
                self._end_exchange()
            self._reject(Err("Line too long"), verb=Verb.AUTH if in_sasl else None)
        if in_sasl:
            return self._accept(self._parse_sasl(line))
        try:
            command = parse_command(line)
        except RemoteProtocolError as exc:
            self._reject(exc.reply)
        if isinstance(command, Auth) and self._too_long(command.initial_response):
            self._reject(SASL_TOO_LONG, verb=Verb.AUTH)
        return self._accept(self._check(command))

    def _parse_sasl(self, line: bytes) -> SaslLine:
        try:
            sasl = parse_sasl_line(line)
        except RemoteProtocolError as exc:
            # RFC 5034 §4: a malformed response rejects the AUTH command.
            self._end_exchange()
            self._reject(exc.reply, verb=Verb.AUTH)
        if isinstance(sasl, SaslResponse):
            if self._too_long(sasl.data):
                self._end_exchange()
                self._reject(SASL_TOO_LONG, verb=Verb.AUTH)
            exchange = self._exchange
            if exchange is None:
                raise LocalProtocolError("a SASL line outside an AUTH exchange")
            self._exchange = _Exchange(exchange.mechanism, (*exchange.responses, sasl.data))
            return SaslResponse(sasl.data, exchange.mechanism, exchange.responses)
        return sasl

    def _end_exchange(self) -> None:
        """An -ERR ends the AUTH exchange (RFC 5034 §4)."""
        self.phase = next_phase(Phase.SASL, Verb.AUTH, Outcome.ERR)
        self._exchange = None

    def _too_long(self, payload: Secret | None) -> bool:
        """Whether decoded SASL data is over the payload bound (RFC 5034 §4)."""
        return payload is not None and len(payload) > self.settings.max_sasl_payload_octets

    def _check(self, command: Command) -> Command:
        """Phase and policy checks that need the session's state (RFC 1939 §§4-7)."""
        verb = command.verb
        if verb not in ALLOWED[self.phase]:
            self._reject(Err("Command not valid in this state"), verb=verb)
        if type(command) not in _POLICY_CHECKED:
            return command
        plaintext = isinstance(command, User | Pass) or (
            isinstance(command, Auth) and command.mechanism in PLAINTEXT_MECHANISMS
        )
        if plaintext and not self.settings.plaintext_auth_allowed:
            self._reject(PLAINTEXT_DISALLOWED, verb=verb, counts=False)
        match command:
            case Pass() if self._user is None:
                self._reject(Err("No username given"), verb=verb)
            case Pass():
                return Pass(command.password, user=self._user or "")
            case Apop():
                # Not offered (an MD5 challenge; the greeting carries no timestamp,
                # RFC 1939 §7): refused as a policy, not counted as a bad command.
                self._reject(Err("APOP is not enabled"), verb=verb, counts=False)
            case Auth(mechanism=str(mech)) if mech not in self.settings.sasl_mechanisms:
                self._reject(Err("Unsupported authentication mechanism"), verb=verb, counts=False)
            case Stls() if not self.settings.stls_available:
                self._reject(Err("STLS is not available"), verb=verb, counts=False)
            case Stls() if self._lines.buffer:
                # RFC 2595 §4 / CVE-2011-0411 class: nothing may be pipelined behind STLS.
                self._reject(
                    Err("STLS must be the last command sent in clear"), verb=verb, fatal=True
                )
        return command

    def _accept(self, command: Command | SaslLine) -> Command | SaslLine:
        self._bad_commands = 0
        self._due = command
        self.phase = ON_COMMAND.get((self.phase, command.verb), self.phase)
        return command

    def _reject(
        self, reply: Err, *, verb: Verb | None = None, counts: bool = True, fatal: bool = False
    ) -> NoReturn:
        self._rejected_verb = verb
        if counts:
            self._bad_commands += 1
            if self._bad_commands >= self.settings.max_bad_commands:
                reply, fatal = Err("Too many bad commands, closing"), True
        self._due = _REJECTED
        self._close_after_reply = fatal
        raise RemoteProtocolError(reply, fatal=fatal)

    def send(self, event: Reply) -> bytes:
        """Serialize a reply to the command in progress, or the greeting."""
        if not self._greeted:
            match event:
                case Ok() | Err():
                    self._greeted = True
                    if isinstance(event, Err):
                        self.phase = phase_after(self.phase, Trigger.GREETING_ERR)
                    return format_status(event)
            raise LocalProtocolError("the greeting must come first")
        due = self._due
        if due is None:
            raise LocalProtocolError("no command is waiting for a reply")
        if due is _REJECTED:
            if not isinstance(event, Err):
                raise LocalProtocolError("a rejected command must be answered with Err")
            self._due = None
            if self._close_after_reply:
                self.phase = phase_after(self.phase, Trigger.FATAL_ERR)
            return format_status(event)
        if (stuffer := self._stuffer) is not None:  # by exact type: every relayed chunk
            if type(event) is StuffedData:
                return stuffer.pass_stuffed(event.data)
            if type(event) is Data:
                return stuffer.stuff(event.data)
            if type(event) is EndOfData:
                tail = stuffer.finish()
                self._stuffer = None
                self._complete(due, Outcome.LISTED)
                return tail
            raise LocalProtocolError("a multi-line reply is in progress")
        # A status line by exact type first (the events are final dataclasses): every
        # reply's path.
        if type(event) is Ok:
            if type(due) is SaslCancel:
                raise LocalProtocolError("a cancelled AUTH is answered with Err (RFC 5034 §4)")
            if multiline_on_ok(due):
                self._stuffer = DotStuffer()
            else:
                self._complete(due, Outcome.OK)
            return format_status(event)
        if type(event) is Err:
            self._complete(due, Outcome.ERR)
            return format_status(event)
        match event:
            case SaslChallenge(data=data) if isinstance(due, SaslResponse) or (
                isinstance(due, Auth) and due.mechanism is not None
            ):
                if isinstance(due, Auth) and due.mechanism is not None:
                    initial = due.initial_response
                    self._exchange = _Exchange(due.mechanism, () if initial is None else (initial,))
                elif self._exchange is None or len(self._exchange.responses) >= MAX_SASL_RESPONSES:
                    raise LocalProtocolError("no AUTH exchange takes this many responses")
                self._complete(due, Outcome.CONTINUE)
                return format_challenge(data)
        raise LocalProtocolError(f"{type(event).__name__} does not answer {due.verb.name}")

    def _complete(self, command: Command | SaslLine, outcome: Outcome) -> None:
        kind = type(command)  # by exact type, no tuple to match: every command's path
        if kind is User or kind is Pass:
            # A name is kept from an accepted USER until PASS (RFC 1939 §7).
            self._user = command.name if type(command) is User and outcome is Outcome.OK else None
        phase = self.phase  # next_phase's lookup, inline: every command's reply
        self.phase = ON_REPLY.get((phase, command.verb, outcome), phase)
        if self.phase is not Phase.SASL:
            self._exchange = None
        self._due = None

    def tls_established(self, settings: ServerSettings) -> None:
        """Forget everything from before the TLS handshake (RFC 2595 §4)."""
        if self.phase is not Phase.TLS_HANDSHAKE:
            raise LocalProtocolError("tls_established outside the STLS handshake")
        self._lines = LineBuffer()
        self._user = None
        self._bad_commands = 0
        self.settings = settings
        self.phase = phase_after(self.phase, Trigger.TLS_ESTABLISHED)
