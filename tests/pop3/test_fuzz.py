"""Hostile and random input for both roles, and server-to-client round trips.

Random bytes give events or RemoteProtocolError, never anything else, and no
buffer grows past its named limit (DESIGN.md, invariants 4 and 5).
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pop3_helpers import CONTENT, FAST, byte_chunks, expected_content, split_at

from popproxy.pop3.client import ClientConnection
from popproxy.pop3.commands import (
    Apop,
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
    multiline_on_ok,
    parse_command,
    serialize_command,
)
from popproxy.pop3.dotstuff import DotStuffer
from popproxy.pop3.errors import RemoteProtocolError
from popproxy.pop3.events import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    EndOfData,
    SaslChallenge,
    StuffedData,
)
from popproxy.pop3.limits import (
    MAX_COMMAND_LINE_OCTETS,
    MAX_MESSAGE_NUMBER,
    MAX_REPLY_LINE_OCTETS,
    MAX_SASL_LINE_OCTETS,
)
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.pop3.sasl import MAX_SASL_RESPONSES
from popproxy.pop3.server import Reply, ServerConnection, ServerSettings
from popproxy.pop3.state import Phase
from popproxy.pop3.wire import format_status
from popproxy.secret import Secret

COMMAND_TYPES = (
    User, Pass, Apop, Auth, Stls, Capa, Stat, List, Retr, Dele, Noop, Rset, Quit, Top, Uidl,
    SaslResponse, SaslCancel,
)  # fmt: skip
CLIENT_EVENT_TYPES = (Ok, Err, SaslChallenge, Data, EndOfData, ConnectionClosed)

# --- Server role ----------------------------------------------------------------

CLIENT_LINES = [
    b"USER alice", b"PASS secret", b"APOP a 0123456789abcdef0123456789abcdef", b"AUTH",
    b"AUTH PLAIN", b"AUTH PLAIN AGEAcA==", b"AUTH PLAIN =", b"*", b"=", b"AGEAcA==", b"STLS",
    b"CAPA", b"STAT", b"LIST", b"LIST 1", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 0",
    b"UIDL", b"UIDL 1", b"QUIT", b"RETR 01", b"", b"\x00", b"\xff\xfe", b"\r",
    b"AUTH " + b"A" * 300,
]  # fmt: skip
CLIENT_INPUT = st.lists(
    st.sampled_from(CLIENT_LINES).flatmap(
        lambda line: st.sampled_from([line + b"\r\n", line + b"\n", line])
    )
    | st.binary(max_size=80),
    max_size=30,
).map(b"".join)
SETTINGS = st.builds(
    ServerSettings,
    stls_available=st.booleans(),
    plaintext_auth_allowed=st.booleans(),
    max_bad_commands=st.integers(1, 12),
)


def plausible_replies(command: Command | SaslLine, rnd: random.Random) -> list[Reply]:
    """Any reply a session might give to ``command``, chosen at random."""
    choices: list[list[Reply]] = [[Err("no")]]
    if multiline_on_ok(command):
        choices.append([Ok(), Data(b"a\r\n.b"), EndOfData()])
    else:
        choices.append([Ok()])
    # Another challenge only where the exchange may take another response: after an AUTH
    # with a mechanism, or a response short of MAX_SASL_RESPONSES (a session that
    # challenged once more would be our bug, a LocalProtocolError, not the peer's).
    if (isinstance(command, SaslResponse) and len(command.earlier) + 1 < MAX_SASL_RESPONSES) or (
        isinstance(command, Auth) and command.mechanism is not None
    ):
        choices.append([SaslChallenge(b"x")])
    return rnd.choice(choices)


def drive_server(conn: ServerConnection, chunks: Iterable[bytes], rnd: random.Random) -> None:
    """Answer every event plausibly; assert the core only ever yields events or peer errors."""
    for chunk in [*chunks, b""]:
        if phase_of(conn) is Phase.CLOSED:
            return
        conn.receive_data(chunk)
        while phase_of(conn) is not Phase.CLOSED:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                assert isinstance(exc.reply, Err)
                conn.send(exc.reply)
                continue
            if event is NEED_DATA:
                assert conn.buffered < MAX_SASL_LINE_OCTETS
                break
            if isinstance(event, ConnectionClosed):
                return
            assert isinstance(event, COMMAND_TYPES)
            for reply in plausible_replies(event, rnd):
                conn.send(reply)
            if phase_of(conn) is Phase.TLS_HANDSHAKE:
                conn.tls_established(conn.settings)


def phase_of(conn: ServerConnection) -> Phase:
    return conn.phase


@FAST
@given(
    data=CLIENT_INPUT,
    cuts=st.lists(st.integers(0, 3000), max_size=8),
    settings=SETTINGS,
    seed=st.integers(0, 2**32),
)
def test_random_bytes_to_server(
    data: bytes, cuts: list[int], settings: ServerSettings, seed: int
) -> None:
    conn = ServerConnection(settings)
    conn.send(Ok("ready"))
    drive_server(conn, split_at(data, cuts), random.Random(seed))


@FAST
@given(data=st.binary(max_size=600), seed=st.integers(0, 2**32))
def test_raw_random_bytes_to_server_byte_by_byte(data: bytes, seed: int) -> None:
    conn = ServerConnection()
    conn.send(Ok("ready"))
    drive_server(conn, byte_chunks(data), random.Random(seed))


# --- Client role ----------------------------------------------------------------

CLIENT_COMMANDS: list[Command | SaslLine] = [
    User("a"), Pass(Secret(b"p")), Auth(), Auth("PLAIN"), SaslResponse(Secret(b"x")),
    SaslCancel(), Capa(), Stat(), List(), List(1), Retr(1), Dele(1), Noop(), Rset(), Top(1, 2),
    Uidl(), Uidl(1), Quit(),
]  # fmt: skip
SERVER_LINES = [
    b"+OK", b"+OK hi", b"-ERR no", b"-ERR [IN-USE] x", b"-ERR [SYS/TEMP", b"+ ", b"+ eA==", b"+",
    b".", b"..", b"..x", b"1 2", b"+OK" + b"x" * 600, b"\x00", b"\xff", b"\r",
]  # fmt: skip
SERVER_INPUT = st.lists(
    st.sampled_from(SERVER_LINES).map(lambda line: line + b"\r\n") | st.binary(max_size=40),
    max_size=30,
).map(b"".join)


def drive_client(conn: ClientConnection, chunks: Iterable[bytes]) -> None:
    """Drain events after each chunk; only events or one fatal RemoteProtocolError may come."""
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                assert exc.fatal
                assert isinstance(exc.reply, Err)
                return
            if event is NEED_DATA:
                assert conn.buffered < MAX_REPLY_LINE_OCTETS
                break
            assert isinstance(event, CLIENT_EVENT_TYPES)
            if isinstance(event, ConnectionClosed):
                return


@FAST
@given(
    commands=st.lists(st.sampled_from(CLIENT_COMMANDS), max_size=6),
    data=SERVER_INPUT,
    cuts=st.lists(st.integers(0, 2000), max_size=8),
)
def test_random_bytes_to_client(
    commands: list[Command | SaslLine], data: bytes, cuts: list[int]
) -> None:
    conn = ClientConnection()
    for command in commands:
        conn.send(command)
    drive_client(conn, split_at(data, cuts))


@FAST
@given(commands=st.lists(st.sampled_from(CLIENT_COMMANDS), max_size=4), data=st.binary())
def test_raw_random_bytes_to_client_byte_by_byte(
    commands: list[Command | SaslLine], data: bytes
) -> None:
    conn = ClientConnection()
    for command in commands:
        conn.send(command)
    drive_client(conn, byte_chunks(data))


# --- Server send -> client receive ------------------------------------------------


@FAST
@given(
    body=CONTENT,
    send_cuts=st.lists(st.integers(0, 400), max_size=10),
    wire_cuts=st.lists(st.integers(0, 500), max_size=10),
)
def test_retr_body_round_trips_server_to_client(
    body: bytes, send_cuts: list[int], wire_cuts: list[int]
) -> None:
    server = ServerConnection()
    client = ClientConnection()
    wire = server.send(Ok("ready"))
    commands: list[Command | SaslLine] = [User("a"), Pass(Secret(b"p")), Retr(1), Noop()]
    server.receive_data(b"".join(client.send(c) for c in commands))
    assert server.next_event() == User("a")
    wire += server.send(Ok())
    assert server.next_event() == Pass(Secret(b"p"), user="a")
    wire += server.send(Ok())
    assert server.next_event() == Retr(1)
    wire += server.send(Ok(f"{len(body)} octets"))
    for chunk in split_at(body, send_cuts):
        wire += server.send(Data(chunk))
    wire += server.send(EndOfData())
    assert server.next_event() == Noop()
    wire += server.send(Ok())

    events: list[object] = []
    received = bytearray()
    for chunk in split_at(wire, wire_cuts):
        client.receive_data(chunk)
        while (event := client.next_event()) is not NEED_DATA:
            if isinstance(event, Data):
                received += event.data
            else:
                events.append(event)
    assert events == [Ok("ready"), Ok(""), Ok(""), Ok(f"{len(body)} octets"), EndOfData(), Ok("")]
    assert received == expected_content(body)
    assert client.outstanding == 0


# --- Hand-made hostile input -------------------------------------------------------

TEN_MB = 10 * 1024 * 1024
CHUNK = b"x" * 65536


def test_ten_megabytes_without_lf_to_server_in_bounded_memory() -> None:
    conn = ServerConnection()
    conn.send(Ok("ready"))
    events: list[object] = []
    tracemalloc.start()
    try:
        for _ in range(TEN_MB // len(CHUNK)):
            conn.receive_data(CHUNK)
            assert conn.buffered <= len(CHUNK) + MAX_COMMAND_LINE_OCTETS
            while True:
                try:
                    event = conn.next_event()
                except RemoteProtocolError as exc:
                    events.append(exc.reply)
                    conn.send(exc.reply)
                    continue
                assert event is NEED_DATA
                assert conn.buffered < MAX_COMMAND_LINE_OCTETS
                break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert events == [Err("Line too long")]  # one -ERR for the whole line
    conn.receive_data(b"\r\nCAPA\r\n")
    assert conn.next_event() == Capa()


def test_ten_megabytes_without_lf_inside_sasl() -> None:
    conn = ServerConnection()
    conn.send(Ok("ready"))
    conn.receive_data(b"AUTH PLAIN\r\n")
    conn.next_event()
    conn.send(SaslChallenge())
    errors = 0
    for _ in range(TEN_MB // len(CHUNK)):
        conn.receive_data(CHUNK)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                errors += 1
                conn.send(exc.reply)
                continue
            assert event is NEED_DATA
            assert conn.buffered < MAX_SASL_LINE_OCTETS
            break
    assert errors == 1


def test_ten_megabytes_without_lf_to_client_status_is_fatal_at_once() -> None:
    conn = ClientConnection()
    conn.receive_data(CHUNK)
    with pytest.raises(RemoteProtocolError) as raised:
        conn.next_event()
    assert raised.value.fatal


def test_ten_megabytes_without_lf_in_a_body_streams() -> None:
    conn = ClientConnection()
    conn.send(Retr(1))
    conn.receive_data(b"+OK\r\n+OK\r\n")
    assert conn.next_event() == Ok("")
    assert conn.next_event() == Ok("")
    total = 0
    for _ in range(TEN_MB // len(CHUNK)):
        conn.receive_data(CHUNK)
        event = conn.next_event()
        assert isinstance(event, Data)
        total += len(event.data)
        assert conn.next_event() is NEED_DATA
        assert conn.buffered == 0
    assert total == TEN_MB


HOSTILE = {
    "nul": b"\x00" * 1000 + b"\r\n" + b"\x00" * 100_000,
    "eight-bit": bytes(range(128, 256)) * 40 + b"\r\n" + bytes(range(256)) * 40 + b"\n",
    "lone-cr": b"\r" * 100_000,
    "cr-lines": b"NOOP\r" * 10 + b"\r\n" + b"USER a\rPASS b\r\n",
    "lf-only": b"\n" * 5000,
    "dots": b".\r\n" * 1000 + b"..\r\n" * 1000,
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_bytes_to_server(data: bytes) -> None:
    for chunks in ([data], list(byte_chunks(data[:3000]))):
        conn = ServerConnection(ServerSettings(max_bad_commands=10_000))
        conn.send(Ok("ready"))
        drive_server(conn, chunks, random.Random(0))


@pytest.mark.parametrize("data", HOSTILE.values(), ids=list(HOSTILE))
@pytest.mark.parametrize("command", [Noop(), Retr(1), Capa()], ids=["noop", "retr", "capa"])
def test_hostile_bytes_to_client(data: bytes, command: Command) -> None:
    for chunks in ([b"+OK\r\n", data], [b"+OK\r\n", *byte_chunks(data[:3000])]):
        conn = ClientConnection()
        conn.send(command)
        drive_client(conn, chunks)


# --- Grammar-based commands, mutated ------------------------------------------------

NUMBERS = st.integers(1, MAX_MESSAGE_NUMBER)
SAFE_TEXT = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x2FF, blacklist_categories=("Cc", "Zs")),
    min_size=1,
    max_size=30,
)
SECRETS = st.binary(min_size=1, max_size=40).map(Secret)
GRAMMAR_COMMANDS: st.SearchStrategy[Command] = st.one_of(
    st.builds(User, SAFE_TEXT),
    st.builds(
        Pass,
        st.binary(min_size=1, max_size=40)
        .filter(lambda p: all(0x20 <= b != 0x7F for b in p) and p.strip(b" ") == p and p != b"")
        .map(Secret),
    ),
    st.builds(Apop, SAFE_TEXT, st.text("0123456789abcdef", min_size=32, max_size=32)),
    st.builds(Auth, st.none() | st.just("PLAIN"), st.none()),
    st.builds(Auth, st.just("PLAIN"), SECRETS | st.just(Secret(b""))),
    st.sampled_from([Stls(), Capa(), Stat(), Noop(), Rset(), Quit(), List(), Uidl()]),
    st.builds(List, NUMBERS),
    st.builds(Uidl, NUMBERS),
    st.builds(Retr, NUMBERS),
    st.builds(Dele, NUMBERS),
    st.builds(Top, NUMBERS, st.integers(0, MAX_MESSAGE_NUMBER)),
)


@st.composite
def mutated(draw: st.DrawFn, wire: bytes) -> bytes:
    """``wire`` with a few octets inserted, deleted or replaced, or its case changed."""
    data = bytearray(wire)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["insert", "delete", "replace", "swapcase"])):
            case "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=3))
            case "delete" if data:
                del data[min(at, len(data) - 1)]
            case "replace" if data:
                data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
            case _:
                data[:] = bytes(data).swapcase()
    return bytes(data)


@FAST
@given(command=GRAMMAR_COMMANDS)
def test_every_command_round_trips_through_the_parser(command: Command) -> None:
    wire = serialize_command(command)
    assert wire.endswith(b"\r\n")
    assert parse_command(wire[:-2]) == command


@FAST
@given(
    data=st.lists(GRAMMAR_COMMANDS, min_size=1, max_size=8).flatmap(
        lambda commands: st.tuples(
            *(mutated(serialize_command(c)) | st.just(serialize_command(c)) for c in commands)
        )
    ),
    settings=SETTINGS,
    cuts=st.lists(st.integers(0, 2000), max_size=8),
    seed=st.integers(0, 2**32),
)
def test_mutated_grammar_commands_to_server(
    data: tuple[bytes, ...], settings: ServerSettings, cuts: list[int], seed: int
) -> None:
    conn = ServerConnection(settings)
    conn.send(Ok("ready"))
    drive_server(conn, split_at(b"".join(data), cuts), random.Random(seed))


# --- Multi-line replies from a server, split anywhere ------------------------------

REPLY_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
STATUS = st.one_of(
    st.builds(Ok, REPLY_TEXT.map(str.strip)),
    st.builds(Err, REPLY_TEXT.map(str.strip).filter(lambda t: not t.startswith("["))),
    st.builds(Err, REPLY_TEXT.map(str.strip), st.sampled_from(list(ResponseCode))),
)
SCRIPTED_COMMANDS: list[Command] = [
    Capa(), Stat(), List(), List(2), Retr(1), Top(1, 3), Uidl(), Uidl(4), Noop(), Dele(2),
]  # fmt: skip


@FAST
@given(
    exchanges=st.lists(
        st.tuples(st.sampled_from(SCRIPTED_COMMANDS), STATUS, CONTENT), min_size=1, max_size=6
    ),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
    stuffed=st.booleans(),
)
def test_pipelined_replies_split_anywhere_decode_to_what_was_sent(
    exchanges: list[tuple[Command, Ok | Err, bytes]], cuts: list[int], stuffed: bool
) -> None:
    """The client role matches every reply to its command from the FIFO and gets each
    body back exactly, however the octets are cut (RFC 1939 §3, RFC 2449 §6.6)."""
    conn = ClientConnection(expect_greeting=False)
    wire = bytearray()
    want: list[object] = []
    for command, status, body in exchanges:
        conn.send(command, stuffed_body=stuffed)
        wire += format_status(status)
        want.append(status)
        if isinstance(status, Ok) and multiline_on_ok(command):
            stuffer = DotStuffer()
            stuffed_body = stuffer.stuff(body) + stuffer.finish()
            wire += stuffed_body
            # As relayed: the octets up to the terminator line; decoded: the content.
            want.append(stuffed_body[:-3] if stuffed else expected_content(body))
            want.append(EndOfData())
    events: list[object] = []
    collected = bytearray()
    for chunk in split_at(bytes(wire), cuts):
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, Data | StuffedData):
                assert isinstance(event, StuffedData) == stuffed
                collected += event.data
                continue
            if isinstance(event, EndOfData):
                events.append(bytes(collected))
                collected.clear()
            events.append(event)
    assert events == want
    assert conn.outstanding == 0
