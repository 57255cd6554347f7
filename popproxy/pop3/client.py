"""The client role of the sans-IO core: faces upstream POP3 servers.

Theory of operation. ``send(command)`` returns the octets to write and
records the command in a FIFO; replies are matched to that FIFO in order, so
pipelining (RFC 2449 §6.6) needs nothing special. Whether a reply is one line
or multi-line is decided by the command that was sent, never by guessing
from the reply (RFC 1939 §3). A reply line when nothing is outstanding, an
overlong line, a malformed status or an end of stream inside a multi-line body
raise a fatal ``RemoteProtocolError``: the caller must drop the connection and
must never pass on a truncated body as if it were complete.

A command sent with ``stuffed_body=True`` gets its multi-line body as
``StuffedData``: the octets as received, still dot-stuffed, with only the
terminator removed, so a relay can pass them on without decoding them. The
one exception is a poisoned dot line (a single ``.`` ended by a bare LF): it is
content, stuffed so that no client takes it for the end, and reported once per
reply as ``PoisonedDotLines`` before the ``EndOfData`` (pop3/dotstuff.py).

The client tracks the session's phase as the server's replies confirm it,
through the same table as the server role (``state.ON_COMMAND`` and
``state.ON_REPLY``, applied when a command's reply is complete), plus the two
moves no command's reply makes (``state.ON_TRIGGER``: a refused greeting, and
the end of the TLS handshake after STLS, ``tls_established``). The phase moves
only through these tables.
"""

from __future__ import annotations

import base64
import binascii
import enum

from popproxy.pop3.commands import (
    Auth,
    Command,
    SaslLine,
    SaslResponse,
    multiline_on_ok,
    serialize_command,
)
from popproxy.pop3.dotstuff import DotUnstuffer, StuffedBodyScanner
from popproxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from popproxy.pop3.events import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    EndOfData,
    NeedData,
    PoisonedDotLines,
    SaslChallenge,
    StuffedData,
)
from popproxy.pop3.limits import MAX_REPLY_LINE_OCTETS
from popproxy.pop3.lines import LineBuffer, Overlong
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.pop3.state import ON_COMMAND, ON_REPLY, Outcome, Phase, Trigger, phase_after
from popproxy.pop3.wire import parse_status


class _Greeting(enum.Enum):
    GREETING = "greeting"


GREETING = _Greeting.GREETING
# The first two octets of a SASL challenge line: "+" alone, or "+ " and its data.
_CHALLENGE_STARTS = (b"+", b"+ ")


ClientEvent = (
    Ok
    | Err
    | SaslChallenge
    | Data
    | StuffedData
    | PoisonedDotLines
    | EndOfData
    | ConnectionClosed
    | NeedData
)


# A command awaiting its reply, and whether its multi-line body is to be delivered
# stuffed (``StuffedData``). A plain pair, built without a Python call: one per command.
_Sent = tuple[Command | SaslLine | _Greeting, bool]


def _upstream_error(text: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        Err(f"Upstream protocol error: {text}", ResponseCode.SYS_TEMP), fatal=True
    )


class ClientConnection:
    """One POP3 session as seen from the client (RFC 1939, 2449, 5034)."""

    def __init__(
        self, *, expect_greeting: bool = True, max_reply_line_octets: int = MAX_REPLY_LINE_OCTETS
    ) -> None:
        """``expect_greeting=False`` starts on a connection already greeted. A status line
        longer than ``max_reply_line_octets``, line end included, is fatal (RFC 2449 §4:
        512; pop3/limits.py has the ceiling)."""
        self._phase = Phase.AUTHORIZATION
        self._lines = LineBuffer()
        self.max_reply_line_octets = max_reply_line_octets
        # A list, not a deque: a connection waits on a few replies at a time (the
        # pipelined windows are small), and a deque's first block alone is about 600
        # octets per connection, held all through an idle session.
        self._outstanding: list[_Sent] = [(GREETING, False)] if expect_greeting else []
        self._body: DotUnstuffer | StuffedBodyScanner | None = None
        self._poison_reported = False  # PoisonedDotLines given for the body being read
        self._broken = False
        # A relayed body chunk taken as received (``StuffedBodyScanner.take_whole``),
        # not yet handed out as ``StuffedData``.
        self._whole: bytes | None = None

    @property
    def phase(self) -> Phase:
        """The session's phase as the replies read so far confirm it (pop3/state.py)."""
        return self._phase

    @property
    def outstanding(self) -> int:
        """How many replies (the greeting included) are still expected."""
        return len(self._outstanding)

    @property
    def buffered(self) -> int:
        """Octets received and not yet consumed."""
        return len(self._lines.buffer) + (len(self._whole) if self._whole is not None else 0)

    @property
    def unsolicited(self) -> bool:
        """Whether octets are buffered with no reply expected: a line the server sent on
        its own (RFC 1939 §3: a server only answers), which the next command's reply
        must never be taken from."""
        # As ``buffered > 0``, without its calls (every event): a whole chunk is never empty.
        return not self._outstanding and (len(self._lines.buffer) > 0 or self._whole is not None)

    def send(self, command: Command | SaslLine, *, stuffed_body: bool = False) -> bytes:
        """The octets for ``command``; its reply is expected after those before it.

        With ``stuffed_body`` a multi-line body comes as ``StuffedData`` (see above).
        """
        if self._broken:
            raise LocalProtocolError("the connection is broken")
        if self._phase in (Phase.TLS_HANDSHAKE, Phase.CLOSED):
            raise LocalProtocolError(f"no commands are sent in phase {self._phase.name}")
        data = serialize_command(command)
        self._outstanding.append((command, stuffed_body))
        return data

    def tls_established(self) -> None:
        """The TLS handshake after ``+OK`` to STLS is done: forget every octet from before
        it; no new greeting comes (RFC 2595 §4)."""
        self._phase = phase_after(self._phase, Trigger.TLS_ESTABLISHED)
        self._lines = LineBuffer()

    def _complete(self, command: Command | SaslLine, outcome: Outcome) -> None:
        """``command``'s reply is complete: the phase moves as the server's did."""
        phase = ON_COMMAND.get((self._phase, command.verb), self._phase)
        self._phase = ON_REPLY.get((phase, command.verb, outcome), phase)  # next_phase, inline

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed octets from the server; ``b""`` means it closed.

        Inside a relayed body, with nothing else buffered, a chunk that is body through
        and through is kept as it came (``bytes``: no copy into the line buffer and
        none out of it: a 10 MiB RETR is 80 chunks of 128 KiB).
        """
        body = self._body
        if (
            type(body) is StuffedBodyScanner
            and type(data) is bytes
            and self._whole is None
            and not self._lines.buffer
            and not self._broken
            and body.take_whole(data)
        ):
            self._whole = data
            return
        self._lines.receive(data)

    def next_event(self) -> ClientEvent:
        """The next reply event, ``NEED_DATA`` or ``ConnectionClosed``.

        Raises a fatal RemoteProtocolError when the server breaks the protocol.
        """
        if self._broken:
            raise LocalProtocolError("the connection is broken")
        if self._whole is not None:  # every relayed chunk of a large body
            chunk, self._whole = self._whole, None
            return StuffedData(chunk)
        try:
            if self._body is not None:
                return self._next_body_event(self._body)
            return self._next_reply_event()
        except RemoteProtocolError:
            self._broken = True
            raise

    def _next_reply_event(self) -> ClientEvent:
        line = self._lines.next_line(self.max_reply_line_octets)
        if line is None:
            if not self._lines.eof:
                return NEED_DATA
            if self._outstanding or self._lines.buffer:
                raise _upstream_error("connection closed with a reply outstanding")
            return ConnectionClosed()
        if isinstance(line, Overlong):
            raise _upstream_error("reply line too long")
        if not self._outstanding:
            raise _upstream_error("unsolicited reply")
        head, stuffed_body = self._outstanding[0]
        if line[:2] in _CHALLENGE_STARTS:  # "+" alone or "+ " and base64 (RFC 5034 §4)
            if not isinstance(head, Auth | SaslResponse):
                raise _upstream_error("SASL challenge outside AUTH")
            try:
                challenge = SaslChallenge(base64.b64decode(line[2:], validate=True))
            except binascii.Error:
                raise _upstream_error("invalid base64 in SASL challenge") from None
            self._outstanding.pop(0)
            self._complete(head, Outcome.CONTINUE)
            return challenge
        status = parse_status(line)
        if status is None:
            raise _upstream_error("malformed status line")
        if head is GREETING:
            self._outstanding.pop(0)
            if isinstance(status, Err):
                self._phase = phase_after(self._phase, Trigger.GREETING_ERR)
        elif isinstance(status, Ok) and multiline_on_ok(head):
            self._body = StuffedBodyScanner() if stuffed_body else DotUnstuffer()
        else:
            self._outstanding.pop(0)
            self._complete(head, Outcome.OK if isinstance(status, Ok) else Outcome.ERR)
        return status

    def _next_body_event(self, body: DotUnstuffer | StuffedBodyScanner) -> ClientEvent:
        if not body.done:
            chunk = body.feed(self._lines.buffer)
            if chunk:
                return StuffedData(chunk) if type(body) is StuffedBodyScanner else Data(chunk)
        if body.done:
            if body.poisoned_dot_lines and not self._poison_reported:
                self._poison_reported = True
                return PoisonedDotLines(body.poisoned_dot_lines)
            self._body = None
            self._poison_reported = False
            command = self._outstanding.pop(0)[0]
            if not isinstance(command, _Greeting):
                self._complete(command, Outcome.LISTED)
            return EndOfData()
        if self._lines.eof:
            raise _upstream_error("connection closed inside a multi-line reply")
        return NEED_DATA
