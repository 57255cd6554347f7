"""Property tests of whole proxy-mode sessions against a scripted POP3 upstream.

A ``Session`` whose maildrop is a real ``UpstreamMaildrop`` (``open_upstream``)
logged in over loopback TCP to a small RFC 1939 server written here. The server
holds a mailbox of generated messages (dot-lines, empty lines, 8-bit octets, long
lines, random UIDs, upstream numbers with or without gaps), offers CAPA with or
without PIPELINING (and SASL PLAIN), applies DELE only at its own QUIT, records
every command line it receives and writes its replies in pieces cut at drawn
places (next to line-start dots too), letting every task run between pieces. The
client side pipelines any sequence of commands over a memory stream, valid and
invalid, message numbers in and out of range, DELE/RSET mixes, and ends with
QUIT, EOF, or a disconnect in the middle of a relayed message.

Properties (DESIGN.md invariants 1, 2 and 4 in proxy mode):

- one reply per command, in order, each as a model of RFC 1939 predicts; STAT,
  LIST and UIDL match the upstream listing minus the marked messages; every RETR
  and TOP body, un-stuffed, is byte for byte the upstream message or its TOP slice;
- the upstream sees its login and listing, then exactly one RETR/TOP per client
  RETR/TOP (with its own numbers), and DELE only after the client's QUIT, exactly
  for the messages marked and not RSET then, then QUIT; the client's ``+OK`` to
  QUIT comes only after the upstream's ``+OK`` to QUIT;
- a session that ends without QUIT sends neither DELE nor QUIT upstream, and the
  upstream mailbox is unchanged;
- no upstream connection is made unless the local login succeeded, and none is
  pipelined into unless the upstream offered PIPELINING.

Everything is event-driven (no sleeps, no timeouts reached); each example runs
under ``EXAMPLE_DEADLINE_SECONDS``, which only a deadlock reaches.

Helpers are written here rather than imported from tests/maildrop/test_upstream.py:
pytest puts tests/ on sys.path, not tests/maildrop/, so that module is only
importable when pytest happens to collect it in the same run.
"""

from __future__ import annotations

import base64
import enum
import itertools
import re
import select
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pop3client import Pop3Client

from popproxy.auth.authenticator import Authenticator
from popproxy.auth.passwords import hash_password
from popproxy.config import LimitsConfig, TlsMode, UpstreamConfig, UserConfig
from popproxy.maildrop.base import Committed, Maildrop
from popproxy.maildrop.upstream import UpstreamAccount, open_upstream
from popproxy.outcomes import SessionResult
from popproxy.peer import PeerAddress
from popproxy.secret import Secret
from popproxy.session import Session
from popproxy.session_context import SessionContext

# Max examples: each one is a whole client session, a hash and an upstream on loopback.
EXAMPLES = 100
# Real seconds; every wait in an example is event-driven, so only a deadlock gets here.
EXAMPLE_DEADLINE_SECONDS = 20.0
# The proxy's own upstream deadlines: far beyond the example's, so never what ends one.
UPSTREAM_TIMEOUT_SECONDS = 60.0
# No keep-alive NOOP within an example (real time; an example takes milliseconds).
KEEPALIVE_SECONDS = 3600.0
# At most this many pieces per upstream reply (each piece costs a scheduling round).
MAX_PIECES = 16
# One client read; replies are small, bodies arrive in as many reads as they take.
CLIENT_RECEIVE_BYTES = 65536

LOCAL_USER = b"demo"
LOCAL_PASSWORD = b"secret"
UPSTREAM_USER = b"alice@example.net"
UPSTREAM_PASSWORD = b"pw-upstream-Zq7"
PASSWORD_HASH = hash_password(Secret(LOCAL_PASSWORD), ln=4)
# The bad-command budget is local-mode behaviour (test_session_properties.py); here it
# must not end a session, so that every command is due exactly one reply.
LIMITS = LimitsConfig(auth_failure_delay_seconds=0.0, max_bad_commands=1_000_000)


def plain(user: bytes, password: bytes) -> bytes:
    """A SASL PLAIN initial response, base64 (RFC 4616 §2, RFC 5034 §4)."""
    return base64.b64encode(b"\0" + user + b"\0" + password)


def stuff(message: bytes) -> bytes:
    """RFC 1939 §3 dot-stuffing of a CRLF message (the reference: one regular expression)."""
    return re.sub(rb"(?m)^\.", b"..", message)


def top_of(message: bytes, lines: int) -> bytes:
    """RFC 1939 §7 TOP: the header, the blank line, the first ``lines`` body lines.

    A message without a blank line is all header, and TOP gives all of it.
    """
    head, blank, body = message.partition(b"\r\n\r\n")
    if not blank:
        return message
    kept = [line + b"\r\n" for line in body.split(b"\r\n")[:-1]][:lines]
    return head + blank + b"".join(kept)


# -- scenarios ------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Stored:
    """One upstream message: its upstream number, UID and octets (CRLF lines)."""

    number: int
    uid: bytes
    data: bytes

    def __repr__(self) -> str:
        data = self.data if len(self.data) <= 120 else self.data[:100] + b"..."
        return f"Stored({self.number}, {self.uid!r}, {data!r} [{len(self.data)} octets])"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints a falsifying example with this


class Op(enum.Enum):
    """What a client line is, as the model reads it (RFC 1939 §§4-7)."""

    STAT = "STAT"
    LIST = "LIST"
    UIDL = "UIDL"
    RETR = "RETR"
    TOP = "TOP"
    DELE = "DELE"
    RSET = "RSET"
    NOOP = "NOOP"
    CAPA = "CAPA"
    QUIT = "QUIT"
    USER = "USER"
    PASS = "PASS"
    AUTH_PLAIN = "AUTH PLAIN"
    AUTH_LIST = "AUTH"
    REFUSED = "refused"  # never +OK in any phase: malformed, unknown, or not offered
    AUTHORIZATION_ONLY = "authorization-only"  # USER, PASS, AUTH ... sent in TRANSACTION


@dataclass(frozen=True, repr=False)
class Cmd:
    """One client command line (without CRLF) and its meaning for the model."""

    line: bytes
    op: Op
    msg: int | None = None  # the message number, where it parses as one
    count: int | None = None  # TOP's line count
    arg: bytes = b""  # USER's name, PASS's password, AUTH PLAIN's response

    def __repr__(self) -> str:
        return repr(self.line)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


class Ending(enum.Enum):
    QUIT = "quit"  # QUIT pipelined behind everything else
    QUIT_AFTER_REPLIES = "quit-after-replies"  # QUIT sent once all other replies are in
    EOF = "eof"  # the client half-closes after its commands
    DISCONNECT = "disconnect"  # the client vanishes, in the middle of a relayed body if any


@dataclass(frozen=True)
class Scenario:
    mailbox: tuple[Stored, ...]
    pipelining: bool  # the upstream offers PIPELINING (RFC 2449 §6.6)
    sasl_plain: bool  # the upstream offers SASL PLAIN, so the proxy logs in with AUTH
    cuts: tuple[int, ...]  # offsets at which each upstream reply is cut into pieces
    cut_at_dots: bool  # also cut next to every line-start dot of a reply
    commands: tuple[Cmd, ...]  # QUIT included where the ending sends one
    ending: Ending
    disconnect_after: int  # DISCONNECT: after this many RETR/TOP reply pieces from upstream


def no_crlf(data: bytes) -> bytes:
    return data.replace(b"\r", b"").replace(b"\n", b"")


TEXT = st.binary(max_size=40).map(no_crlf)
BODY_LINE = st.one_of(
    st.sampled_from(
        [b"", b".", b"..", b"...", b". ", b".\x00", b"From me", b"caf\xc3\xa9 \xff\xfe\x80", b" "]
    ),
    TEXT,
    TEXT.map(lambda b: b"." + b),
    # A long line (RFC 5322 allows 998 octets; POP3 relays whatever there is).
    st.builds(
        lambda unit, times: (no_crlf(unit) or b"x") * times,
        st.binary(min_size=1, max_size=6),
        st.integers(100, 2000),
    ),
)
HEADER = st.builds(
    lambda name, value: name + b": " + value,
    st.sampled_from([b"Subject", b"From", b"X-8bit", b".X-Dot"]),
    TEXT,
)


def crlf_lines(lines: Sequence[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


MESSAGE_KINDS = ["full"] * 12 + ["header-only"] * 2 + ["empty", "huge"]


def message_of(kind: str) -> st.SearchStrategy[bytes]:
    match kind:
        case "full":
            return st.builds(
                lambda head, body: crlf_lines(head) + b"\r\n" + crlf_lines(body),
                st.lists(HEADER, min_size=1, max_size=3),
                st.lists(BODY_LINE, max_size=8),
            )
        case "header-only":
            return st.lists(HEADER, min_size=1, max_size=3).map(crlf_lines)
        case "empty":
            return st.just(b"")
        case _:
            # More than one upstream read (128 KiB) and many client writes.
            return st.builds(
                lambda unit: b"Subject: big\r\n\r\n" + crlf_lines([b"." + unit * 30_000] * 3),
                st.binary(min_size=1, max_size=3).map(lambda b: no_crlf(b) or b"."),
            )


MESSAGE = st.sampled_from(MESSAGE_KINDS).flatmap(message_of)
UID = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70)


@st.composite
def mailboxes(draw: st.DrawFn) -> tuple[Stored, ...]:
    n = draw(st.sampled_from([0, 1, 2, 3, 3, 4, 5]))
    uids = draw(st.lists(UID, min_size=n, max_size=n, unique=True))
    datas = draw(st.lists(MESSAGE, min_size=n, max_size=n))
    if draw(st.sampled_from(["dense", "dense", "sparse"])) == "dense":
        numbers = list(range(1, n + 1))
    else:
        # Not what a server lists at login, but what the proxy must cope with (its
        # listing keeps upstream numbers); it makes every renumbering visible.
        numbers = sorted(draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True)))
    return tuple(
        Stored(number, uid.encode("ascii"), data)
        for number, uid, data in zip(numbers, uids, datas, strict=True)
    )


CASE = st.sampled_from([bytes.upper, bytes.lower, bytes.title])
# Not a message number: zero, signed, a leading zero (popproxy reads RFC 1939 §3
# strictly), not decimal, past 2**31 - 1, or followed by a second word.
BAD_NUMBER = st.sampled_from(
    [b"0", b"-1", b"x", b"01", b"+1", b"1.0", b"2147483648", b"99999999999", b"1 2", b" 1"]
)
# Not a TOP line count: negative, not decimal, past 2**31 - 1, or more words. (Zero is one.)
BAD_COUNT = st.sampled_from([b"-1", b"x", b"+1", b"1.0", b"2147483648", b"99999999999", b"1 2"])
LINE_COUNT = st.sampled_from([0, 1, 2, 3, 10, 2**31 - 1])


def simple(op: Op) -> st.SearchStrategy[Cmd]:
    return CASE.map(lambda case: Cmd(case(op.value.encode()), op))


def transaction_commands(n: int) -> st.SearchStrategy[Cmd]:
    """Commands of RFC 1939 §5 and §7, valid and not, numbers in and out of range."""
    msg = st.one_of(st.integers(1, n + 2), st.just(2**31 - 1))
    in_range = st.integers(1, max(n, 1))
    with_msg = st.sampled_from([Op.RETR, Op.DELE, Op.LIST, Op.UIDL])
    refused = st.one_of(
        st.builds(
            lambda op, bad: Cmd(op.value.encode() + b" " + bad, Op.REFUSED),
            st.sampled_from([Op.RETR, Op.DELE, Op.LIST, Op.UIDL]),
            BAD_NUMBER,
        ),
        st.builds(lambda bad: Cmd(b"TOP " + bad + b" 0", Op.REFUSED), BAD_NUMBER),
        st.builds(lambda m, bad: Cmd(b"TOP %d " % m + bad, Op.REFUSED), msg, BAD_COUNT),
        st.sampled_from(
            [
                Cmd(b"RETR", Op.REFUSED),
                Cmd(b"DELE", Op.REFUSED),
                Cmd(b"TOP 1", Op.REFUSED),
                Cmd(b"RETR 1 2", Op.REFUSED),
                Cmd(b"STAT 1", Op.REFUSED),
                Cmd(b"NOOP x", Op.REFUSED),
                Cmd(b"RSET\x00", Op.REFUSED),
                Cmd(b"NOOP " + b"x" * 300, Op.REFUSED),  # past 255 octets (RFC 2449 §4)
                Cmd(b"", Op.REFUSED),
            ]
        ),
        # An unknown verb (none starts with X) with arbitrary octets behind it.
        TEXT.map(lambda b: Cmd(b"X" + b, Op.REFUSED)),
    )
    # The commands that change what QUIT deletes or relay a body, drawn often enough to meet.
    marking = st.one_of(
        st.builds(lambda c, m: Cmd(c(b"RETR") + b" %d" % m, Op.RETR, m), CASE, in_range),
        st.builds(lambda c, m: Cmd(c(b"DELE") + b" %d" % m, Op.DELE, m), CASE, in_range),
        st.builds(
            lambda c, m, k: Cmd(c(b"TOP") + b" %d %d" % (m, k), Op.TOP, m, k),
            CASE,
            in_range,
            LINE_COUNT,
        ),
        simple(Op.RSET),
    )
    other = st.one_of(
        st.builds(
            lambda c, op, m: Cmd(c(op.value.encode()) + b" %d" % m, op, m), CASE, with_msg, msg
        ),
        st.builds(lambda m, k: Cmd(b"TOP %d %d" % (m, k), Op.TOP, m, k), msg, LINE_COUNT),
        st.sampled_from([Op.STAT, Op.LIST, Op.UIDL, Op.NOOP, Op.CAPA]).flatmap(simple),
        refused,
        AFTER_LOGIN_ONLY,
    )
    return st.sampled_from([marking, marking, other]).flatmap(lambda strategy: strategy)


GOOD_PLAIN = plain(LOCAL_USER, LOCAL_PASSWORD)
LOGINS = st.sampled_from(
    [
        (
            Cmd(b"USER demo", Op.USER, arg=LOCAL_USER),
            Cmd(b"PASS secret", Op.PASS, arg=LOCAL_PASSWORD),
        ),
        (
            Cmd(b"user demo", Op.USER, arg=LOCAL_USER),
            Cmd(b"pass secret", Op.PASS, arg=LOCAL_PASSWORD),
        ),
        (Cmd(b"AUTH PLAIN " + GOOD_PLAIN, Op.AUTH_PLAIN, arg=GOOD_PLAIN),),
    ]
)
# Whole steps in AUTHORIZATION (RFC 1939 §4, RFC 5034): none of them logs in. Sessions
# without a login draw their single commands, which may still add up to one.
BEFORE_LOGIN = st.sampled_from(
    [
        (Cmd(b"CAPA", Op.CAPA),),
        (Cmd(b"AUTH", Op.AUTH_LIST),),
        (Cmd(b"STAT", Op.STAT),),
        (Cmd(b"RETR 1", Op.RETR, 1),),
        (Cmd(b"DELE 1", Op.DELE, 1),),
        (Cmd(b"NOOP", Op.NOOP),),
        (Cmd(b"STLS", Op.REFUSED),),  # not offered on this listener
        (Cmd(b"APOP demo " + b"0" * 32, Op.REFUSED),),  # not enabled
        (Cmd(b"PASS secret", Op.PASS, arg=LOCAL_PASSWORD),),  # no USER before it
        (
            Cmd(b"USER nobody", Op.USER, arg=b"nobody"),
            Cmd(b"PASS secret", Op.PASS, arg=LOCAL_PASSWORD),
        ),
        (
            Cmd(b"USER demo", Op.USER, arg=LOCAL_USER),
            Cmd(b"PASS wrong", Op.PASS, arg=b"wrong"),
        ),
        (Cmd(b"AUTH PLAIN " + plain(b"demo", b"wrong"), Op.AUTH_PLAIN, arg=b"wrong"),),
        (Cmd(b"XYZZY", Op.REFUSED),),
    ]
)
AFTER_LOGIN_ONLY = st.sampled_from(
    [
        Cmd(b"USER demo", Op.AUTHORIZATION_ONLY),
        Cmd(b"PASS secret", Op.AUTHORIZATION_ONLY),
        Cmd(b"AUTH", Op.AUTHORIZATION_ONLY),
        Cmd(b"AUTH PLAIN " + GOOD_PLAIN, Op.AUTHORIZATION_ONLY),
        Cmd(b"STLS", Op.AUTHORIZATION_ONLY),
        Cmd(b"APOP demo " + b"0" * 32, Op.AUTHORIZATION_ONLY),
    ]
)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    mailbox = draw(mailboxes())
    before = draw(st.lists(BEFORE_LOGIN, max_size=3))
    login = draw(st.sampled_from([True, True, True, True, False]))
    after = draw(
        st.lists(
            transaction_commands(len(mailbox)) if login else BEFORE_LOGIN.map(lambda step: step[0]),
            min_size=1,
            max_size=25,
        )
    )
    ending = draw(st.sampled_from(list(Ending)))
    commands = [cmd for step in before for cmd in step]
    commands += draw(LOGINS) if login else []
    commands += after
    if ending is not Ending.EOF and (ending is not Ending.DISCONNECT or draw(st.booleans())):
        commands.append(Cmd(draw(st.sampled_from([b"QUIT", b"quit"])), Op.QUIT))
    return Scenario(
        mailbox=mailbox,
        pipelining=draw(st.booleans()),
        sasl_plain=draw(st.booleans()),
        cuts=tuple(draw(st.lists(st.integers(1, 600), max_size=4))),
        cut_at_dots=draw(st.booleans()),
        commands=tuple(commands),
        ending=ending,
        disconnect_after=draw(st.integers(1, 4)),
    )


# -- the model (RFC 1939 §§4-7) ------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What the reply to one command must be."""

    ok: bool  # +OK, or -ERR
    multiline: bool = False  # a +OK is followed by a body
    status: bytes | None = None  # the exact status line, where RFC 1939 fixes it
    body: bytes | None = None  # the exact body, un-stuffed
    login: bool = False
    quit: bool = False  # +OK to QUIT in TRANSACTION: the upstream's QUIT came first


@dataclass
class Plan:
    expects: list[Expect]
    relays: list[bytes]  # the RETR/TOP lines the upstream must see, in order
    marked_at_quit: frozenset[int] | None  # view indexes marked at a QUIT in TRANSACTION
    logged_in: bool  # some command logs in


def model(scenario: Scenario) -> Plan:
    """The replies RFC 1939 prescribes for the scenario's commands, in order."""
    messages = scenario.mailbox
    expects: list[Expect] = []
    relays: list[bytes] = []
    marked: set[int] = set()
    user: bytes | None = None
    transaction = False
    marked_at_quit: frozenset[int] | None = None

    def live(msg: int | None) -> Stored | None:
        if msg is None or not 1 <= msg <= len(messages) or msg - 1 in marked:
            return None
        return messages[msg - 1]

    def listing(line: Callable[[int, Stored], bytes]) -> bytes:
        return b"".join(line(i + 1, m) + b"\r\n" for i, m in enumerate(messages) if i not in marked)

    for cmd in scenario.commands:
        if not transaction:
            match cmd.op:
                case Op.CAPA | Op.AUTH_LIST:
                    expects.append(Expect(True, multiline=True))
                case Op.USER:
                    user = cmd.arg
                    expects.append(Expect(True))
                case Op.PASS:
                    ok = user == LOCAL_USER and cmd.arg == LOCAL_PASSWORD
                    transaction = ok
                    user = None
                    expects.append(Expect(ok, login=ok))
                case Op.AUTH_PLAIN:
                    transaction = ok = cmd.arg == GOOD_PLAIN
                    expects.append(Expect(ok, login=ok))
                case Op.QUIT:
                    expects.append(Expect(True))
                    break
                case _:
                    expects.append(Expect(False))  # not valid in this state, or malformed
            continue
        found = live(cmd.msg)
        msg = cmd.msg or 0  # only used where ``found``: a message number
        match cmd.op:
            case Op.STAT:
                live_messages = [m for i, m in enumerate(messages) if i not in marked]
                octets = sum(len(m.data) for m in live_messages)
                expects.append(Expect(True, status=b"+OK %d %d" % (len(live_messages), octets)))
            case Op.LIST | Op.UIDL if cmd.msg is None:
                if cmd.op is Op.LIST:
                    body = listing(lambda n, m: b"%d %d" % (n, len(m.data)))
                else:
                    body = listing(lambda n, m: b"%d %s" % (n, m.uid))
                expects.append(Expect(True, multiline=True, body=body))
            case Op.LIST if found is not None:
                expects.append(Expect(True, status=b"+OK %d %d" % (msg, len(found.data))))
            case Op.UIDL if found is not None:
                expects.append(Expect(True, status=b"+OK %d %s" % (msg, found.uid)))
            case Op.RETR if found is not None:
                relays.append(b"RETR %d" % found.number)
                expects.append(Expect(True, multiline=True, body=found.data))
            case Op.TOP if found is not None and cmd.count is not None:
                relays.append(b"TOP %d %d" % (found.number, cmd.count))
                expects.append(Expect(True, multiline=True, body=top_of(found.data, cmd.count)))
            case Op.DELE if found is not None:
                marked.add(msg - 1)
                expects.append(Expect(True))
            case Op.RSET:
                marked.clear()
                expects.append(Expect(True))
            case Op.NOOP:
                expects.append(Expect(True))
            case Op.CAPA:
                expects.append(Expect(True, multiline=True))
            case Op.QUIT:
                marked_at_quit = frozenset(marked)
                expects.append(Expect(True, quit=True))
                break
            case _:
                expects.append(Expect(False))
    logged_in = any(e.login for e in expects)
    return Plan(expects, relays, marked_at_quit, logged_in)


# -- the scripted upstream (RFC 1939, RFC 2449, RFC 5034 server side) -----------------------


@dataclass
class UpstreamConnection:
    """One connection to the scripted upstream, and what the proxy did on it."""

    stream: trio.SocketStream
    received: list[bytes] = field(default_factory=list)  # every command line, without CRLF
    faults: list[str] = field(default_factory=list)  # the proxy's protocol errors
    # Set when +OK to QUIT in TRANSACTION is decided, just before it is written.
    quit_answered: bool = False
    gone: bool = False  # the proxy closed the connection (a read saw EOF, or a write failed)
    done: trio.Event = field(default_factory=trio.Event)
    buf: bytearray = field(default_factory=bytearray)

    async def line(self) -> bytes | None:
        """The next command line without CRLF; None when the proxy closed."""
        while (end := self.buf.find(b"\n")) == -1:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.gone = True
                if self.buf:
                    self.faults.append(f"closed inside a command line: {bytes(self.buf)!r}")
                return None
            self.buf += data
        raw = bytes(self.buf[: end + 1])
        del self.buf[: end + 1]
        if not raw.endswith(b"\r\n"):
            self.faults.append(f"command line without CRLF: {raw!r}")
        line = raw.removesuffix(b"\n").removesuffix(b"\r")
        self.received.append(line)
        return line


def cut_positions(data: bytes, cuts: Sequence[int], at_dots: bool) -> list[int]:
    """Where a reply is cut: the drawn offsets, and around each line-start dot."""
    positions = set(cuts)
    if at_dots:
        for match in re.finditer(rb"\r\n\.", data):
            dot = match.start() + 2
            positions |= {dot - 1, dot, dot + 1}
    return sorted(p for p in positions if 0 < p < len(data))[: MAX_PIECES - 1]


class ScriptedUpstream:
    """A POP3 server over loopback TCP for one mailbox (RFC 1939 §§4-7).

    DELE marks, RSET unmarks, and only QUIT in TRANSACTION removes what is marked
    (RFC 1939 §6); a connection that ends otherwise changes nothing.
    """

    def __init__(self, scenario: Scenario, cut: trio.Event) -> None:
        self.scenario = scenario
        self.mailbox: dict[int, Stored] = {m.number: m for m in scenario.mailbox}
        self.connections: list[UpstreamConnection] = []
        self.cut = cut
        self.body_pieces = 0
        capa = [b"TOP", b"UIDL", b"USER", b"RESP-CODES"]
        capa += [b"PIPELINING"] if scenario.pipelining else []
        capa += [b"SASL PLAIN"] if scenario.sasl_plain else []
        self.capa = capa

    async def serve(self, listener: trio.SocketListener) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                connection = UpstreamConnection(stream)
                self.connections.append(connection)
                nursery.start_soon(self._serve_one, connection)

    async def wait_closed(self) -> None:
        for connection in self.connections:
            await connection.done.wait()

    async def _send(self, conn: UpstreamConnection, data: bytes, *, body: bool = False) -> bool:
        """Write ``data`` in pieces, letting every task run in between; False if gone."""
        positions = cut_positions(data, self.scenario.cuts, self.scenario.cut_at_dots)
        bounds = [0, *positions, len(data)]
        for i, (start, end) in enumerate(itertools.pairwise(bounds)):
            if i:
                await trio.testing.wait_all_tasks_blocked()
            try:
                await conn.stream.send_all(data[start:end])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                conn.gone = True
                return False
            if body:
                self.body_pieces += 1
                if self.body_pieces == self.scenario.disconnect_after:
                    self.cut.set()
        return True

    async def _check_not_pipelined(self, conn: UpstreamConnection, line: bytes) -> None:
        """Without PIPELINING a client waits for each reply (RFC 2449 §6.6)."""
        await trio.testing.wait_all_tasks_blocked()
        readable, _, _ = select.select([conn.stream.socket.fileno()], [], [], 0)
        if conn.buf or readable:
            conn.faults.append(f"wrote on before the reply to {line!r} without PIPELINING")

    async def _serve_one(self, conn: UpstreamConnection) -> None:
        try:
            await self._session(conn)
        finally:
            await trio.aclose_forcefully(conn.stream)
            conn.done.set()

    async def _session(self, conn: UpstreamConnection) -> None:
        if not await self._send(conn, b"+OK scripted POP3 server ready\r\n"):
            return
        transaction = False
        user: bytes | None = None
        deleted: set[int] = set()
        while (line := await conn.line()) is not None:
            if not self.scenario.pipelining:
                await self._check_not_pipelined(conn, line)
            verb, _, rest = line.partition(b" ")
            verb = verb.upper()
            args = rest.split(b" ") if rest else []
            body = False
            reply = b"-ERR Unknown command or wrong state.\r\n"
            if verb == b"CAPA" and not args:
                reply = multiline_reply(b"+OK Capability list follows", self.capa)
            elif verb == b"QUIT" and not args:
                if transaction:
                    # RFC 1939 §6: UPDATE. Answered once every other task has had its
                    # say, so a proxy that answered its client first would be caught.
                    for number in deleted:
                        del self.mailbox[number]
                    await trio.testing.wait_all_tasks_blocked()
                    conn.quit_answered = True
                await self._send(conn, b"+OK Bye.\r\n")
                return
            elif not transaction:
                match verb, args:
                    case b"USER", [name]:
                        user = name
                        reply = b"+OK\r\n"
                    case b"PASS", [_, *_] if user is not None:
                        transaction = (user, rest) == (UPSTREAM_USER, UPSTREAM_PASSWORD)
                        user = None
                        reply = b"+OK Logged in.\r\n" if transaction else b"-ERR [AUTH] No.\r\n"
                    case b"AUTH", [b"PLAIN", response] if self.scenario.sasl_plain:
                        transaction = response == plain(UPSTREAM_USER, UPSTREAM_PASSWORD)
                        reply = b"+OK Logged in.\r\n" if transaction else b"-ERR [AUTH] No.\r\n"
            else:
                reply, body = self._transaction(verb, args, deleted)
            if reply.startswith(b"-ERR"):
                conn.faults.append(f"the upstream refused {line!r}")
            if not await self._send(conn, reply, body=body):
                return

    def _transaction(self, verb: bytes, args: list[bytes], deleted: set[int]) -> tuple[bytes, bool]:
        """A reply in TRANSACTION, and whether it is a RETR/TOP body (RFC 1939 §5, §7)."""
        live = {n: m for n, m in sorted(self.mailbox.items()) if n not in deleted}
        numbers = [int(a) if a.isdigit() else -1 for a in args]
        found = live.get(numbers[0]) if numbers else None
        no_such = b"-ERR No such message.\r\n"
        match verb, numbers:
            case b"STAT", []:
                octets = sum(len(m.data) for m in live.values())
                return b"+OK %d %d\r\n" % (len(live), octets), False
            case b"LIST", []:
                lines = [b"%d %d" % (n, len(m.data)) for n, m in live.items()]
                return multiline_reply(b"+OK", lines), False
            case b"UIDL", []:
                return multiline_reply(
                    b"+OK", [b"%d %s" % (n, m.uid) for n, m in live.items()]
                ), False
            case b"LIST", [n]:
                return (b"+OK %d %d\r\n" % (n, len(found.data)) if found else no_such), False
            case b"UIDL", [n]:
                return (b"+OK %d %s\r\n" % (n, found.uid) if found else no_such), False
            case b"RETR", [_] if found:
                head = b"+OK %d octets\r\n" % len(found.data)
                return head + stuff(found.data) + b".\r\n", True
            case b"TOP", [_, count] if found and count >= 0:
                return b"+OK\r\n" + stuff(top_of(found.data, count)) + b".\r\n", True
            case b"DELE", [n] if found:
                deleted.add(n)
                return b"+OK Marked.\r\n", False
            case b"RSET", []:
                deleted.clear()
                return b"+OK\r\n", False
            case b"NOOP", []:
                return b"+OK\r\n", False
        return no_such, False


def multiline_reply(status: bytes, lines: Sequence[bytes]) -> bytes:
    return status + b"\r\n" + b"".join(stuff(line + b"\r\n") for line in lines) + b".\r\n"


# -- the client ------------------------------------------------------------------------------


class Cut(Exception):
    """The scenario's disconnect point was reached: the client vanishes."""


@dataclass
class Got:
    status: bytes
    body: bytes | None = None  # un-stuffed; None for a one-line reply
    complete: bool = True
    upstream_quit_answered: bool = False  # at the moment a +OK to QUIT was read


async def read_replies(
    reader: Pop3Client,
    commands: Sequence[Cmd],
    expects: Sequence[Expect],
    upstream: ScriptedUpstream,
    got: list[Got],
) -> None:
    """Read one reply per command into ``got``; stop early at EOF."""
    for cmd, expect in zip(commands, expects, strict=False):
        status = await reader.next_line()
        if status is None:
            return
        reply = Got(status)
        got.append(reply)
        if status.startswith(b"+OK") and expect.multiline:
            reply.body, reply.complete = b"", False  # until its terminator is read
            lines = await reader.next_body_lines()
            if lines is not None:
                reply.body, reply.complete = b"".join(line + b"\r\n" for line in lines), True
        if cmd.op is Op.QUIT and status.startswith(b"+OK"):
            reply.upstream_quit_answered = any(c.quit_answered for c in upstream.connections)


async def drive_client(
    stream: trio.abc.HalfCloseableStream, scenario: Scenario, plan: Plan, upstream: ScriptedUpstream
) -> tuple[list[Got], list[bytes] | None]:
    """Send the commands as the ending says and read every reply it can.

    Returns the replies and, for QUIT_AFTER_REPLIES, what the upstream had received
    when the client sent QUIT.
    """
    commands = scenario.commands
    ending = scenario.ending
    cut = upstream.cut if ending is Ending.DISCONNECT else None

    def vanish_at_the_cut() -> None:
        if cut is not None and cut.is_set():
            raise Cut

    reader = Pop3Client(
        stream, receive_bytes=CLIENT_RECEIVE_BYTES, before_receive=vanish_at_the_cut
    )
    got: list[Got] = []
    before_quit: list[bytes] | None = None
    try:
        greeting = await reader.next_line()
        assert greeting is not None and greeting.startswith(b"+OK"), greeting
        first = commands[:-1] if ending is Ending.QUIT_AFTER_REPLIES else commands
        await stream.send_all(b"".join(cmd.line + b"\r\n" for cmd in first))
        if ending is Ending.EOF:
            await stream.send_eof()
        await read_replies(reader, first, plan.expects, upstream, got)
        if ending is Ending.QUIT_AFTER_REPLIES and len(got) == len(first):
            before_quit = [line for c in upstream.connections for line in c.received]
            await stream.send_all(commands[-1].line + b"\r\n")
            await read_replies(reader, commands[-1:], plan.expects[-1:], upstream, got)
        if ending is not Ending.DISCONNECT:
            assert await reader.at_eof(), f"more after the last reply: {bytes(reader.buf)!r}"
    except Cut:
        pass
    finally:
        await stream.aclose()
    return got, before_quit


# -- the property ----------------------------------------------------------------------------


def proxy_context(port: int) -> SessionContext:
    upstream = UpstreamConfig(
        name="provider",
        host="127.0.0.1",
        port=port,
        tls=TlsMode.NONE,
        connect_timeout_seconds=UPSTREAM_TIMEOUT_SECONDS,
        login_timeout_seconds=UPSTREAM_TIMEOUT_SECONDS,
        command_timeout_seconds=UPSTREAM_TIMEOUT_SECONDS,
        keepalive_interval_seconds=KEEPALIVE_SECONDS,
    )
    user = UserConfig(
        name=LOCAL_USER.decode(),
        password_hash=PASSWORD_HASH,
        upstream=upstream.name,
        upstream_user=UPSTREAM_USER.decode(),
        upstream_password=Secret(UPSTREAM_PASSWORD),
    )

    async def open_maildrop(account: UserConfig, session_id: str) -> Maildrop:
        assert account.upstream_user is not None and account.upstream_password is not None
        upstream_account = UpstreamAccount(
            upstream, account.upstream_user, account.upstream_password
        )
        return await open_upstream(upstream_account, tls_context=None)

    return SessionContext(
        listener="none",
        limits=LIMITS,
        authenticator=Authenticator({user.name: user}),
        open_maildrop=open_maildrop,
        allow_plaintext_auth=True,
    )


def check_reply(cmd: Cmd, expect: Expect, got: Got, scenario: Scenario) -> None:
    where = f"reply to {cmd.line!r}: {got.status!r}"
    assert got.status.startswith((b"+OK", b"-ERR")), where
    ok = got.status.startswith(b"+OK")
    assert ok == expect.ok, where
    if expect.status is not None:
        assert got.status == expect.status, where
    if not ok or not got.complete:
        return
    assert (got.body is not None) == expect.multiline, where
    if expect.body is not None:
        assert got.body == expect.body, f"{where}, body differs"
    if expect.login:
        # The proxy's listing is the upstream's: count and octets at login.
        found = re.search(rb"(\d+) messages \((\d+) octets\)", got.status)
        if found is not None:
            octets = sum(len(m.data) for m in scenario.mailbox)
            assert (int(found[1]), int(found[2])) == (len(scenario.mailbox), octets), where
    if expect.quit:
        assert got.upstream_quit_answered, "the client's +OK to QUIT came before the upstream's"


def login_lines(scenario: Scenario) -> list[bytes]:
    if scenario.sasl_plain:
        login = [b"AUTH PLAIN " + plain(UPSTREAM_USER, UPSTREAM_PASSWORD)]
    else:
        login = [b"USER " + UPSTREAM_USER, b"PASS " + UPSTREAM_PASSWORD]
    return [b"CAPA", *login, b"UIDL", b"LIST"]


async def run_scenario(scenario: Scenario) -> None:
    plan = model(scenario)
    cut = trio.Event()
    upstream = ScriptedUpstream(scenario, cut)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    assert len(listeners) == 1
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    client, server = trio.testing.memory_stream_pair()
    session = Session(server, PeerAddress("192.0.2.1", 1), proxy_context(port))
    with trio.fail_after(EXAMPLE_DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream.serve, listener)
            async with trio.open_nursery() as client_side:
                client_side.start_soon(session.run)
                got, before_quit = await drive_client(client, scenario, plan, upstream)
            await upstream.wait_closed()
            nursery.cancel_scope.cancel()

    commands = scenario.commands
    event(f"ending: {scenario.ending.value}, pipelining: {scenario.pipelining}")
    event(f"relayed bodies: {min(len(plan.relays), 3)}{'+' if len(plan.relays) >= 3 else ''}")
    if scenario.ending is Ending.DISCONNECT:
        event(f"disconnect: {'mid-session' if cut.is_set() else 'after the replies'}")
    # One reply per command, in order, each as RFC 1939 prescribes.
    for cmd, expect, reply in zip(commands, plan.expects, got, strict=False):
        check_reply(cmd, expect, reply, scenario)
    if scenario.ending is Ending.DISCONNECT:
        assert len(got) <= len(plan.expects)
    else:
        assert len(got) == len(plan.expects), f"{len(got)} replies to {len(plan.expects)}"
        assert all(reply.complete for reply in got)

    # An upstream connection exactly when the local login succeeded (and never a second).
    assert len(upstream.connections) == (1 if plan.logged_in else 0)
    original = {m.number: m for m in scenario.mailbox}
    if not plan.logged_in:
        assert upstream.mailbox == original
        return
    (conn,) = upstream.connections
    assert conn.gone or conn.quit_answered, "the upstream connection was left open"
    assert not conn.faults, conn.faults
    prefix = login_lines(scenario)
    assert conn.received[: len(prefix)] == prefix
    rest = conn.received[len(prefix) :]
    relays = [line for line in rest if not line.startswith((b"DELE ", b"QUIT"))]
    tail = rest[len(relays) :]
    # Exactly one RETR/TOP upstream per RETR/TOP the client was answered with +OK, in
    # order and with the upstream's numbers; nothing else before the QUIT (if any).
    assert rest[: len(relays)] == relays, f"DELE or QUIT before a relay: {rest}"
    if scenario.ending is Ending.DISCONNECT:
        assert relays == plan.relays[: len(relays)], (relays, plan.relays)
    else:
        assert relays == plan.relays, (relays, plan.relays)
    if before_quit is not None:
        assert not any(line.startswith((b"DELE", b"QUIT")) for line in before_quit), before_quit

    sent_quit = b"QUIT" in tail
    if scenario.ending in (Ending.QUIT, Ending.QUIT_AFTER_REPLIES):
        assert sent_quit, f"no QUIT upstream after the client's QUIT: {rest}"
    if scenario.ending is Ending.EOF:
        assert not sent_quit
    if not sent_quit:
        # Invariant 2: without the client's QUIT nothing is deleted, nor asked to be.
        assert tail == [], f"upstream commands of a session without QUIT: {tail}"
        event("logged in, no QUIT upstream")
        assert upstream.mailbox == original
        assert session.summary.committed == Committed()
        if scenario.ending is Ending.EOF:
            assert session.summary.result is SessionResult.EOF
        return
    # Invariant 1: DELE after the client's QUIT, once per message marked (and not RSET)
    # then, with the upstream's own numbers; then QUIT, and nothing after it.
    assert plan.marked_at_quit is not None, "QUIT upstream, but the client's QUIT was not reached"
    assert relays == plan.relays
    numbers = {scenario.mailbox[i].number for i in plan.marked_at_quit}
    deles = tail[:-1]
    assert tail[-1] == b"QUIT", tail
    assert sorted(deles) == sorted(b"DELE %d" % n for n in numbers), (deles, numbers)
    assert upstream.mailbox == {n: m for n, m in original.items() if n not in numbers}
    assert session.summary.committed.deleted_upstream == len(numbers)
    event(f"upstream QUIT with {min(len(numbers), 2)}{'+' if len(numbers) >= 2 else ''} DELE")
    if scenario.ending is not Ending.DISCONNECT:
        assert session.summary.result is SessionResult.QUIT


# Hand-picked: a dot-line message and an empty one relayed whole and by TOP, marks undone
# by RSET, deletions at upstream numbers with gaps; ended by pipelined QUIT, by QUIT after
# the replies, by EOF and by a disconnect in the middle of a body.
DOTTED = Stored(7, b"uid-7", b"Subject: x\r\n\r\n.\r\n..two\r\n\r\n.end\r\n")
PLAIN_MESSAGE = Stored(9, b"uid-9", b"Subject: y\r\n\r\nbody\r\n")
EMPTY = Stored(12, b"uid-12", b"")
LOGIN = (Cmd(b"USER demo", Op.USER, arg=b"demo"), Cmd(b"PASS secret", Op.PASS, arg=b"secret"))
MIX = (
    Cmd(b"RETR 1", Op.RETR, 1),
    Cmd(b"TOP 1 2", Op.TOP, 1, 2),
    Cmd(b"DELE 1", Op.DELE, 1),
    Cmd(b"RSET", Op.RSET),
    Cmd(b"DELE 2", Op.DELE, 2),
    Cmd(b"RETR 2", Op.RETR, 2),
    Cmd(b"RETR 3", Op.RETR, 3),
    Cmd(b"DELE 3", Op.DELE, 3),
    Cmd(b"STAT", Op.STAT),
    Cmd(b"LIST", Op.LIST),
    Cmd(b"UIDL", Op.UIDL),
)


def handpicked(ending: Ending, *, pipelining: bool) -> Scenario:
    quit_ = (Cmd(b"QUIT", Op.QUIT),) if ending is not Ending.EOF else ()
    return Scenario(
        mailbox=(DOTTED, PLAIN_MESSAGE, EMPTY),
        pipelining=pipelining,
        sasl_plain=False,
        cuts=(3, 40),
        cut_at_dots=True,
        commands=(*LOGIN, *MIX, *quit_),
        ending=ending,
        disconnect_after=3,
    )


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios())
@example(scenario=handpicked(Ending.QUIT, pipelining=True))
@example(scenario=handpicked(Ending.QUIT_AFTER_REPLIES, pipelining=False))
@example(scenario=handpicked(Ending.EOF, pipelining=True))
@example(scenario=handpicked(Ending.DISCONNECT, pipelining=False))
async def test_proxy_session_relays_exactly_and_deletes_upstream_only_what_quit_commits(
    scenario: Scenario,
) -> None:
    await run_scenario(scenario)
