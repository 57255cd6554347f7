"""The server role of the sans-IO core (popproxy.pop3.server).

Every case goes through ``run_server``, which feeds the client's octets whole
and byte by byte and asserts both give the same events and the same replies.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pop3_helpers import PLAIN_OK, Rejected, run_server

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
    Verb,
)
from popproxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from popproxy.pop3.events import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    EndOfData,
    SaslChallenge,
    StuffedData,
)
from popproxy.pop3.limits import (
    COMMAND_LINE_CEILING_OCTETS,
    MAX_BAD_COMMANDS,
    MAX_COMMAND_LINE_OCTETS,
    MAX_SASL_LINE_OCTETS,
    SASL_PAYLOAD_FLOOR_OCTETS,
)
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.pop3.server import PLAINTEXT_DISALLOWED, ServerConnection, ServerSettings
from popproxy.pop3.state import Phase
from popproxy.secret import Secret

GREETING = b"+OK POP3 ready\r\n"
LOGIN = b"USER alice\r\nPASS secret\r\n"
LOGIN_EVENTS: list[object] = [User("alice"), Pass(Secret(b"secret"), user="alice")]
PLAIN_B64 = base64.b64encode(PLAIN_OK)
USER_B64 = base64.b64encode(b"alice")
PASS_B64 = base64.b64encode(b"secret")
DIGEST = b"c4c9334bac560ecc979e58001b3e22fb"
ALL_ON = ServerSettings(stls_available=True)
NO_PLAINTEXT = ServerSettings(stls_available=True, plaintext_auth_allowed=False)


def rejected(text: str, code: ResponseCode | None = None, *, fatal: bool = False) -> Rejected:
    return Rejected(Err(text, code), fatal)


WRONG_PHASE = rejected("Command not valid in this state")


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    events: list[object]
    phase: Phase
    settings: ServerSettings | None = None
    eof: bool = False
    output: bytes | None = None  # the whole output after the greeting, when it matters


CASES = [
    Case(
        "user-pass",
        LOGIN,
        LOGIN_EVENTS,
        Phase.TRANSACTION,
        output=b"+OK\r\n+OK Logged in\r\n",
    ),
    Case("lowercase-verbs", b"user alice\r\npass secret\r\n", LOGIN_EVENTS, Phase.TRANSACTION),
    Case("bare-lf-line-ends", b"USER alice\nPASS secret\n", LOGIN_EVENTS, Phase.TRANSACTION),
    Case(
        "pass-keeps-spaces",
        b"USER alice\r\nPASS  se cret \r\n",
        [User("alice"), Pass(Secret(b" se cret "), user="alice")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "pass-without-user",
        b"PASS secret\r\n",
        [rejected("No username given")],
        Phase.AUTHORIZATION,
        output=b"-ERR No username given\r\n",
    ),
    Case(
        "failed-pass-forgets-user",
        b"USER alice\r\nPASS wrong\r\nPASS secret\r\n",
        [User("alice"), Pass(Secret(b"wrong"), user="alice"), rejected("No username given")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "pass-without-argument",
        b"USER alice\r\nPASS\r\n",
        [User("alice"), rejected("Missing password")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "auth-plain-initial-response",
        b"AUTH PLAIN " + PLAIN_B64 + b"\r\n",
        [Auth("PLAIN", Secret(PLAIN_OK))],
        Phase.TRANSACTION,
        output=b"+OK Logged in\r\n",
    ),
    Case(
        "auth-mechanism-case-insensitive",
        b"auth plain " + PLAIN_B64 + b"\r\n",
        [Auth("PLAIN", Secret(PLAIN_OK))],
        Phase.TRANSACTION,
    ),
    Case(
        "auth-plain-continuation",
        b"AUTH PLAIN\r\n" + PLAIN_B64 + b"\r\nSTAT\r\n",
        [Auth("PLAIN"), SaslResponse(Secret(PLAIN_OK), "PLAIN"), Stat()],
        Phase.TRANSACTION,
        output=b"+ \r\n+OK Logged in\r\n+OK 2 79\r\n",
    ),
    Case(
        "auth-cancel",
        b"AUTH PLAIN\r\n*\r\nCAPA\r\n",
        [Auth("PLAIN"), SaslCancel(), Capa()],
        Phase.AUTHORIZATION,
        output=b"+ \r\n-ERR Authentication cancelled\r\n"
        b"+OK Capability list follows\r\nUSER\r\nTOP\r\n.\r\n",
    ),
    Case(
        "auth-empty-initial-response",
        b"AUTH PLAIN =\r\n",
        [Auth("PLAIN", Secret(b""))],
        Phase.AUTHORIZATION,
        output=b"-ERR [AUTH] Wrong credentials\r\n",
    ),
    Case(
        "auth-empty-continuation",
        b"AUTH PLAIN\r\n=\r\n",
        [Auth("PLAIN"), SaslResponse(Secret(b""), "PLAIN")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "auth-invalid-base64-initial",
        b"AUTH PLAIN !!!!\r\nCAPA\r\n",
        [rejected("Invalid base64 data"), Capa()],
        Phase.AUTHORIZATION,
    ),
    Case(
        "auth-invalid-base64-continuation",
        b"AUTH PLAIN\r\nnot base64!\r\nCAPA\r\n",
        [Auth("PLAIN"), rejected("Invalid base64 data"), Capa()],
        Phase.AUTHORIZATION,
        output=b"+ \r\n-ERR Invalid base64 data\r\n"
        b"+OK Capability list follows\r\nUSER\r\nTOP\r\n.\r\n",
    ),
    # AUTH LOGIN (draft-murchison-sasl-login): "Username:" and "Password:" prompts.
    Case(
        "auth-login",
        b"AUTH LOGIN\r\n" + USER_B64 + b"\r\n" + PASS_B64 + b"\r\nSTAT\r\n",
        [
            Auth("LOGIN"),
            SaslResponse(Secret(b"alice"), "LOGIN"),
            SaslResponse(Secret(b"secret"), "LOGIN", (Secret(b"alice"),)),
            Stat(),
        ],
        Phase.TRANSACTION,
        output=b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n+OK Logged in\r\n+OK 2 79\r\n",
    ),
    Case(
        "auth-login-lowercase",
        b"auth login\r\n" + USER_B64 + b"\r\n" + PASS_B64 + b"\r\n",
        [
            Auth("LOGIN"),
            SaslResponse(Secret(b"alice"), "LOGIN"),
            SaslResponse(Secret(b"secret"), "LOGIN", (Secret(b"alice"),)),
        ],
        Phase.TRANSACTION,
    ),
    Case(
        "auth-login-user-as-initial-response",
        b"AUTH LOGIN " + USER_B64 + b"\r\n" + PASS_B64 + b"\r\n",
        [
            Auth("LOGIN", Secret(b"alice")),
            SaslResponse(Secret(b"secret"), "LOGIN", (Secret(b"alice"),)),
        ],
        Phase.TRANSACTION,
        output=b"+ UGFzc3dvcmQ6\r\n+OK Logged in\r\n",
    ),
    Case(
        "auth-login-wrong-password",
        b"AUTH LOGIN\r\n" + USER_B64 + b"\r\nd3Jvbmc=\r\nCAPA\r\n",
        [
            Auth("LOGIN"),
            SaslResponse(Secret(b"alice"), "LOGIN"),
            SaslResponse(Secret(b"wrong"), "LOGIN", (Secret(b"alice"),)),
            Capa(),
        ],
        Phase.AUTHORIZATION,
        output=b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n-ERR [AUTH] Wrong credentials\r\n"
        b"+OK Capability list follows\r\nUSER\r\nTOP\r\n.\r\n",
    ),
    Case(
        "auth-login-cancel-at-the-user-name",
        b"AUTH LOGIN\r\n*\r\nCAPA\r\n",
        [Auth("LOGIN"), SaslCancel(), Capa()],
        Phase.AUTHORIZATION,
        output=b"+ VXNlcm5hbWU6\r\n-ERR Authentication cancelled\r\n"
        b"+OK Capability list follows\r\nUSER\r\nTOP\r\n.\r\n",
    ),
    Case(
        "auth-login-cancel-at-the-password",
        b"AUTH LOGIN\r\n" + USER_B64 + b"\r\n*\r\nCAPA\r\n",
        [Auth("LOGIN"), SaslResponse(Secret(b"alice"), "LOGIN"), SaslCancel(), Capa()],
        Phase.AUTHORIZATION,
        output=b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n-ERR Authentication cancelled\r\n"
        b"+OK Capability list follows\r\nUSER\r\nTOP\r\n.\r\n",
    ),
    Case(
        "auth-login-invalid-base64-password",
        b"AUTH LOGIN\r\n" + USER_B64 + b"\r\nnot base64!\r\nCAPA\r\n",
        [
            Auth("LOGIN"),
            SaslResponse(Secret(b"alice"), "LOGIN"),
            rejected("Invalid base64 data"),
            Capa(),
        ],
        Phase.AUTHORIZATION,
    ),
    Case(
        "auth-login-refused-in-plaintext",
        b"AUTH LOGIN\r\nCAPA\r\n",
        [Rejected(PLAINTEXT_DISALLOWED, False), Capa()],
        Phase.AUTHORIZATION,
        settings=ServerSettings(plaintext_auth_allowed=False),
    ),
    Case(
        "auth-unsupported-mechanism",
        b"AUTH CRAM-MD5\r\n",
        [rejected("Unsupported authentication mechanism")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "auth-invalid-mechanism-name",
        b"AUTH PL@IN\r\n",
        [rejected("Invalid SASL mechanism name")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "auth-too-many-arguments",
        b"AUTH PLAIN = =\r\n",
        [rejected("Too many arguments")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "bare-auth-lists-mechanisms",
        b"AUTH\r\nSTAT\r\n",
        [Auth(), WRONG_PHASE],
        Phase.AUTHORIZATION,
        output=b"+OK Mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n"
        b"-ERR Command not valid in this state\r\n",
    ),
    Case(
        "apop-always-refused",
        b"APOP alice " + DIGEST + b"\r\n",
        [rejected("APOP is not enabled")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "apop-bad-digest",
        b"APOP alice 1234\r\n",
        [rejected("APOP takes a name and a 32-digit MD5 digest")],
        Phase.AUTHORIZATION,
        settings=ALL_ON,
    ),
    Case(
        "plaintext-refused-user",
        b"USER alice\r\nPASS secret\r\nAUTH PLAIN " + PLAIN_B64 + b"\r\n",
        [Rejected(PLAINTEXT_DISALLOWED, False)] * 3,
        Phase.AUTHORIZATION,
        settings=NO_PLAINTEXT,
        output=3 * b"-ERR [AUTH] Plaintext authentication disallowed"
        b" on non-secure (SSL/TLS) connections.\r\n",
    ),
    Case(
        "stls-refused-when-unavailable",
        b"STLS\r\nCAPA\r\n",
        [rejected("STLS is not available"), Capa()],
        Phase.AUTHORIZATION,
    ),
    Case(
        "stls-then-clean-slate",
        b"STLS\r\n",
        [Stls(), "TLS"],
        Phase.AUTHORIZATION,
        settings=ALL_ON,
        output=b"+OK Begin TLS negotiation\r\n",
    ),
    Case(
        "stls-args",
        b"STLS now\r\n",
        [rejected("Too many arguments")],
        Phase.AUTHORIZATION,
        settings=ALL_ON,
    ),
    Case(
        "unknown-command",
        b"HELO x\r\nCAPA\r\n",
        [rejected("Unknown command"), Capa()],
        Phase.AUTHORIZATION,
    ),
    Case("empty-line", b"\r\n", [rejected("Unknown command")], Phase.AUTHORIZATION),
    Case(
        "nul-byte",
        b"USER al\x00ice\r\n",
        [rejected("Invalid characters in command")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "lone-cr",
        b"USER al\rice\r\nUSER bob\r\r\n",
        [rejected("Invalid characters in command")] * 2,
        Phase.AUTHORIZATION,
    ),
    Case(
        "eight-bit-verb",
        b"US\xc9R alice\r\n",
        [rejected("Unknown command")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "eight-bit-utf8-user",
        "USER jürgen\r\n".encode(),
        [User("jürgen")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "eight-bit-invalid-utf8-user",
        b"USER j\xfcrgen\r\n",
        [rejected("Invalid UTF-8 in argument")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "user-two-arguments",
        b"USER alice bob\r\n",
        [rejected("USER takes exactly one argument")],
        Phase.AUTHORIZATION,
    ),
    Case(
        "quit-in-authorization",
        b"QUIT\r\nCAPA\r\n",
        [Quit()],
        Phase.CLOSED,
        output=b"+OK\r\n",
    ),
    Case(
        "quit-in-transaction",
        LOGIN + b"DELE 1\r\nQUIT\r\nCAPA\r\n",
        [*LOGIN_EVENTS, Dele(1), Quit()],
        Phase.CLOSED,
    ),
    Case("eof", b"", [ConnectionClosed()], Phase.AUTHORIZATION, eof=True),
    Case(
        "eof-after-partial-line",
        LOGIN + b"STA",
        [*LOGIN_EVENTS, ConnectionClosed()],
        Phase.TRANSACTION,
        eof=True,
    ),
    Case(
        "eof-inside-sasl",
        b"AUTH PLAIN\r\n",
        [Auth("PLAIN"), ConnectionClosed()],
        Phase.SASL,
        eof=True,
    ),
    Case(
        "pipelined-answered-in-order",
        LOGIN + b"STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 1\r\nTOP 2 1\r\nNOOP\r\nRSET\r\nQUIT\r\n",
        [
            *LOGIN_EVENTS,
            Stat(),
            List(),
            List(2),
            Uidl(),
            Uidl(1),
            Top(2, 1),
            Noop(),
            Rset(),
            Quit(),
        ],
        Phase.CLOSED,
        output=b"+OK\r\n+OK Logged in\r\n+OK 2 79\r\n"
        b"+OK scan listing follows\r\n1 23\r\n2 56\r\n.\r\n"
        b"+OK 2 56\r\n"
        b"+OK\r\n1 uid1\r\n2 uid2\r\n.\r\n"
        b"+OK 1 uid1\r\n"
        b"+OK\r\nSubject: two\r\n\r\n..starts with a dot\r\n.\r\n"
        b"+OK\r\n+OK\r\n+OK\r\n",
    ),
    Case(
        "retr-is-dot-stuffed",
        LOGIN + b"RETR 2\r\n",
        [*LOGIN_EVENTS, Retr(2)],
        Phase.TRANSACTION,
        output=b"+OK\r\n+OK Logged in\r\n+OK 56 octets\r\n"
        b"Subject: two\r\n\r\n..starts with a dot\r\n...two dots\r\n..\r\nend\r\n.\r\n",
    ),
    Case(
        "top-zero-lines",
        LOGIN + b"TOP 1 0\r\n",
        [*LOGIN_EVENTS, Top(1, 0)],
        Phase.TRANSACTION,
        output=b"+OK\r\n+OK Logged in\r\n+OK\r\nSubject: one\r\n\r\n.\r\n",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case) -> None:
    run = run_server(case.data, case.settings, eof=case.eof)
    assert run.events == case.events
    assert run.conn.phase is case.phase
    assert run.output.startswith(GREETING)
    if case.output is not None:
        assert bytes(run.output[len(GREETING) :]) == case.output


# --- Every command in every phase -------------------------------------------

SAMPLES: dict[str, tuple[bytes, Command]] = {
    "USER": (b"USER bob", User("bob")),
    "PASS": (b"PASS pw", Pass(Secret(b"pw"))),
    "APOP": (b"APOP bob " + DIGEST, Apop("bob", DIGEST.decode())),
    "AUTH": (b"AUTH PLAIN =", Auth("PLAIN", Secret(b""))),
    "STLS": (b"STLS", Stls()),
    "CAPA": (b"CAPA", Capa()),
    "STAT": (b"STAT", Stat()),
    "LIST": (b"LIST", List()),
    "LIST n": (b"LIST 1", List(1)),
    "RETR": (b"RETR 1", Retr(1)),
    "DELE": (b"DELE 1", Dele(1)),
    "NOOP": (b"NOOP", Noop()),
    "RSET": (b"RSET", Rset()),
    "QUIT": (b"QUIT", Quit()),
    "TOP": (b"TOP 1 1", Top(1, 1)),
    "UIDL": (b"UIDL", Uidl()),
    "UIDL n": (b"UIDL 1", Uidl(1)),
}
# RFC 1939 §§4-7, RFC 2449 §5, RFC 2595 §4, RFC 5034 §4, written out here rather
# than read from state.ALLOWED so that the table is checked, not echoed.
IN_AUTHORIZATION = {"USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT"}
IN_TRANSACTION = {
    "CAPA", "STAT", "LIST", "LIST n", "RETR", "DELE", "NOOP", "RSET", "QUIT", "TOP", "UIDL",
    "UIDL n",
}  # fmt: skip
PHASE_PREFIX = {Phase.AUTHORIZATION: b"", Phase.TRANSACTION: LOGIN}


@pytest.mark.parametrize("phase", [Phase.AUTHORIZATION, Phase.TRANSACTION], ids=lambda p: p.name)
@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_command_in_every_phase(phase: Phase, name: str) -> None:
    line, command = SAMPLES[name]
    prefix = PHASE_PREFIX[phase]
    run = run_server(prefix + line + b"\r\n", ALL_ON)
    before = 2 if prefix else 0
    event = run.events[before:]
    allowed = IN_AUTHORIZATION if phase is Phase.AUTHORIZATION else IN_TRANSACTION
    if name == "PASS" and phase is Phase.AUTHORIZATION:
        assert event == [rejected("No username given")]
    elif name == "APOP" and phase is Phase.AUTHORIZATION:
        assert event == [rejected("APOP is not enabled")]  # parsed, never offered
    elif name in allowed:
        assert event[0] == command
    else:
        assert event == [WRONG_PHASE]
        assert run.replies[-1] == b"-ERR Command not valid in this state\r\n"
    if name == "QUIT":
        assert run.conn.phase is Phase.CLOSED
        return
    # The session goes on: the next command is read and answered.
    run.conn.receive_data(b"CAPA\r\n")
    assert run.conn.next_event() == Capa()


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_line_inside_sasl_is_a_sasl_response(name: str) -> None:
    line, _ = SAMPLES[name]
    run = run_server(b"AUTH PLAIN\r\n" + line + b"\r\n")
    assert run.events[0] == Auth("PLAIN")
    try:
        expected: object = SaslResponse(Secret(base64.b64decode(line, validate=True)), "PLAIN")
    except ValueError:
        expected = rejected("Invalid base64 data")
    assert run.events[1:] == [expected]
    assert run.conn.phase is Phase.AUTHORIZATION


@pytest.mark.parametrize("phase", [Phase.UPDATE, Phase.TLS_HANDSHAKE, Phase.CLOSED])
def test_no_command_is_read_in_phase(phase: Phase) -> None:
    conn = greeted(ALL_ON)
    conn.receive_data(LOGIN if phase is Phase.UPDATE else b"")
    match phase:
        case Phase.UPDATE:
            answer(conn, Ok())
            answer(conn, Ok())
            conn.receive_data(b"QUIT\r\n")
            assert conn.next_event() == Quit()
        case Phase.TLS_HANDSHAKE:
            conn.receive_data(b"STLS\r\n")
            answer(conn, Ok())
        case Phase.CLOSED:
            conn.receive_data(b"QUIT\r\n")
            answer(conn, Ok())
    assert conn.phase is phase
    with pytest.raises(LocalProtocolError):
        conn.next_event()


# --- Direct drivers for what run_server cannot express ----------------------


def greeted(settings: ServerSettings | None = None) -> ServerConnection:
    conn = ServerConnection(settings)
    assert conn.send(Ok("POP3 ready")) == GREETING
    return conn


def phase_of(conn: ServerConnection) -> Phase:
    """The phase, read through a call so that mypy does not narrow it across sends."""
    return conn.phase


def answer(conn: ServerConnection, reply: Ok | Err) -> bytes:
    event = conn.next_event()
    assert event is not NEED_DATA
    return conn.send(reply)


def test_quit_in_transaction_passes_through_update_to_closed() -> None:
    conn = greeted()
    conn.receive_data(LOGIN + b"QUIT\r\n")
    answer(conn, Ok())
    answer(conn, Ok())
    assert phase_of(conn) is Phase.TRANSACTION
    assert conn.next_event() == Quit()
    assert phase_of(conn) is Phase.UPDATE  # deletions are committed while the reply is due
    assert conn.send(Err("Deletion failed", ResponseCode.SYS_TEMP)) == (
        b"-ERR [SYS/TEMP] Deletion failed\r\n"
    )
    assert conn.phase is Phase.CLOSED


def test_quit_ok_in_update_closes() -> None:
    conn = greeted()
    conn.receive_data(LOGIN + b"QUIT\r\n")
    answer(conn, Ok())
    answer(conn, Ok())
    answer(conn, Ok("bye"))
    assert conn.phase is Phase.CLOSED


def test_stls_with_pipelined_bytes_is_fatal() -> None:
    # Whole only: fed byte by byte, STLS arrives alone and is (rightly) accepted.
    run = run_server(b"STLS\r\nUSER alice\r\n", ALL_ON, whole_only=True)
    assert run.events == [rejected("STLS must be the last command sent in clear", fatal=True)]
    assert run.conn.phase is Phase.CLOSED
    assert run.replies[-1] == b"-ERR STLS must be the last command sent in clear\r\n"


def test_stls_followed_by_a_partial_line_is_fatal() -> None:
    conn = greeted(ALL_ON)
    conn.receive_data(b"STLS\r\nU")
    with pytest.raises(RemoteProtocolError) as raised:
        conn.next_event()
    assert raised.value.fatal


def feed_both(data: bytes, conns: tuple[ServerConnection, ServerConnection]) -> object:
    """Feed one command line whole to one connection and byte by byte to the other."""
    whole, split = conns
    whole.receive_data(data)
    event = whole.next_event()
    for i in range(len(data)):
        assert split.next_event() is NEED_DATA
        split.receive_data(data[i : i + 1])
    assert split.next_event() == event
    return event


def test_tls_established_forgets_user_and_settings() -> None:
    pair = (greeted(ALL_ON), greeted(ALL_ON))
    assert feed_both(b"USER alice\r\n", pair) == User("alice")
    for conn in pair:
        conn.send(Ok())
        assert conn.user == "alice"
    assert feed_both(b"STLS\r\n", pair) == Stls()
    after_tls = ServerSettings(plaintext_auth_allowed=True, stls_available=False)
    for conn in pair:
        conn.send(Ok("Begin TLS"))
        assert phase_of(conn) is Phase.TLS_HANDSHAKE
        conn.tls_established(after_tls)
        assert conn.user is None
        assert conn.phase is Phase.AUTHORIZATION
        assert conn.settings == after_tls
        conn.receive_data(b"PASS secret\r\n")
        with pytest.raises(RemoteProtocolError) as raised:
            conn.next_event()
        assert raised.value.reply == Err("No username given")
        conn.send(raised.value.reply)


def test_tls_established_outside_handshake_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        greeted().tls_established(ServerSettings())


def test_stls_refused_by_the_session_stays_in_authorization() -> None:
    conn = greeted(ALL_ON)
    conn.receive_data(b"STLS\r\n")
    answer(conn, Err("TLS is broken", ResponseCode.SYS_TEMP))
    assert conn.phase is Phase.AUTHORIZATION


# --- Bad-command budget -------------------------------------------------------


def test_bad_command_budget_closes_the_session() -> None:
    data = b"BAD\r\n" * MAX_BAD_COMMANDS + b"CAPA\r\n"
    run = run_server(data)
    assert run.events == [rejected("Unknown command")] * (MAX_BAD_COMMANDS - 1) + [
        rejected("Too many bad commands, closing", fatal=True)
    ]
    assert run.conn.phase is Phase.CLOSED
    assert run.replies[-1] == b"-ERR Too many bad commands, closing\r\n"


def test_bad_command_budget_counts_consecutive_commands() -> None:
    bad = b"BAD\r\n" * (MAX_BAD_COMMANDS - 1)
    run = run_server(bad + b"CAPA\r\n" + bad + b"CAPA\r\n")
    assert run.events.count(Capa()) == 2
    assert not any(isinstance(e, Rejected) and e.fatal for e in run.events)
    assert run.conn.phase is Phase.AUTHORIZATION


def test_bad_command_budget_is_a_setting() -> None:
    run = run_server(b"BAD\r\nBAD\r\nCAPA\r\n", ServerSettings(max_bad_commands=2))
    assert run.events == [
        rejected("Unknown command"),
        rejected("Too many bad commands, closing", fatal=True),
    ]
    assert run.conn.phase is Phase.CLOSED


def test_policy_refusals_do_not_spend_the_budget() -> None:
    data = b"USER alice\r\n" * (MAX_BAD_COMMANDS * 2) + b"CAPA\r\n"
    run = run_server(data, NO_PLAINTEXT)
    assert run.events[-1] == Capa()
    assert run.conn.phase is Phase.AUTHORIZATION


# --- The verb of a rejected command (the commands metric) ---------------------


@pytest.mark.parametrize(
    ("data", "settings", "verb"),
    [
        (b"BAD\r\n", None, None),  # unknown verb
        (b"RETR x\r\n", None, None),  # a known verb, but the line does not parse
        (b"USER a\x01b\r\n", None, None),  # control characters
        (b"C" * (MAX_COMMAND_LINE_OCTETS + 1) + b"\r\n", None, None),  # too long
        (b"RETR 1\r\n", None, Verb.RETR),  # parsed, but not valid in AUTHORIZATION
        (b"PASS secret\r\n", None, Verb.PASS),  # no USER first
        (b"USER alice\r\n", NO_PLAINTEXT, Verb.USER),  # a policy refusal
        (b"APOP alice " + DIGEST + b"\r\n", None, Verb.APOP),  # APOP is never offered
        (b"AUTH CRAM-MD5\r\n", None, Verb.AUTH),  # mechanism not offered
        (b"STLS\r\nCAPA\r\n", ALL_ON, Verb.STLS),  # pipelined behind STLS
        (b"AUTH PLAIN\r\n!!\r\n", None, Verb.AUTH),  # a malformed SASL response
    ],
)
def test_a_rejection_names_the_verb_it_rejected(
    data: bytes, settings: ServerSettings | None, verb: Verb | None
) -> None:
    conn = greeted(settings)
    assert conn.rejected_verb is None
    conn.receive_data(data)
    if data.startswith(b"AUTH PLAIN\r\n"):
        assert conn.next_event() == Auth("PLAIN")
        conn.send(SaslChallenge(b""))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.rejected_verb is verb


def test_the_rejected_verb_is_that_of_the_last_rejection() -> None:
    conn = greeted()
    conn.receive_data(b"RETR 1\r\nBAD\r\n")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.rejected_verb is Verb.RETR
    conn.send(Err("Command not valid in this state"))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.rejected_verb is None


# --- Line limits --------------------------------------------------------------


def test_command_line_of_255_octets_is_accepted() -> None:
    name = b"a" * (MAX_COMMAND_LINE_OCTETS - len(b"USER \r\n"))
    line = b"USER " + name + b"\r\n"
    assert len(line) == MAX_COMMAND_LINE_OCTETS
    run = run_server(line)
    assert run.events == [User(name.decode())]


def test_overlong_command_line_gets_one_err_and_is_discarded() -> None:
    line = b"USER " + b"a" * (MAX_COMMAND_LINE_OCTETS - len(b"USER \r\n") + 1) + b"\r\n"
    assert len(line) == MAX_COMMAND_LINE_OCTETS + 1
    run = run_server(line + b"NOOP " + b"x" * 5000 + b"\r\nCAPA\r\n")
    assert run.events == [rejected("Line too long"), rejected("Line too long"), Capa()]
    assert run.replies[1:3] == [b"-ERR Line too long\r\n"] * 2


def test_auth_line_may_reach_the_sasl_limit() -> None:
    room = MAX_SASL_LINE_OCTETS - len(b"AUTH PLAIN \r\n")
    response = base64.b64encode(b"\x00u\x00" + b"p" * (room // 4 * 3 - 3))
    line = b"AUTH PLAIN " + response + b"\r\n"
    assert MAX_SASL_LINE_OCTETS - 4 < len(line) <= MAX_SASL_LINE_OCTETS
    run = run_server(line)
    assert run.events == [Auth("PLAIN", Secret(base64.b64decode(response)))]


def test_auth_line_past_the_sasl_limit_is_overlong() -> None:
    response = base64.b64encode(b"p" * MAX_SASL_LINE_OCTETS)
    run = run_server(b"AUTH PLAIN " + response + b"\r\nCAPA\r\n")
    assert run.events == [rejected("Line too long"), Capa()]


def test_sasl_continuation_may_reach_the_sasl_limit() -> None:
    response = base64.b64encode(b"p" * ((MAX_SASL_LINE_OCTETS - 2) // 4 * 3))
    assert MAX_SASL_LINE_OCTETS - 4 < len(response) + 2 <= MAX_SASL_LINE_OCTETS
    run = run_server(b"AUTH PLAIN\r\n" + response + b"\r\n")
    assert run.events[1] == SaslResponse(Secret(base64.b64decode(response)), "PLAIN")


def test_sasl_continuation_past_the_sasl_limit_is_overlong() -> None:
    response = base64.b64encode(b"p" * MAX_SASL_LINE_OCTETS)
    run = run_server(b"AUTH PLAIN\r\n" + response + b"\r\nCAPA\r\n")
    # The -ERR ends the AUTH exchange (RFC 5034 §4): the next line is a command again.
    assert run.events == [Auth("PLAIN"), rejected("Line too long"), Capa()]
    assert run.conn.phase is Phase.AUTHORIZATION


def test_long_line_that_merely_contains_auth_is_not_a_sasl_line() -> None:
    run = run_server(b"USER AUTH " + b"a" * 400 + b"\r\n")
    assert run.events == [rejected("Line too long")]


@pytest.mark.parametrize("limit", [MAX_COMMAND_LINE_OCTETS, 300, COMMAND_LINE_CEILING_OCTETS])
def test_the_command_line_limit_is_a_setting(limit: int) -> None:
    settings = ServerSettings(max_command_line_octets=limit)
    fits = b"PASS " + b"p" * (limit - len(b"PASS \r\n")) + b"\r\n"
    over = b"PASS " + b"p" * (limit - len(b"PASS \r\n") + 1) + b"\r\n"
    run = run_server(b"USER a\r\n" + fits + b"USER a\r\n" + over, settings)
    assert run.events[1] == Pass(Secret(fits[5:-2]), user="a")
    assert run.events[3] == rejected("Line too long")


def test_the_sasl_line_limit_is_a_setting() -> None:
    settings = ServerSettings(max_sasl_line_octets=1024)
    fits = b"=" * 1022  # not base64: rejected as such, so it was read as a line
    over = b"=" * 1023
    run = run_server(b"AUTH PLAIN\r\n" + fits + b"\r\nAUTH PLAIN\r\n" + over + b"\r\n", settings)
    assert run.events == [
        Auth("PLAIN"),
        rejected("Invalid base64 data"),
        Auth("PLAIN"),
        rejected("Line too long"),
    ]


@given(
    st.integers(MAX_COMMAND_LINE_OCTETS, 600),
    st.integers(MAX_COMMAND_LINE_OCTETS, 600),
    st.integers(len(b"AUTH PLAIN \r\n") + 1, 700),
    st.sampled_from([b"AUTH", b"auth", b"AuTh", b"USER"]),
)
@settings(max_examples=60, deadline=None)
def test_an_auth_line_gets_the_sasl_bound_and_any_other_the_command_bound(
    command_bound: int, sasl_bound: int, octets: int, verb: bytes
) -> None:
    """Whole and byte by byte (run_server), with either bound the larger: the server role
    looks at the verb only once its buffer could reach a bound, and decides the same."""
    settings = ServerSettings(
        max_command_line_octets=command_bound, max_sasl_line_octets=sasl_bound
    )
    filler = b"=" * (octets - len(verb) - len(b" PLAIN \r\n"))
    line = verb + b" PLAIN " + filler + b"\r\n"
    run = run_server(line + b"CAPA\r\n", settings)
    bound = sasl_bound if verb.upper() == b"AUTH" else command_bound
    if octets > bound:
        assert run.events[0] == rejected("Line too long")
    else:
        assert run.events[0] != rejected("Line too long")
    assert run.events[-1] == Capa()


@pytest.mark.parametrize("where", ["initial-response", "continuation"])
def test_sasl_payload_over_its_limit_is_refused_and_ends_the_exchange(where: str) -> None:
    settings = ServerSettings(max_sasl_payload_octets=SASL_PAYLOAD_FLOOR_OCTETS)
    fits = base64.b64encode(b"\0u\0" + b"p" * (SASL_PAYLOAD_FLOOR_OCTETS - 3))
    over = base64.b64encode(b"\0u\0" + b"p" * (SASL_PAYLOAD_FLOOR_OCTETS - 2))
    if where == "initial-response":
        run = run_server(b"AUTH PLAIN " + over + b"\r\nAUTH PLAIN " + fits + b"\r\n", settings)
        assert run.events[0] == rejected("Authentication data too long")
    else:
        run = run_server(b"AUTH PLAIN\r\n" + over + b"\r\nAUTH PLAIN " + fits + b"\r\n", settings)
        assert run.events[:2] == [Auth("PLAIN"), rejected("Authentication data too long")]
    # RFC 5034 §4: the refusal ends the exchange; the next line is a command again.
    assert run.events[-1] == Auth("PLAIN", Secret(base64.b64decode(fits)))


# --- Message numbers ----------------------------------------------------------

BAD_NUMBERS = {
    b"0": "Invalid message number",
    b"-1": "Invalid number",
    b"+1": "Invalid number",
    b"01": "Invalid message number",
    b"2147483648": "Number out of range",  # 2**31
    b"4294967297": "Number out of range",  # 2**32 + 1
    b"18446744073709551617": "Invalid number",  # 2**64 + 1, too many digits
    b"1x": "Invalid number",
    b"x": "Invalid number",
    b"1.0": "Invalid number",
    b"\xd9\xa1": "Invalid number",  # ARABIC-INDIC DIGIT ONE
}
BAD_ARGUMENT_LINES = {
    b"RETR": "Missing message number",
    b"RETR ": "Missing message number",  # trailing spaces are tolerated, as in Dovecot
    b"RETR  1": "Invalid argument separator",
    b"RETR 1 2": "Too many arguments",
    b"LIST 1 2": "Too many arguments",
    b"STAT 1": "Too many arguments",
}


@pytest.mark.parametrize("verb", [b"RETR", b"DELE", b"LIST", b"UIDL", b"TOP"])
@pytest.mark.parametrize("raw", list(BAD_NUMBERS), ids=lambda r: r.decode(errors="replace"))
def test_strict_message_numbers(verb: bytes, raw: bytes) -> None:
    line = verb + b" " + raw + (b" 1" if verb == b"TOP" else b"")
    run = run_server(LOGIN + line + b"\r\nNOOP\r\n")
    assert run.events[2:] == [rejected(BAD_NUMBERS[raw]), Noop()]


@pytest.mark.parametrize("line", list(BAD_ARGUMENT_LINES), ids=lambda r: r.decode())
def test_bad_arguments(line: bytes) -> None:
    run = run_server(LOGIN + line + b"\r\nNOOP\r\n")
    assert run.events[2:] == [rejected(BAD_ARGUMENT_LINES[line]), Noop()]


@pytest.mark.parametrize(
    ("line", "command"),
    [(b"RETR 1 ", Retr(1)), (b"RETR 1   ", Retr(1)), (b"LIST ", List()), (b"STAT  ", Stat())],
)
def test_trailing_spaces_are_tolerated(line: bytes, command: Command) -> None:
    run = run_server(LOGIN + line + b"\r\n")
    assert run.events[2:] == [command]


def test_largest_message_number_is_accepted() -> None:
    run = run_server(LOGIN + b"RETR 2147483647\r\n")
    assert run.events[2:] == [Retr(2**31 - 1)]
    assert run.replies[-1] == b"-ERR No such message\r\n"


TOP_LINES = {
    b"TOP 1": rejected("TOP takes a message number and a line count"),
    b"TOP": rejected("TOP takes a message number and a line count"),
    b"TOP 1 1 1": rejected("TOP takes a message number and a line count"),
    b"TOP 0 1": rejected("Invalid message number"),
    b"TOP 1 -1": rejected("Invalid number"),
    b"TOP 1 x": rejected("Invalid number"),
    b"TOP 1 2147483648": rejected("Number out of range"),
    b"TOP 1  1": rejected("Invalid argument separator"),
    b"TOP 1 0": Top(1, 0),
    b"TOP 2 2147483647": Top(2, 2**31 - 1),
}


@pytest.mark.parametrize("line", list(TOP_LINES), ids=lambda r: r.decode())
def test_top_arguments(line: bytes) -> None:
    run = run_server(LOGIN + line + b"\r\n")
    assert run.events[2:] == [TOP_LINES[line]]


# --- Misuse by the session is a LocalProtocolError ---------------------------


def test_greeting_must_come_first() -> None:
    conn = ServerConnection()
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Data(b"x"))


def test_err_greeting_closes() -> None:
    conn = ServerConnection()
    assert conn.send(Err("Not now", ResponseCode.SYS_TEMP)) == b"-ERR [SYS/TEMP] Not now\r\n"
    assert conn.phase is Phase.CLOSED


def test_reply_while_none_is_due() -> None:
    conn = greeted()
    assert not conn.reply_due
    with pytest.raises(LocalProtocolError):
        conn.send(Ok())
    conn.receive_data(b"CAPA\r\n")
    assert conn.next_event() == Capa()
    conn.send(Ok())
    conn.send(EndOfData())
    with pytest.raises(LocalProtocolError):
        conn.send(Ok())


def test_next_event_while_a_reply_is_due() -> None:
    conn = greeted()
    conn.receive_data(b"CAPA\r\nCAPA\r\n")
    conn.next_event()
    assert conn.reply_due
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_rejected_command_must_get_err() -> None:
    conn = greeted()
    conn.receive_data(b"BAD\r\n")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Ok())
    assert conn.send(Err("no")) == b"-ERR no\r\n"


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"NOOP", SaslChallenge(b"x")),
        (b"NOOP", Data(b"x")),
        (b"NOOP", EndOfData()),
    ],
)
def test_reply_that_does_not_answer_the_command(
    command: bytes, reply: SaslChallenge | Data | EndOfData
) -> None:
    conn = greeted()
    conn.receive_data(LOGIN + command + b"\r\n")
    answer(conn, Ok())
    answer(conn, Ok())
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(reply)


def test_status_during_a_multiline_reply() -> None:
    conn = greeted()
    conn.receive_data(b"CAPA\r\n")
    conn.next_event()
    conn.send(Ok())
    with pytest.raises(LocalProtocolError):
        conn.send(Ok())
    assert conn.send(Data(b"TOP\r\n")) == b"TOP\r\n"


def test_sasl_challenge_is_base64() -> None:
    conn = greeted()
    conn.receive_data(b"AUTH PLAIN\r\n")
    conn.next_event()
    assert conn.send(SaslChallenge(b"\x00\xff")) == b"+ AP8=\r\n"
    assert conn.phase is Phase.SASL


def test_multiline_body_stuffed_across_data_chunks() -> None:
    conn = greeted()
    conn.receive_data(LOGIN + b"RETR 1\r\n")
    answer(conn, Ok())
    answer(conn, Ok())
    conn.next_event()
    out = conn.send(Ok())
    for chunk in [b"a\r\n", b".", b"b\r", b"\n", b".\r\n", b"x"]:
        out += conn.send(Data(chunk))
    out += conn.send(EndOfData())
    assert out == b"+OK\r\na\r\n..b\r\n..\r\nx\r\n.\r\n"
    assert not conn.reply_due


def test_buffered_counts_unconsumed_octets() -> None:
    conn = greeted()
    conn.receive_data(b"CAPA\r\nNOOP")
    assert conn.buffered == 10
    conn.next_event()
    assert conn.buffered == 4


def test_pipelined_sasl_lines_are_parsed_in_order() -> None:
    sasl: list[SaslLine] = [SaslResponse(Secret(b"x"), "PLAIN")]
    run = run_server(b"AUTH PLAIN\r\neA==\r\nCAPA\r\n")
    assert run.events == [Auth("PLAIN"), *sasl, Capa()]


def _server_after(lines: bytes) -> tuple[ServerConnection, object]:
    conn = ServerConnection()
    conn.send(Ok("ready"))
    conn.receive_data(lines)
    return conn, conn.next_event()


def test_a_bare_auth_cannot_be_answered_with_a_challenge() -> None:
    conn, event = _server_after(b"AUTH\r\n")
    assert event == Auth()
    with pytest.raises(LocalProtocolError):
        conn.send(SaslChallenge(b""))


def test_a_cancelled_auth_cannot_be_answered_with_ok() -> None:
    conn, _ = _server_after(b"AUTH PLAIN\r\n")
    conn.send(SaslChallenge(b""))
    conn.receive_data(b"*\r\n")
    assert conn.next_event() == SaslCancel()
    with pytest.raises(LocalProtocolError):
        conn.send(Ok())
    assert conn.send(Err("cancelled")) == b"-ERR cancelled\r\n"
    assert conn.phase is Phase.AUTHORIZATION


def test_stuffed_data_is_passed_on_unchanged_and_terminated() -> None:
    conn = greeted()
    conn.receive_data(LOGIN + b"RETR 1\r\nRETR 1\r\n")
    answer(conn, Ok())
    answer(conn, Ok())
    answer(conn, Ok())
    assert conn.send(StuffedData(b"..dot\r\nno line end")) == b"..dot\r\nno line end"
    assert conn.send(EndOfData()) == b"\r\n.\r\n"
    answer(conn, Ok())
    assert conn.send(StuffedData(b"a\r\n")) == b"a\r\n"
    assert conn.send(EndOfData()) == b".\r\n"
    assert conn.phase is Phase.TRANSACTION


# -- AUTH LOGIN (draft-murchison-sasl-login) -------------------------------------------


@given(
    st.binary(min_size=1, max_size=300),
    st.binary(min_size=1, max_size=300),
    st.booleans(),
)
def test_a_login_exchange_hands_over_the_user_name_with_the_password(
    name: bytes, password: bytes, initial: bool
) -> None:
    """Any octets, whole and octet by octet: the password line comes with the name."""
    user = base64.b64encode(name)
    first = b"AUTH LOGIN " + user + b"\r\n" if initial else b"AUTH LOGIN\r\n" + user + b"\r\n"
    run = run_server(first + base64.b64encode(password) + b"\r\nCAPA\r\n")
    last = SaslResponse(Secret(password), "LOGIN", (Secret(name),))
    assert run.events[-2:] == [last, Capa()]
    assert run.conn.phase is Phase.AUTHORIZATION  # the responder knows only alice/secret


def test_a_login_exchange_is_forgotten_once_it_ends() -> None:
    """After a finished, failed or cancelled LOGIN exchange the next AUTH starts afresh."""
    for ending in (b"d3Jvbmc=\r\n", b"*\r\n", b"!!\r\n"):
        run = run_server(b"AUTH LOGIN\r\nYQ==\r\n" + ending + b"AUTH PLAIN\r\neA==\r\n")
        assert run.events[-1] == SaslResponse(Secret(b"x"), "PLAIN")


def test_no_exchange_takes_a_third_response() -> None:
    conn, event = _server_after(b"AUTH LOGIN\r\nYQ==\r\ncA==\r\n")
    assert event == Auth("LOGIN")
    conn.send(SaslChallenge(b"Username:"))
    assert conn.next_event() == SaslResponse(Secret(b"a"), "LOGIN")
    conn.send(SaslChallenge(b"Password:"))
    assert conn.next_event() == SaslResponse(Secret(b"p"), "LOGIN", (Secret(b"a"),))
    with pytest.raises(LocalProtocolError):
        conn.send(SaslChallenge(b"More:"))


def test_a_login_response_past_the_payload_bound_ends_the_exchange() -> None:
    settings = ServerSettings(max_sasl_payload_octets=767)
    long_password = base64.b64encode(b"p" * 768)
    run = run_server(b"AUTH LOGIN\r\nYQ==\r\n" + long_password + b"\r\nCAPA\r\n", settings)
    assert run.events[-2:] == [rejected("Authentication data too long"), Capa()]
    assert run.conn.phase is Phase.AUTHORIZATION
