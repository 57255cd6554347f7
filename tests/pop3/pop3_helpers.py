"""Drivers shared by the pop3 tests: feed bytes whole and byte by byte, collect events.

``run_server`` and ``run_client`` feed the same input twice, once in one
``receive_data`` call and once one octet at a time, draining ``next_event``
until ``NEED_DATA`` after every call, and assert that both runs give the same
events (adjacent ``Data`` merged: only their chunking may differ) and, for the
server, the same octets out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from popproxy.pop3.client import ClientConnection
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
from popproxy.pop3.server import Reply, ServerConnection, ServerSettings
from popproxy.pop3.state import Phase

# Moderate example counts keep tests/pop3 in a few seconds; deadline=None because
# a loaded CI machine must not turn a slow example into a failure.
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Content built from the octets that matter to dot-stuffing, so that lines
# starting with "." and CR/LF in every arrangement turn up often.
CONTENT = st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b".\r\n", b"a", b"\x00", b"\xff", b" "]),
    max_size=60,
).map(b"".join) | st.binary(max_size=200)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (modulo its length), as non-empty pieces."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]  # b"" is EOF


def expected_content(content: bytes) -> bytes:
    """What comes back: the content, ended by CRLF if it did not end a line."""
    return content if content == b"" or content.endswith(b"\n") else content + b"\r\n"


@dataclass(frozen=True, slots=True)
class Rejected:
    """The server role raised RemoteProtocolError (the -ERR it carried was sent)."""

    reply: Err
    fatal: bool


@dataclass(frozen=True, slots=True)
class Broken:
    """The client role raised a (fatal) RemoteProtocolError."""

    reply: Err
    fatal: bool


def byte_chunks(data: bytes) -> Iterator[bytes]:
    """``data`` one octet at a time."""
    for i in range(len(data)):
        yield data[i : i + 1]


def merge_data(events: list[object]) -> list[object]:
    """Join adjacent Data (or StuffedData) events: their boundaries depend only on how
    input was chunked."""
    merged: list[object] = []
    for event in events:
        last = merged[-1] if merged else None
        if isinstance(event, Data) and isinstance(last, Data):
            merged[-1] = Data(last.data + event.data)
        elif isinstance(event, StuffedData) and isinstance(last, StuffedData):
            merged[-1] = StuffedData(last.data + event.data)
        else:
            merged.append(event)
    return merged


# A tiny maildrop for the responder: message 2 has lines that need stuffing.
BODIES = {
    1: b"Subject: one\r\n\r\nhello\r\n",
    2: b"Subject: two\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nend\r\n",
}
PASSWORD = b"secret"
PLAIN_OK = b"\x00alice\x00secret"


Responder = Callable[[ServerConnection, Command | SaslLine], list[Reply]]


def respond(conn: ServerConnection, command: Command | SaslLine) -> list[Reply]:
    """A minimal session: the replies a well-behaved server gives to ``command``."""
    match command:
        case Capa():
            return [Ok("Capability list follows"), Data(b"USER\r\nTOP\r\n"), EndOfData()]
        case User() | Noop() | Rset() | Dele() | Quit():
            return [Ok()]
        case Pass(password=password):
            return (
                [Ok("Logged in")]
                if password.reveal() == PASSWORD
                else [Err("Wrong credentials", ResponseCode.AUTH)]
            )
        case Auth(mechanism=None):
            return [Ok("Mechanisms follow"), Data(b"PLAIN\r\nLOGIN\r\n"), EndOfData()]
        case Auth(mechanism="LOGIN", initial_response=None):
            return [SaslChallenge(b"Username:")]
        case Auth(mechanism="LOGIN") | SaslResponse(mechanism="LOGIN", earlier=()):
            return [SaslChallenge(b"Password:")]
        case SaslResponse(mechanism="LOGIN", earlier=(name, *_), data=password):
            if (name.reveal(), password.reveal()) == (b"alice", PASSWORD):
                return [Ok("Logged in")]
            return [Err("Wrong credentials", ResponseCode.AUTH)]
        case Auth(initial_response=None):
            return [SaslChallenge()]
        case Auth(initial_response=data) | SaslResponse(data=data):
            if data is not None and data.reveal() == PLAIN_OK:
                return [Ok("Logged in")]
            return [Err("Wrong credentials", ResponseCode.AUTH)]
        case SaslCancel():
            return [Err("Authentication cancelled")]
        case Stls():
            return [Ok("Begin TLS negotiation")]
        case Stat():
            return [Ok(f"{len(BODIES)} {sum(map(len, BODIES.values()))}")]
        case List(msg=None):
            listing = b"".join(b"%d %d\r\n" % (n, len(b)) for n, b in BODIES.items())
            return [Ok("scan listing follows"), Data(listing), EndOfData()]
        case Uidl(msg=None):
            listing = b"".join(b"%d uid%d\r\n" % (n, n) for n in BODIES)
            return [Ok(), Data(listing), EndOfData()]
        case List(msg=int(msg)) | Uidl(msg=int(msg)) if msg not in BODIES:
            return [Err("No such message")]
        case List(msg=int(msg)):
            return [Ok(f"{msg} {len(BODIES[msg])}")]
        case Uidl(msg=int(msg)):
            return [Ok(f"{msg} uid{msg}")]
        case Retr(msg=msg) | Top(msg=msg) if msg not in BODIES:
            return [Err("No such message")]
        case Retr(msg=msg):
            body = BODIES[msg]
            return [Ok(f"{len(body)} octets"), Data(body[:7]), Data(body[7:]), EndOfData()]
        case Top(msg=msg, lines=lines):
            head, _, rest = BODIES[msg].partition(b"\r\n\r\n")
            kept = b"".join(rest.splitlines(keepends=True)[:lines])
            return [Ok(), Data(head + b"\r\n\r\n" + kept), EndOfData()]
    raise AssertionError(f"unhandled {command!r}")


@dataclass
class ServerRun:
    """What a server saw (events) and said (output) for one input."""

    conn: ServerConnection
    events: list[object] = field(default_factory=list)
    output: bytearray = field(default_factory=bytearray)

    @property
    def replies(self) -> list[bytes]:
        """The output split into lines, line ends kept."""
        return bytes(self.output).splitlines(keepends=True)


def _phase(conn: ServerConnection) -> Phase:
    return conn.phase  # a call, so that mypy does not narrow the phase across send()


def _drain_server(run: ServerRun, responder: Responder) -> None:
    conn = run.conn
    while conn.phase not in (Phase.CLOSED, Phase.UPDATE, Phase.TLS_HANDSHAKE):
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            run.events.append(Rejected(exc.reply, exc.fatal))
            run.output += conn.send(exc.reply)
            continue
        if event is NEED_DATA:
            return
        run.events.append(event)
        if isinstance(event, ConnectionClosed):
            return
        for reply in responder(conn, event):
            run.output += conn.send(reply)
        if _phase(conn) is Phase.TLS_HANDSHAKE:
            conn.tls_established(conn.settings)
            run.events.append("TLS")
    # QUIT in TRANSACTION leaves UPDATE only when its reply is sent, which the
    # responder did; UPDATE is reported here if a responder left it there.


def _server_once(
    chunks: Iterator[bytes],
    settings: ServerSettings | None,
    responder: Responder,
    eof: bool,
) -> ServerRun:
    run = ServerRun(ServerConnection(settings))
    run.output += run.conn.send(Ok("POP3 ready"))
    for chunk in chunks:
        if run.conn.phase is Phase.CLOSED:
            break
        if not chunk:
            continue  # b"" would mean end of stream
        run.conn.receive_data(chunk)
        _drain_server(run, responder)
    if eof and run.conn.phase is not Phase.CLOSED:
        run.conn.receive_data(b"")
        _drain_server(run, responder)
    return run


def run_server(
    data: bytes,
    settings: ServerSettings | None = None,
    *,
    responder: Responder = respond,
    eof: bool = False,
    whole_only: bool = False,
) -> ServerRun:
    """Feed ``data`` whole and byte by byte; both must agree. Returns the whole run."""
    whole = _server_once(iter([data]), settings, responder, eof)
    if not whole_only:
        split = _server_once(byte_chunks(data), settings, responder, eof)
        assert merge_data(split.events) == merge_data(whole.events)
        assert split.output == whole.output
        assert split.conn.phase is whole.conn.phase
    return whole


@dataclass
class ClientRun:
    """What a client saw for one input."""

    conn: ClientConnection
    events: list[object] = field(default_factory=list)


def _drain_client(run: ClientRun) -> bool:
    """Collect events until NEED_DATA; False once the connection is over."""
    while True:
        try:
            event = run.conn.next_event()
        except RemoteProtocolError as exc:
            run.events.append(Broken(exc.reply, exc.fatal))
            return False
        if event is NEED_DATA:
            return True
        run.events.append(event)
        if isinstance(event, ConnectionClosed):
            return False


def _client_once(
    commands: list[Command | SaslLine], chunks: Iterator[bytes], eof: bool
) -> ClientRun:
    run = ClientRun(ClientConnection())
    for command in commands:
        run.conn.send(command)
    for chunk in chunks:
        run.conn.receive_data(chunk)
        if not _drain_client(run):
            return run
    if eof:
        run.conn.receive_data(b"")
        _drain_client(run)
    return run


def run_client(commands: list[Command | SaslLine], data: bytes, *, eof: bool = False) -> ClientRun:
    """Send ``commands`` (pipelined), feed ``data`` whole and byte by byte; both must agree."""
    whole = _client_once(commands, iter([data]), eof)
    split = _client_once(commands, byte_chunks(data), eof)
    assert merge_data(split.events) == merge_data(whole.events)
    whole.events = merge_data(whole.events)
    return whole
