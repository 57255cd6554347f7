"""The client role of the sans-IO core (popproxy.pop3.client).

Every case goes through ``run_client``, which feeds the server's octets whole
and byte by byte and asserts both give the same events.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from pop3_helpers import Broken, byte_chunks, merge_data, run_client

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
    SaslCancel,
    SaslLine,
    SaslResponse,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
)
from popproxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from popproxy.pop3.events import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    EndOfData,
    PoisonedDotLines,
    SaslChallenge,
    StuffedData,
)
from popproxy.pop3.limits import MAX_REPLY_LINE_OCTETS
from popproxy.pop3.replies import Err, Ok, ResponseCode
from popproxy.pop3.state import ON_TRIGGER, Phase, Trigger
from popproxy.secret import Secret

HELLO = b"+OK POP3 ready <1.2@host>\r\n"
HELLO_EVENT = Ok("POP3 ready <1.2@host>")


def broken(text: str) -> Broken:
    return Broken(Err(f"Upstream protocol error: {text}", ResponseCode.SYS_TEMP), True)


@dataclass(frozen=True)
class Case:
    id: str
    commands: list[Command | SaslLine]
    data: bytes
    events: list[object]
    eof: bool = False


CASES = [
    Case("greeting", [], HELLO, [HELLO_EVENT]),
    Case("greeting-bare-ok", [], b"+OK\r\n", [Ok("")]),
    Case("greeting-bare-lf", [], b"+OK hi\n", [Ok("hi")]),
    Case(
        "greeting-err-in-use",
        [],
        b"-ERR [IN-USE] Mailbox locked\r\n",
        [Err("Mailbox locked", ResponseCode.IN_USE)],
    ),
    Case(
        "status-codes",
        [User("a"), Pass(Secret(b"p")), Noop(), Noop(), Noop(), Noop(), Noop()],
        HELLO
        + b"+OK\r\n"
        + b"-ERR [AUTH] Wrong password\r\n"
        + b"-ERR [SYS/TEMP] Try later\r\n"
        + b"-ERR [SYS/PERM]\r\n"
        + b"-ERR [login-delay] Slow down\r\n"
        + b"-ERR [X-VENDOR/THING] Something\r\n"
        + b"-ERR [unterminated code\r\n",
        [
            HELLO_EVENT,
            Ok(""),
            Err("Wrong password", ResponseCode.AUTH),
            Err("Try later", ResponseCode.SYS_TEMP),
            Err("", ResponseCode.SYS_PERM),
            Err("Slow down", ResponseCode.LOGIN_DELAY),
            Err("[X-VENDOR/THING] Something"),
            Err("[unterminated code"),
        ],
    ),
    Case(
        "eight-bit-status-text",
        [Noop(), Noop()],
        HELLO + "+OK grüß\r\n".encode() + b"-ERR \xff\r\n",
        [HELLO_EVENT, Ok("grüß"), Err("\ufffd")],
    ),
    Case(
        "list-all-is-multiline",
        [List()],
        HELLO + b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n",
        [HELLO_EVENT, Ok("2 messages"), Data(b"1 120\r\n2 200\r\n"), EndOfData()],
    ),
    Case(
        "list-one-is-single-line",
        [List(1), Noop()],
        HELLO + b"+OK 1 120\r\n+OK\r\n",
        [HELLO_EVENT, Ok("1 120"), Ok("")],
    ),
    Case(
        "list-err-has-no-body",
        [List(), Noop()],
        HELLO + b"-ERR no\r\n+OK\r\n",
        [HELLO_EVENT, Err("no"), Ok("")],
    ),
    Case(
        "uidl-all-is-multiline",
        [Uidl()],
        HELLO + b"+OK\r\n1 abc\r\n.\r\n",
        [HELLO_EVENT, Ok(""), Data(b"1 abc\r\n"), EndOfData()],
    ),
    Case(
        "uidl-one-is-single-line",
        [Uidl(1), Noop()],
        HELLO + b"+OK 1 abc\r\n+OK\r\n",
        [HELLO_EVENT, Ok("1 abc"), Ok("")],
    ),
    Case(
        "top-is-multiline",
        [Top(1, 0)],
        HELLO + b"+OK\r\nSubject: x\r\n\r\n.\r\n",
        [HELLO_EVENT, Ok(""), Data(b"Subject: x\r\n\r\n"), EndOfData()],
    ),
    Case(
        "retr-unstuffed",
        [Retr(1)],
        HELLO + b"+OK 30 octets\r\n..dot\r\n...two\r\n..\r\nend\r\n.\r\n",
        [HELLO_EVENT, Ok("30 octets"), Data(b".dot\r\n..two\r\n.\r\nend\r\n"), EndOfData()],
    ),
    Case(
        # A dot and a bare LF is content, not the end: what follows is not a reply
        # (RFC 1939 §3; pop3/dotstuff.py). Reported once, with the count, at the end.
        "retr-poisoned-dot-lines",
        [Retr(1), Noop()],
        HELLO + b"+OK\r\na\r\n.\n+OK FAKE\r\n.\n.\r\n+OK\r\n",
        [
            HELLO_EVENT,
            Ok(""),
            Data(b"a\r\n.\n+OK FAKE\r\n.\n"),
            PoisonedDotLines(2),
            EndOfData(),
            Ok(""),
        ],
    ),
    Case(
        "retr-empty-body",
        [Retr(1)],
        HELLO + b"+OK\r\n.\r\n",
        [HELLO_EVENT, Ok(""), EndOfData()],
    ),
    Case(
        "retr-eight-bit-body-and-lone-cr",
        [Retr(1)],
        HELLO + b"+OK\r\n\xff\x00\rx\r\n.\r\n",
        [HELLO_EVENT, Ok(""), Data(b"\xff\x00\rx\r\n"), EndOfData()],
    ),
    Case(
        "retr-err",
        [Retr(9), Dele(1)],
        HELLO + b"-ERR no such message\r\n+OK\r\n",
        [HELLO_EVENT, Err("no such message"), Ok("")],
    ),
    Case(
        "capa-is-multiline",
        [Capa()],
        HELLO + b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n",
        [HELLO_EVENT, Ok(""), Data(b"USER\r\nSASL PLAIN\r\n"), EndOfData()],
    ),
    Case(
        "bare-auth-is-multiline",
        [Auth()],
        HELLO + b"+OK\r\nPLAIN\r\n.\r\n",
        [HELLO_EVENT, Ok(""), Data(b"PLAIN\r\n"), EndOfData()],
    ),
    Case(
        "pipelined-fifo",
        [Stat(), List(), Retr(1), Uidl(1), Dele(1), Quit()],
        HELLO
        + b"+OK 1 5\r\n"
        + b"+OK\r\n1 5\r\n.\r\n"
        + b"+OK\r\n+OK\r\n.\r\n"
        + b"+OK 1 u\r\n"
        + b"+OK deleted\r\n"
        + b"+OK bye\r\n",
        [
            HELLO_EVENT,
            Ok("1 5"),
            Ok(""),
            Data(b"1 5\r\n"),
            EndOfData(),
            Ok(""),
            Data(b"+OK\r\n"),
            EndOfData(),
            Ok("1 u"),
            Ok("deleted"),
            Ok("bye"),
        ],
    ),
    Case(
        "sasl-challenge-then-ok",
        [Auth("PLAIN"), SaslResponse(Secret(b"\x00a\x00p"))],
        HELLO + b"+ \r\n+OK logged in\r\n",
        [HELLO_EVENT, SaslChallenge(b""), Ok("logged in")],
    ),
    Case(
        "sasl-bare-plus-challenge",
        [Auth("PLAIN"), SaslCancel()],
        HELLO + b"+\r\n-ERR cancelled\r\n",
        [HELLO_EVENT, SaslChallenge(b""), Err("cancelled")],
    ),
    Case(
        "sasl-challenge-data",
        [Auth("X-TEST")],
        HELLO + b"+ AP8=\r\n",
        [HELLO_EVENT, SaslChallenge(b"\x00\xff")],
    ),
    Case(
        "sasl-challenge-bad-base64",
        [Auth("X-TEST")],
        HELLO + b"+ !!!\r\n",
        [HELLO_EVENT, broken("invalid base64 in SASL challenge")],
    ),
    Case(
        "sasl-challenge-outside-auth",
        [Noop()],
        HELLO + b"+ \r\n",
        [HELLO_EVENT, broken("SASL challenge outside AUTH")],
    ),
    Case(
        "unsolicited-line",
        [Noop()],
        HELLO + b"+OK\r\n+OK extra\r\n",
        [HELLO_EVENT, Ok(""), broken("unsolicited reply")],
    ),
    Case(
        "unsolicited-before-any-command",
        [],
        HELLO + b"-ERR x\r\n",
        [HELLO_EVENT, broken("unsolicited reply")],
    ),
    Case(
        "status-line-of-512-octets",
        [Noop()],
        HELLO + b"+OK " + b"x" * (MAX_REPLY_LINE_OCTETS - 6) + b"\r\n",
        [HELLO_EVENT, Ok("x" * (MAX_REPLY_LINE_OCTETS - 6))],
    ),
    Case(
        "overlong-status-line",
        [Noop()],
        HELLO + b"+OK " + b"x" * (MAX_REPLY_LINE_OCTETS - 5) + b"\r\n",
        [HELLO_EVENT, broken("reply line too long")],
    ),
    Case(
        "overlong-greeting-without-lf",
        [],
        b"+OK " + b"x" * 10_000,
        [broken("reply line too long")],
    ),
    Case("malformed-status", [], b"+OKAY\r\n", [broken("malformed status line")]),
    Case("malformed-status-lowercase", [], b"+ok\r\n", [broken("malformed status line")]),
    Case("malformed-status-empty", [], b"\r\n", [broken("malformed status line")]),
    Case("malformed-status-smtp", [], b"220 mail ESMTP\r\n", [broken("malformed status line")]),
    Case(
        "eof-after-quit",
        [Quit()],
        HELLO + b"+OK bye\r\n",
        [HELLO_EVENT, Ok("bye"), ConnectionClosed()],
        eof=True,
    ),
    Case(
        "eof-with-reply-outstanding",
        [Stat()],
        HELLO,
        [HELLO_EVENT, broken("connection closed with a reply outstanding")],
        eof=True,
    ),
    Case(
        "eof-mid-status-line",
        [Stat()],
        HELLO + b"+OK 1",
        [HELLO_EVENT, broken("connection closed with a reply outstanding")],
        eof=True,
    ),
    Case(
        "eof-mid-body",
        [Retr(1)],
        HELLO + b"+OK\r\nSubject: x\r\n\r\nbody",
        [
            HELLO_EVENT,
            Ok(""),
            Data(b"Subject: x\r\n\r\nbody"),
            broken("connection closed inside a multi-line reply"),
        ],
        eof=True,
    ),
    Case(
        "eof-after-dot-of-terminator",
        [Retr(1)],
        HELLO + b"+OK\r\nx\r\n.\r",
        [
            HELLO_EVENT,
            Ok(""),
            Data(b"x\r\n"),
            broken("connection closed inside a multi-line reply"),
        ],
        eof=True,
    ),
    Case(
        "eof-with-junk-after-last-reply",
        [],
        HELLO + b"+O",
        [HELLO_EVENT, broken("connection closed with a reply outstanding")],
        eof=True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case) -> None:
    run = run_client(case.commands, case.data, eof=case.eof)
    assert run.events == case.events


def test_after_a_fatal_error_next_event_is_a_local_error() -> None:
    conn = ClientConnection()
    conn.send(Retr(1))
    conn.receive_data(HELLO + b"+OK\r\npartial")
    conn.receive_data(b"")
    assert conn.next_event() == HELLO_EVENT
    assert conn.next_event() == Ok("")
    assert conn.next_event() == Data(b"partial")
    with pytest.raises(RemoteProtocolError) as raised:
        conn.next_event()
    assert raised.value.fatal
    assert raised.value.reply.code is ResponseCode.SYS_TEMP
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())


def test_outstanding_counts_the_greeting_and_pipelined_commands() -> None:
    conn = ClientConnection()
    assert conn.outstanding == 1
    conn.send(Capa())
    conn.send(Stat())
    assert conn.outstanding == 3
    conn.receive_data(HELLO + b"+OK\r\nTOP\r\n")
    assert conn.next_event() == HELLO_EVENT
    assert conn.next_event() == Ok("")
    assert conn.outstanding == 2  # the body of CAPA is still due
    assert conn.next_event() == Data(b"TOP\r\n")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b".\r\n+OK 0 0\r\n")
    assert conn.next_event() == EndOfData()
    assert conn.outstanding == 1
    assert conn.next_event() == Ok("0 0")
    assert conn.outstanding == 0
    assert conn.next_event() is NEED_DATA


def test_unsolicited_is_octets_buffered_with_no_reply_due() -> None:
    conn = ClientConnection()
    assert not conn.unsolicited  # the greeting is due
    conn.receive_data(HELLO + b"+OK unasked\r\n")
    assert not conn.unsolicited  # nothing read yet: the greeting is still due
    assert conn.next_event() == HELLO_EVENT
    assert conn.unsolicited  # "+OK unasked" came with no command sent
    conn.send(Stat())
    assert not conn.unsolicited  # now it would be read as STAT's reply: what must not happen
    # A body being read is never unsolicited: its command stays due until its end.
    conn = ClientConnection(expect_greeting=False)
    conn.send(Retr(1), stuffed_body=True)
    conn.receive_data(b"+OK\r\nbody\r\n.\r\n+OK after\r\n")
    assert conn.next_event() == Ok("")
    assert conn.next_event() == StuffedData(b"body\r\n")
    assert not conn.unsolicited
    assert conn.next_event() == EndOfData()
    assert conn.unsolicited


def test_greeting_err_has_no_body_even_with_multiline_commands_queued() -> None:
    run = run_client([Capa()], b"-ERR go away\r\n+OK\r\nX\r\n.\r\n")
    assert run.events == [Err("go away"), Ok(""), Data(b"X\r\n"), EndOfData()]


def test_send_returns_the_wire_form() -> None:
    conn = ClientConnection()
    assert conn.send(User("alice")) == b"USER alice\r\n"
    assert conn.send(Pass(Secret(b"a b"))) == b"PASS a b\r\n"
    assert conn.send(Auth("PLAIN", Secret(b""))) == b"AUTH PLAIN =\r\n"
    assert conn.send(SaslCancel()) == b"*\r\n"


def test_body_data_is_not_held_back() -> None:
    # Streaming: what can be decided is handed out before the terminator arrives.
    conn = ClientConnection()
    conn.send(Retr(1))
    conn.receive_data(HELLO + b"+OK\r\nline one\r\nline t")
    assert conn.next_event() == HELLO_EVENT
    assert conn.next_event() == Ok("")
    assert conn.next_event() == Data(b"line one\r\nline t")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"wo\r\n.")
    assert conn.next_event() == Data(b"wo\r\n")
    assert conn.next_event() is NEED_DATA  # "." could still be a stuffed line
    conn.receive_data(b".x\r\n.\r\n+OK")
    assert conn.next_event() == Data(b".x\r\n")
    assert conn.next_event() == EndOfData()
    assert conn.next_event() is NEED_DATA  # bytes after the terminator wait as a line


def drain(conn: ClientConnection) -> list[object]:
    events: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def test_stuffed_body_is_relayed_as_received_and_others_are_decoded() -> None:
    # A relay asks for RETR's body still stuffed; a listing in the same pipeline is decoded.
    conn = ClientConnection()
    conn.send(Retr(1), stuffed_body=True)
    conn.send(Top(1, 0))
    conn.receive_data(HELLO + b"+OK\r\n..dot\r\nx\r\n.\r\n+OK\r\n..h\r\n\r\n.\r\n")
    events = drain(conn)
    assert events == [
        HELLO_EVENT,
        Ok(""),
        StuffedData(b"..dot\r\nx\r\n"),
        EndOfData(),
        Ok(""),
        Data(b".h\r\n\r\n"),
        EndOfData(),
    ]


def test_a_poisoned_dot_line_in_a_stuffed_body_is_relayed_stuffed() -> None:
    """The relay passes a dot and a bare LF on as ``..\\n``, hears of it once per reply
    just before the end, and the next reply is read as usual (RFC 1939 §3)."""
    wire = HELLO + b"+OK\r\n.\nFAKE\r\n.\r\n+OK\r\nx\r\n.\r\n+OK\r\n.\n.\r\n"
    for chunks in ([wire], list(byte_chunks(wire))):
        conn = ClientConnection()
        for msg in (1, 2, 3):
            conn.send(Retr(msg), stuffed_body=True)
        events: list[object] = []
        for chunk in chunks:
            conn.receive_data(chunk)
            events += drain(conn)
        relayed = [e.data if isinstance(e, StuffedData) else e for e in events]
        assert b"".join(d for d in relayed if isinstance(d, bytes)) == b"..\nFAKE\r\nx\r\n..\n"
        assert [e for e in relayed if not isinstance(e, bytes)] == [
            HELLO_EVENT,
            Ok(""),
            PoisonedDotLines(1),
            EndOfData(),
            Ok(""),
            EndOfData(),
            Ok(""),
            PoisonedDotLines(1),
            EndOfData(),
        ]


def test_stuffed_body_cut_by_eof_is_fatal() -> None:
    conn = ClientConnection()
    conn.send(Retr(1), stuffed_body=True)
    conn.receive_data(HELLO + b"+OK\r\npart of a message\r\n")
    assert drain(conn)[-1] == StuffedData(b"part of a message\r\n")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.fatal


def test_stuffed_body_flag_does_not_apply_to_an_err_reply() -> None:
    conn = ClientConnection()
    conn.send(Retr(9), stuffed_body=True)
    conn.send(Noop())
    conn.receive_data(HELLO + b"-ERR no such message\r\n+OK\r\n")
    assert drain(conn) == [HELLO_EVENT, Err("no such message"), Ok("")]


def test_after_tls_no_greeting_is_expected() -> None:
    conn = ClientConnection(expect_greeting=False)
    assert conn.outstanding == 0
    conn.send(Noop())
    conn.receive_data(b"+OK\r\n")
    assert drain(conn) == [Ok("")]


@pytest.mark.parametrize("limit", [MAX_REPLY_LINE_OCTETS, 2000])
def test_the_reply_line_limit_is_a_setting(limit: int) -> None:
    fits = b"+OK " + b"x" * (limit - len(b"+OK \r\n")) + b"\r\n"
    conn = ClientConnection(max_reply_line_octets=limit)
    conn.receive_data(fits)
    assert drain(conn) == [Ok("x" * (limit - len(b"+OK \r\n")))]
    conn.send(Noop())
    conn.receive_data(b"+OK " + b"x" * (limit - len(b"+OK \r\n") + 1) + b"\r\n")
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.fatal


# -- the phase, moved only through the tables (pop3/state.py) ------------


def phases(commands: list[Command | SaslLine], data: bytes, *, split: bool) -> list[Phase]:
    """The client's phase after each event but body data, ``data`` fed whole or byte by byte."""
    conn = ClientConnection()
    for command in commands:
        conn.send(command)
    seen: list[Phase] = []
    for chunk in [data[i : i + 1] for i in range(len(data))] if split else [data]:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            if not isinstance(event, Data):
                seen.append(conn.phase)
    return seen


def phase(conn: ClientConnection) -> Phase:
    """The phase now (a call, so that a type checker does not keep an earlier answer)."""
    return conn.phase


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_a_pipelined_login_moves_to_transaction_at_the_pass_reply_and_quit_closes(
    split: bool,
) -> None:
    commands: list[Command | SaslLine] = [User("a"), Pass(Secret(b"p")), Uidl(), Quit()]
    data = HELLO + b"+OK\r\n+OK\r\n+OK\r\n1 u\r\n.\r\n+OK bye\r\n"
    A, T, C = Phase.AUTHORIZATION, Phase.TRANSACTION, Phase.CLOSED
    # greeting, USER, PASS, UIDL's +OK, its end (LISTED moves nothing), QUIT.
    assert phases(commands, data, split=split) == [A, A, T, T, T, C]


def test_a_refused_login_stays_in_authorization() -> None:
    data = HELLO + b"+OK\r\n-ERR [AUTH] no\r\n-ERR not logged in\r\n"
    assert (
        phases([User("a"), Pass(Secret(b"p")), Stat()], data, split=False)
        == [Phase.AUTHORIZATION] * 4
    )


def test_a_sasl_challenge_enters_sasl_and_its_answer_decides() -> None:
    conn = ClientConnection()
    conn.send(Auth("PLAIN"))
    conn.receive_data(HELLO + b"+ \r\n")
    assert drain(conn) == [HELLO_EVENT, SaslChallenge(b"")]
    assert phase(conn) is Phase.SASL
    conn.send(SaslResponse(Secret(b"\0a\0p")))
    conn.receive_data(b"-ERR [AUTH] no\r\n")
    drain(conn)
    assert phase(conn) is Phase.AUTHORIZATION
    conn.send(Auth("PLAIN"))
    conn.receive_data(b"+ \r\n")
    drain(conn)
    conn.send(SaslResponse(Secret(b"\0a\0p")))
    conn.receive_data(b"+OK\r\n")
    drain(conn)
    assert phase(conn) is Phase.TRANSACTION


def test_stls_waits_for_the_handshake_then_forgets_what_came_before() -> None:
    conn = ClientConnection()
    conn.send(Stls())
    conn.receive_data(HELLO + b"+OK Begin TLS\r\n")
    assert drain(conn) == [HELLO_EVENT, Ok("Begin TLS")]
    assert phase(conn) is Phase.TLS_HANDSHAKE
    with pytest.raises(LocalProtocolError):
        conn.send(Capa())  # nothing is sent until the handshake is done (RFC 2595 §4)
    conn.receive_data(b"+OK injected in clear\r\n")
    conn.tls_established()
    assert phase(conn) is Phase.AUTHORIZATION
    assert conn.buffered == 0
    assert conn.outstanding == 0  # no new greeting
    conn.send(Noop())
    conn.receive_data(b"+OK\r\n")
    assert drain(conn) == [Ok("")]


def test_stls_refused_stays_in_authorization_and_tls_cannot_be_established() -> None:
    conn = ClientConnection()
    conn.send(Stls())
    conn.receive_data(HELLO + b"-ERR not here\r\n")
    drain(conn)
    assert phase(conn) is Phase.AUTHORIZATION
    with pytest.raises(LocalProtocolError):
        conn.tls_established()


def test_a_refused_greeting_closes_and_nothing_more_is_sent() -> None:
    conn = ClientConnection()
    conn.receive_data(b"-ERR [IN-USE] busy\r\n")
    drain(conn)
    assert phase(conn) is Phase.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(Capa())


def test_the_client_moves_through_the_shared_trigger_table() -> None:
    # The triggers the client role uses are in the one table both roles share.
    assert ON_TRIGGER[(Phase.AUTHORIZATION, Trigger.GREETING_ERR)] is Phase.CLOSED
    assert ON_TRIGGER[(Phase.TLS_HANDSHAKE, Trigger.TLS_ESTABLISHED)] is Phase.AUTHORIZATION


def test_a_relayed_chunk_that_is_all_body_is_handed_on_as_received() -> None:
    """No copy through the line buffer for the common chunk of a big RETR; a chunk
    with a dot line, or arriving behind buffered octets, goes the buffered way."""
    conn = ClientConnection()
    conn.send(Retr(1), stuffed_body=True)
    conn.receive_data(HELLO + b"+OK\r\n")
    assert drain(conn) == [HELLO_EVENT, Ok("")]
    chunk = b"line one\r\nline two\r\n" * 100
    conn.receive_data(chunk)
    assert conn.buffered == len(chunk)
    (event,) = drain(conn)
    assert isinstance(event, StuffedData)
    assert event.data is chunk
    dotted = b"..a stuffed dot\r\nx\r\n"
    conn.receive_data(dotted)
    assert drain(conn) == [StuffedData(dotted)]
    conn.receive_data(b"ends here\r\n.")  # the terminator, cut after its dot
    assert drain(conn) == [StuffedData(b"ends here\r\n")]
    conn.receive_data(b"\r\n")
    assert drain(conn) == [EndOfData()]


# Lines of a stuffed body as an upstream may send them: stuffed dots, poisoned dot
# lines (a dot and a bare LF), bare LFs and CRs; none is the terminator.
_BODY_LINES = st.sampled_from(
    [b"text\r\n", b"..\r\n", b"..x\r\n", b".\n", b"x\n", b"\r\n", b"\n", b"x\r", b"\r"]
)


@settings(max_examples=300)
@given(
    bodies=st.lists(st.lists(_BODY_LINES, max_size=12).map(b"".join), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_relayed_bodies_are_the_same_whether_taken_as_received_or_buffered(
    bodies: list[bytes], cuts: list[int]
) -> None:
    """The same wire, cut the same way, fed as bytes (which may be handed on as received)
    and as bytearray (always buffered): the same events, chunk boundaries aside."""
    wire = HELLO + b"".join(b"+OK\r\n" + body + b"\r\n.\r\n" for body in bodies)
    edges = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    pieces = [wire[a:b] for a, b in itertools.pairwise(edges)]
    outcomes = []
    for kind in (bytes, bytearray):
        conn = ClientConnection()
        for n in range(len(bodies)):
            conn.send(Retr(n + 1), stuffed_body=True)
        events: list[object] = []
        for piece in pieces:
            conn.receive_data(kind(piece))
            events += drain(conn)
        outcomes.append(merge_data(events))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][-1] == EndOfData()
