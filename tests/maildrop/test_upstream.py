"""The live upstream maildrop against scripted POP3 peers on loopback TCP.

Every upstream here is a small server task written in the test: it reads command
lines from a real socket (or a real TLS stream), answers with canned octets and
records every line and every read it received, so a test can assert what was
sent, in how many writes, over TLS or not, and what was never sent at all (no
credential before STLS, no QUIT after a refused DELE). No Mock stands in for a
peer. Timeouts run on ``autojump_clock``: no real sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import re
import select
import socket
import ssl
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from scheduler_steps import steps_of_this_task

from popproxy.config import TlsMode, UpstreamConfig, UpstreamLogin
from popproxy.maildrop import upstream_login as login_module
from popproxy.maildrop.base import MaildropError, MessageInfo
from popproxy.maildrop.retention import RetentionContext, open_retained
from popproxy.maildrop.upstream import (
    HEADER_WINDOW,
    UPSTREAM_RECEIVE_BYTES,
    CapabilityMemo,
    UpstreamAccount,
    UpstreamError,
    UpstreamMaildrop,
    open_upstream,
)
from popproxy.outcomes import UpstreamFailure
from popproxy.policy import Action, HeaderMatch, Match, Policy, Rule
from popproxy.policy.patterns import header_pattern
from popproxy.pop3.client_replies import MAX_CAPABILITY_LINES, Capabilities
from popproxy.pop3.commands import Command
from popproxy.pop3.replies import ResponseCode
from popproxy.secret import Secret
from popproxy.socket_stream import TcpStream
from popproxy.state.base import AccountKey
from popproxy.state.sqlite import open_sqlite
from popproxy.tls import client_context

USER = "alice@example.net"
# Distinctive, so that a leak into a log line or an error is easy to find.
PASSWORD = "pw-Zq7!hunter2-xK9"
PLAIN_RESPONSE = b"\0" + USER.encode() + b"\0" + PASSWORD.encode()
PLAIN_B64 = base64.b64encode(PLAIN_RESPONSE)
CREDENTIAL_VERBS = (b"USER", b"PASS", b"AUTH")

LOGIN_TIMEOUT = 10.0
COMMAND_TIMEOUT = 7.0
CONNECT_TIMEOUT = 3.0
# Every exchange with a scripted upstream ends within this (virtual under autojump_clock).
TEST_DEADLINE_SECONDS = 60.0
# A scripted upstream must finish this long after the client is done (a real wait
# only when a test is broken; under autojump_clock, none).
SCRIPT_GRACE_SECONDS = 5.0

CAPA_PLAIN = (b"UIDL", b"TOP", b"USER")
CAPA_PIPELINING = (b"UIDL", b"TOP", b"USER", b"PIPELINING")
CAPA_SASL = (b"UIDL", b"USER", b"SASL PLAIN")


# -- the scripted upstream ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """One command line the upstream received, without CRLF, and whether it came over TLS."""

    line: bytes
    secure: bool


class Peer:
    """The server side of one upstream connection: line reads, writes, a record of both."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.secure = isinstance(stream, trio.SSLStream)
        self.received: list[Received] = []
        self.reads: list[tuple[bytes, bool]] = []  # each receive_some, and over TLS or not
        self.tls_failed = False
        self.send_failed = False
        self.eof = False
        self._buf = bytearray()

    @property
    def lines(self) -> list[bytes]:
        return [r.line for r in self.received]

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.reads.append((bytes(data), self.secure))
        self._buf += data
        return True

    async def line(self, *, strict: bool = True) -> bytes | None:
        """The next command line without CRLF; None at end of stream.

        ``strict``: the line must end with CRLF, as every command does (RFC 1939 §3).
        """
        while (end := self._buf.find(b"\n")) == -1:
            if self.eof or not await self._fill():
                return None
        raw = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        assert raw.endswith(b"\r\n") or not strict, f"not a CRLF line: {raw!r}"
        line = raw.removesuffix(b"\n").removesuffix(b"\r")
        self.received.append(Received(line, self.secure))
        return line

    async def expect(self, *wanted: bytes) -> None:
        """Read one line per item of ``wanted``; each must be exactly that line."""
        for want in wanted:
            got = await self.line()
            assert got == want, f"expected {want!r}, got {got!r}"

    async def send(self, data: bytes) -> None:
        """Write ``data``; a client that has gone away is not an error of the script."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.send_failed = True

    async def until_eof(self) -> None:
        """Read (and record) whatever the client sends until it closes the connection."""
        while await self.line(strict=False) is not None:
            pass

    def pending(self) -> bool:
        """Whether the client has sent octets not yet read as a line (no blocking).

        Call after ``trio.testing.wait_all_tasks_blocked()``: loopback TCP delivers a
        write at once, so this tells whether the client wrote before waiting for a reply.
        """
        if self._buf:
            return True
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        readable, _, _ = select.select([stream.socket.fileno()], [], [], 0)
        return bool(readable)

    async def reply_after_one_line(self, expected: bytes, reply: bytes) -> None:
        """Read ``expected``, check that nothing else was written before its reply, answer."""
        await self.expect(expected)
        await trio.testing.wait_all_tasks_blocked()
        assert not self.pending(), f"the client wrote on before the reply to {expected!r}"
        await self.send(reply)

    async def start_tls(self, context: ssl.SSLContext) -> bool:
        """The server side of a TLS handshake; False (and recorded) if the client refused it."""
        assert not self._buf, "octets were buffered before the handshake"
        tls = trio.SSLStream(self.stream, context, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            self.tls_failed = True
            return False  # keep reading the raw transport: a plaintext fallback would show
        self.stream = tls
        self.secure = True
        return True

    def raw(self) -> bytes:
        """Every octet received, decrypted where it came over TLS."""
        return b"".join(data for data, _ in self.reads)


Script = Callable[[Peer], Awaitable[None]]


@dataclass
class Upstream:
    """A listening scripted upstream and the connections it served."""

    port: int
    peers: list[Peer] = field(default_factory=list)

    @property
    def peer(self) -> Peer:
        assert len(self.peers) == 1, f"{len(self.peers)} connections"
        return self.peers[0]

    @property
    def lines(self) -> list[bytes]:
        return [line for peer in self.peers for line in peer.lines]


@contextlib.asynccontextmanager
async def scripted_upstream(
    script: Script, *, implicit_tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[Upstream]:
    """Listen on a loopback port; run ``script`` on the first connection.

    On leaving the block the script must finish (it usually ends when the
    client closes the connection); its assertion errors fail the test. The whole
    block runs under ``TEST_DEADLINE_SECONDS``.
    """
    listeners = await trio.open_tcp_listeners(0, host=host)
    assert len(listeners) == 1
    listener = listeners[0]
    assert isinstance(listener.socket, trio.socket.SocketType)
    upstream = Upstream(port=listener.socket.getsockname()[1])
    finished = trio.Event()

    async def serve() -> None:
        async with listener:
            stream: trio.abc.Stream = await listener.accept()
        peer = Peer(stream)
        upstream.peers.append(peer)
        try:
            if implicit_tls is None or await peer.start_tls(implicit_tls):
                await script(peer)
            else:
                await peer.until_eof()
        finally:
            await trio.aclose_forcefully(peer.stream)
            finished.set()

    # A deadlock fails the test instead of hanging it (at once under autojump_clock).
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield upstream
            with trio.fail_after(SCRIPT_GRACE_SECONDS):
                if upstream.peers:
                    await finished.wait()
                else:
                    nursery.cancel_scope.cancel()


def stuff(message: bytes) -> bytes:
    """RFC 1939 §3 dot-stuffing of a CRLF message (a reference, written independently)."""
    return re.sub(rb"(?m)^\.", b"..", message)


def multiline(lines: Sequence[bytes], status: bytes = b"+OK") -> bytes:
    return status + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n"


@dataclass
class Mailbox:
    """A scripted POP3 server with canned replies for a fixed maildrop.

    ``messages`` maps upstream numbers to (uid, message in CRLF form). ``replies``
    overrides the reply to an exact command line.
    """

    messages: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    capa: Sequence[bytes] = CAPA_PIPELINING
    greeting: bytes = b"+OK scripted POP3 ready\r\n"
    replies: dict[bytes, bytes] = field(default_factory=dict)
    stls: ssl.SSLContext | None = None
    capa_after_tls: Sequence[bytes] | None = None

    async def __call__(self, peer: Peer) -> None:
        await peer.send(self.greeting)
        while (line := await peer.line()) is not None:
            if line in self.replies:
                await peer.send(self.replies[line])
                continue
            reply, quit_ = self.answer(peer, line)
            await peer.send(reply)
            if line == b"STLS" and self.stls is not None and not await peer.start_tls(self.stls):
                await peer.until_eof()
                return
            if quit_:
                return

    def answer(self, peer: Peer, line: bytes) -> tuple[bytes, bool]:
        verb, _, arg = line.partition(b" ")
        args = arg.split()
        match verb:
            case b"CAPA":
                capa = self.capa
                if peer.secure and self.capa_after_tls is not None:
                    capa = self.capa_after_tls
                return multiline(capa), False
            case b"STLS" if self.stls is not None:
                return b"+OK Begin TLS negotiation\r\n", False
            case b"USER":
                return b"+OK\r\n", False
            case b"PASS":
                ok = arg == PASSWORD.encode()
                return (b"+OK Logged in.\r\n" if ok else b"-ERR [AUTH] Wrong.\r\n"), False
            case b"AUTH" if args[:1] == [b"PLAIN"] and len(args) == 2:
                ok = base64.b64decode(args[1]) == PLAIN_RESPONSE
                return (b"+OK Logged in.\r\n" if ok else b"-ERR [AUTH] Wrong.\r\n"), False
            case b"UIDL":
                return multiline([b"%d %s" % (n, u) for n, (u, _) in self.messages.items()]), False
            case b"LIST":
                sizes = [b"%d %d" % (n, len(m)) for n, (_, m) in self.messages.items()]
                return multiline(sizes), False
            case b"RETR" if int(args[0]) in self.messages:
                return b"+OK\r\n" + stuff(self.messages[int(args[0])][1]) + b".\r\n", False
            case b"TOP" if int(args[0]) in self.messages:
                message = self.messages[int(args[0])][1]
                head, _, body = message.partition(b"\r\n\r\n")
                kept = body.splitlines(keepends=True)[: int(args[1])]
                return b"+OK\r\n" + stuff(head + b"\r\n\r\n" + b"".join(kept)) + b".\r\n", False
            case b"DELE" | b"NOOP":
                return b"+OK\r\n", False
            case b"QUIT":
                return b"+OK Bye.\r\n", True
        return b"-ERR Unknown command or message.\r\n", False


MESSAGES: dict[int, tuple[bytes, bytes]] = {
    1: (b"uid-one", b"Subject: one\r\n\r\nfirst\r\n"),
    2: (b"uid-two", b"Subject: two\r\n\r\n.dotted\r\nline\r\n..two dots\r\n"),
    3: (b"uid-three", b"Subject: three\r\n\r\nthird\r\nbody\r\nlines\r\n"),
}


def listing_of(messages: dict[int, tuple[bytes, bytes]]) -> list[MessageInfo]:
    return [MessageInfo(uid.decode(), len(m)) for _, (uid, m) in sorted(messages.items())]


def account(
    port: int,
    *,
    tls: TlsMode = TlsMode.NONE,
    login: UpstreamLogin = UpstreamLogin.AUTO,
    ca_file: Path | None = None,
    verify: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT,
    host: str = "127.0.0.1",
) -> UpstreamAccount:
    upstream = UpstreamConfig(
        name="provider",
        host=host,
        port=port,
        tls=tls,
        verify=verify,
        ca_file=ca_file,
        login=login,
        connect_timeout_seconds=connect_timeout,
        login_timeout_seconds=LOGIN_TIMEOUT,
        command_timeout_seconds=COMMAND_TIMEOUT,
        keepalive_interval_seconds=120,
    )
    return UpstreamAccount(upstream, USER, Secret.from_str(PASSWORD))


async def login(
    upstream: Upstream,
    *,
    tls: TlsMode = TlsMode.NONE,
    method: UpstreamLogin = UpstreamLogin.AUTO,
    verify: bool = True,
    tls_context: ssl.SSLContext | None = None,
    memo: CapabilityMemo | None = None,
) -> UpstreamMaildrop:
    """``open_upstream`` against the scripted upstream."""
    return await open_upstream(
        account(upstream.port, tls=tls, login=method, verify=verify),
        tls_context=tls_context,
        capabilities=memo,
    )


async def starttls_login(
    upstream: Upstream, ca_file: Path, *, memo: CapabilityMemo | None = None
) -> UpstreamMaildrop:
    """``login`` with STLS (RFC 2595 §4), verifying the upstream against ``ca_file``."""
    return await login(
        upstream,
        tls=TlsMode.STARTTLS,
        tls_context=verifying_context(ca_file, TlsMode.STARTTLS),
        memo=memo,
    )


async def collect(drop: UpstreamMaildrop, index: int, body_lines: int | None = None) -> bytes:
    async with contextlib.aclosing(drop.retrieve(index, body_lines=body_lines)) as chunks:
        return b"".join([chunk async for chunk in chunks])


def assert_upstream_error(
    exc: BaseException, failure: UpstreamFailure, code: ResponseCode | None
) -> None:
    assert isinstance(exc, UpstreamError), repr(exc)
    assert exc.failure is failure, exc.failure
    assert exc.code is code, exc.code


def assert_no_credentials(upstream: Upstream) -> None:
    """Nothing that carries a credential reached the upstream, in the clear or not."""
    for line in upstream.lines:
        assert not line.upper().startswith(CREDENTIAL_VERBS), line
    for peer in upstream.peers:
        raw = peer.raw()
        assert PASSWORD.encode() not in raw
        assert PLAIN_B64 not in raw
        assert USER.encode() not in raw


def after_login(lines: Sequence[bytes]) -> list[bytes]:
    """The lines after the listing (LIST) was asked for."""
    return list(lines[lines.index(b"LIST") + 1 :])


# -- TLS material ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upstream-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_tls(ca: trustme.CA, *identities: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*identities).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def good_server_tls(ca: trustme.CA) -> ssl.SSLContext:
    return server_tls(ca, "127.0.0.1", "localhost")


def verifying_context(ca_file: Path, tls: TlsMode) -> ssl.SSLContext:
    return client_context(account(1, tls=tls, ca_file=ca_file).upstream)


# -- login ----------------------------------------------------------------------------------


async def test_user_pass_without_pipelining_sends_one_command_per_reply() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.reply_after_one_line(b"CAPA", multiline(CAPA_PLAIN))
        await peer.reply_after_one_line(b"USER " + USER.encode(), b"+OK\r\n")
        await peer.reply_after_one_line(b"PASS " + PASSWORD.encode(), b"+OK in\r\n")
        await peer.reply_after_one_line(b"UIDL", multiline([b"1 a", b"2 b"]))
        await peer.reply_after_one_line(b"LIST", multiline([b"1 10", b"2 20"]))
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        drop = await login(upstream)
        assert drop.messages == [MessageInfo("a", 10), MessageInfo("b", 20)]
        await drop.aclose()
    assert upstream.lines == [
        b"CAPA",
        b"USER " + USER.encode(),
        b"PASS " + PASSWORD.encode(),
        b"UIDL",
        b"LIST",
    ]


# A PIPELINING upstream and the login lines it must get: USER/PASS, or AUTH PLAIN when
# CAPA lists SASL PLAIN (RFC 5034 §4).
pipelined_logins = pytest.mark.parametrize(
    ("capa", "login_lines"),
    [
        (CAPA_PIPELINING, [b"USER " + USER.encode(), b"PASS " + PASSWORD.encode()]),
        ((*CAPA_PIPELINING, b"SASL LOGIN PLAIN"), [b"AUTH PLAIN " + PLAIN_B64]),
    ],
    ids=["user", "plain"],
)


@pipelined_logins
async def test_pipelined_login_and_listing_arrive_in_one_write(
    capa: Sequence[bytes], login_lines: list[bytes]
) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.expect(b"CAPA")
        await peer.send(multiline(capa))
        reads_before = len(peer.reads)
        # Every command before any reply: a client waiting for a reply would hang here.
        await peer.expect(*login_lines, b"UIDL", b"LIST")
        assert len(peer.reads) == reads_before + 1, "login and listing took several writes"
        await peer.send(b"".join(b"+OK\r\n" for _ in login_lines))
        await peer.send(multiline([b"1 a"]) + multiline([b"1 5"]))
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        drop = await login(upstream)
        assert drop.messages == [MessageInfo("a", 5)]
        await drop.aclose()


async def learned(capa: Sequence[bytes]) -> CapabilityMemo:
    """A memo that has seen one session against an upstream answering CAPA with ``capa``."""
    memo = CapabilityMemo()
    async with scripted_upstream(Mailbox(dict(MESSAGES), capa=capa)) as upstream:
        drop = await login(upstream, memo=memo)
        await drop.commit(set())
    assert upstream.lines[0] == b"CAPA"
    return memo


@pipelined_logins
async def test_a_remembered_pipelining_upstream_gets_capa_login_and_listing_in_one_write(
    capa: Sequence[bytes], login_lines: list[bytes]
) -> None:
    memo = await learned(capa)
    assert memo.pipelining

    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        # Every command before any reply: a client waiting for CAPA's would hang here.
        await peer.expect(b"CAPA", *login_lines, b"UIDL", b"LIST")
        assert len(peer.reads) == 1, "CAPA, login and listing took several writes"
        await peer.send(multiline(capa) + b"".join(b"+OK\r\n" for _ in login_lines))
        await peer.send(multiline([b"1 a"]) + multiline([b"1 5"]))
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        drop = await login(upstream, memo=memo)
        assert drop.messages == [MessageInfo("a", 5)]
        await drop.aclose()


async def test_an_unchanged_capa_reply_chooses_the_login_commands_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fresh reply equal to the memo is the memo's own mapping: the commands sent
    for it are the ones it calls for, with nothing to choose again."""
    memo = await learned(CAPA_PIPELINING)
    chosen: list[Capabilities] = []
    commands = login_module.PasswordLogin.commands

    def counted(
        self: login_module.PasswordLogin, capabilities: Capabilities
    ) -> tuple[Command, ...]:
        chosen.append(capabilities)
        return commands(self, capabilities)

    monkeypatch.setattr(login_module.PasswordLogin, "commands", counted)
    async with scripted_upstream(Mailbox(dict(MESSAGES), capa=CAPA_PIPELINING)) as upstream:
        drop = await login(upstream, memo=memo)
        await drop.aclose()
    assert chosen == [memo.capabilities]
    # A changed reply is checked against the commands already sent.
    async with scripted_upstream(
        Mailbox(dict(MESSAGES), capa=(*CAPA_PIPELINING, b"X-CHANGED"))
    ) as upstream:
        drop = await login(upstream, memo=memo)
        await drop.aclose()
    assert len(chosen) == 3 and chosen[2] == memo.capabilities


async def test_without_pipelining_remembered_capa_goes_alone() -> None:
    memo = await learned(CAPA_PLAIN)
    assert memo.capabilities is not None and not memo.pipelining

    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.reply_after_one_line(b"CAPA", multiline(CAPA_PLAIN))
        await peer.reply_after_one_line(b"USER " + USER.encode(), b"+OK\r\n")
        await peer.reply_after_one_line(b"PASS " + PASSWORD.encode(), b"+OK in\r\n")
        await peer.reply_after_one_line(b"UIDL", multiline([b"1 a"]))
        await peer.reply_after_one_line(b"LIST", multiline([b"1 5"]))
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        drop = await login(upstream, memo=memo)
        await drop.aclose()


async def test_a_contradicted_memo_is_replaced_and_a_refusal_is_temporary() -> None:
    # The memo says SASL PLAIN; the upstream has since dropped it and refuses AUTH.
    memo = await learned((*CAPA_PIPELINING, b"SASL PLAIN"))
    changed = Mailbox(dict(MESSAGES), capa=CAPA_PIPELINING)
    changed.replies[b"AUTH PLAIN " + PLAIN_B64] = b"-ERR [AUTH] Unknown mechanism.\r\n"
    async with scripted_upstream(changed) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await login(upstream, memo=memo)
    # Not "your credentials were rejected" (SYS/PERM): a retry goes by the fresh CAPA.
    assert_upstream_error(caught.value, UpstreamFailure.REJECTED, ResponseCode.SYS_TEMP)
    assert memo.capabilities is not None and "SASL" not in memo.capabilities
    async with scripted_upstream(Mailbox(dict(MESSAGES), capa=CAPA_PIPELINING)) as upstream:
        drop = await login(upstream, memo=memo)
        await drop.aclose()
    assert upstream.lines[:3] == [b"CAPA", b"USER " + USER.encode(), b"PASS " + PASSWORD.encode()]


def test_the_sessions_of_an_upstream_share_one_capa_answer_until_it_changes() -> None:
    memo = CapabilityMemo()
    first = memo.remember({"UIDL": (), "PIPELINING": ()})
    # An equal answer (in any order) is the kept one itself: one per upstream, not per session.
    assert memo.remember({"PIPELINING": (), "UIDL": ()}) is first
    changed = memo.remember({"UIDL": ()})
    assert changed == {"UIDL": ()} and memo.capabilities is changed and not memo.pipelining
    # What earlier sessions hold is theirs as it was, and nobody can change it.
    assert first == {"UIDL": (), "PIPELINING": ()}
    with pytest.raises(TypeError):
        first["SASL"] = ("PLAIN",)  # type: ignore[index]


def test_a_capa_reply_with_the_lines_of_the_last_one_gives_the_kept_answer() -> None:
    memo = CapabilityMemo()
    first = memo.remember_reply([b"UIDL", b"PIPELINING"])
    assert first == {"UIDL": (), "PIPELINING": ()} and memo.capabilities is first
    assert memo.remember_reply([b"UIDL", b"PIPELINING"]) is first
    # Other lines are parsed: an equal answer is still the kept one, a new one replaces it.
    assert memo.remember_reply([b"PIPELINING", b"UIDL"]) is first
    changed = memo.remember_reply([b"UIDL", b"SASL PLAIN"])
    assert changed == {"UIDL": (), "SASL": ("PLAIN",)} and memo.capabilities is changed
    # A kept answer replaced by other means (a -ERR to CAPA) is not taken for the lines'.
    assert memo.remember({}) == {}
    assert memo.remember_reply([b"UIDL", b"SASL PLAIN"]) == changed
    assert memo.capabilities == changed


async def test_a_refused_login_with_a_confirmed_memo_keeps_its_code() -> None:
    memo = await learned(CAPA_PIPELINING)
    mailbox = Mailbox(dict(MESSAGES), capa=CAPA_PIPELINING)
    mailbox.replies[b"PASS " + PASSWORD.encode()] = b"-ERR [AUTH] Wrong.\r\n"
    async with scripted_upstream(mailbox) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await login(upstream, memo=memo)
    assert_upstream_error(caught.value, UpstreamFailure.AUTH_REJECTED, ResponseCode.SYS_PERM)


async def test_starttls_with_a_memo_sends_credentials_only_over_tls(
    ca_file: Path, good_server_tls: ssl.SSLContext
) -> None:
    capa = (b"UIDL", b"PIPELINING", b"STLS")
    memo = CapabilityMemo()
    for _ in range(2):
        mailbox = Mailbox(dict(MESSAGES), capa=capa, stls=good_server_tls)
        async with scripted_upstream(mailbox) as upstream:
            drop = await starttls_login(upstream, ca_file, memo=memo)
            await drop.aclose()
        peer = upstream.peer
        assert b"".join(data for data, secure in peer.reads if not secure) == b"CAPA\r\nSTLS\r\n"
    # The second session pipelined CAPA with the login over TLS.
    secure_reads = [data for data, secure in peer.reads if secure]
    user_pass = b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n"
    assert secure_reads[0] == b"CAPA\r\n" + user_pass + b"UIDL\r\nLIST\r\n"


async def test_auth_plain_initial_response_is_empty_authzid_user_password() -> None:
    seen: list[bytes] = []

    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.reply_after_one_line(b"CAPA", multiline([b"SASL plain", b"UIDL"]))
        line = await peer.line()
        assert line is not None
        seen.append(line)
        await trio.testing.wait_all_tasks_blocked()
        assert not peer.pending()
        await peer.send(b"+OK\r\n")
        await peer.reply_after_one_line(b"UIDL", multiline([]))
        await peer.reply_after_one_line(b"LIST", multiline([]))
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        drop = await login(upstream)
        assert drop.messages == []
        await drop.aclose()
    verb, mechanism, initial = seen[0].split(b" ")
    assert (verb, mechanism) == (b"AUTH", b"PLAIN")
    assert base64.b64decode(initial, validate=True) == b"\0alice@example.net\0" + PASSWORD.encode()


@pytest.mark.parametrize(
    ("login_method", "capa", "first_verb"),
    [
        (UpstreamLogin.AUTO, CAPA_SASL, b"AUTH"),
        (UpstreamLogin.AUTO, (b"UIDL", b"SASL LOGIN CRAM-MD5"), b"USER"),
        (UpstreamLogin.AUTO, CAPA_PLAIN, b"USER"),
        (UpstreamLogin.USER, CAPA_SASL, b"USER"),
        (UpstreamLogin.PLAIN, CAPA_PLAIN, b"AUTH"),
    ],
)
async def test_login_method_auto_or_forced(
    login_method: UpstreamLogin, capa: Sequence[bytes], first_verb: bytes
) -> None:
    mailbox = Mailbox(dict(MESSAGES), capa=capa)
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream, method=login_method)
        assert drop.messages == listing_of(MESSAGES)
        await drop.aclose()
    verbs = [line.split(b" ")[0] for line in upstream.lines]
    assert verbs[:2] == [b"CAPA", first_verb]
    assert (b"PASS" in verbs) == (first_verb == b"USER")


async def test_capa_err_means_no_capabilities_user_pass_one_at_a_time() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.reply_after_one_line(b"CAPA", b"-ERR no CAPA here\r\n")
        await peer.reply_after_one_line(b"USER " + USER.encode(), b"+OK\r\n")
        await peer.reply_after_one_line(b"PASS " + PASSWORD.encode(), b"+OK\r\n")
        await peer.reply_after_one_line(b"UIDL", multiline([b"1 x"]))
        await peer.reply_after_one_line(b"LIST", multiline([b"1 3"]))
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        drop = await login(upstream)
        assert drop.messages == [MessageInfo("x", 3)]
        await drop.aclose()


async def test_sasl_challenge_without_pipelining_is_answered_with_the_response() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.reply_after_one_line(b"CAPA", multiline(CAPA_SASL))
        await peer.reply_after_one_line(b"AUTH PLAIN " + PLAIN_B64, b"+ \r\n")
        await peer.reply_after_one_line(PLAIN_B64, b"+OK\r\n")
        await peer.reply_after_one_line(b"UIDL", multiline([]))
        await peer.reply_after_one_line(b"LIST", multiline([]))
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        drop = await login(upstream)
        await drop.aclose()


async def test_sasl_challenge_when_pipelined_is_a_protocol_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.expect(b"CAPA")
        await peer.send(multiline((*CAPA_SASL, b"PIPELINING")))
        await peer.expect(b"AUTH PLAIN " + PLAIN_B64, b"UIDL", b"LIST")
        await peer.send(b"+ \r\n")
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    assert_upstream_error(info.value, UpstreamFailure.PROTOCOL, ResponseCode.SYS_TEMP)


# -- listing --------------------------------------------------------------------------------


async def test_listing_maps_uids_and_sizes_and_renumbers() -> None:
    # Upstream numbers with gaps, listed out of order: the view is 1..n in upstream order.
    uidl = [b"9 uid-nine", b"2 uid-two", b"5 uid-five"]
    sizes = [b"5 500", b"9 900", b"2 200"]
    body = b"Subject: five\r\n\r\nbody\r\n"
    replies = {
        b"UIDL": multiline(uidl),
        b"LIST": multiline(sizes),
        b"RETR 5": b"+OK\r\n" + body + b".\r\n",
        b"TOP 9 0": b"+OK\r\nSubject: nine\r\n\r\n.\r\n",
    }
    async with scripted_upstream(Mailbox(replies=replies)) as upstream:
        drop = await login(upstream)
        assert drop.messages == [
            MessageInfo("uid-two", 200),
            MessageInfo("uid-five", 500),
            MessageInfo("uid-nine", 900),
        ]
        assert await collect(drop, 1) == body
        assert await collect(drop, 2, body_lines=0) == b"Subject: nine\r\n\r\n"
        await drop.commit({0, 2})
    assert after_login(upstream.lines) == [b"RETR 5", b"TOP 9 0", b"DELE 2", b"DELE 9", b"QUIT"]


async def test_empty_maildrop() -> None:
    async with scripted_upstream(Mailbox()) as upstream:
        drop = await login(upstream)
        assert drop.messages == []
        assert drop.dot_stuffed is True
        assert drop.keepalive_interval_seconds == 120
        assert drop.bytes_received > 0
        await drop.commit(set())
    assert after_login(upstream.lines) == [b"QUIT"]


MALFORMED_LISTINGS: dict[str, tuple[list[bytes], list[bytes]]] = {
    "uidl-has-more": ([b"1 a", b"2 b"], [b"1 10"]),
    "list-has-more": ([b"1 a"], [b"1 10", b"2 20"]),
    "different-numbers": ([b"1 a", b"2 b"], [b"1 10", b"3 30"]),
    "duplicate-uid": ([b"1 a", b"2 a"], [b"1 10", b"2 20"]),
    "duplicate-number": ([b"1 a", b"1 b"], [b"1 10", b"1 10"]),
    "uid-with-space": ([b"1 a b"], [b"1 10"]),
    "uid-too-long": ([b"1 " + b"u" * 71], [b"1 10"]),
    "uid-control-octet": ([b"1 a\x01b"], [b"1 10"]),
    "uid-8bit": ([b"1 caf\xc3\xa9"], [b"1 10"]),
    "uid-missing": ([b"1"], [b"1 10"]),
    "size-not-a-number": ([b"1 a"], [b"1 ten"]),
    "size-negative": ([b"1 a"], [b"1 -5"]),
    "size-missing": ([b"1 a"], [b"1"]),
    "number-zero": ([b"0 a"], [b"0 10"]),
    "number-negative": ([b"-1 a"], [b"-1 10"]),
    "number-not-digits": ([b"one a"], [b"one 10"]),
    "extra-word": ([b"1 a"], [b"1 10 octets"]),
    "line-too-long": ([b"1 a" + b" " * 600], [b"1 10"]),
}


@pytest.mark.parametrize(("uidl", "sizes"), MALFORMED_LISTINGS.values(), ids=MALFORMED_LISTINGS)
@pytest.mark.parametrize("capa", [CAPA_PLAIN, CAPA_PIPELINING], ids=["serial", "pipelined"])
async def test_malformed_listing_is_a_protocol_error(
    uidl: list[bytes], sizes: list[bytes], capa: Sequence[bytes]
) -> None:
    mailbox = Mailbox(capa=capa, replies={b"UIDL": multiline(uidl), b"LIST": multiline(sizes)})
    async with scripted_upstream(mailbox) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    assert_upstream_error(info.value, UpstreamFailure.PROTOCOL, ResponseCode.SYS_TEMP)
    assert b"QUIT" not in upstream.lines


async def test_the_uid_length_limit_is_70_octets() -> None:
    uid = b"u" * 70
    mailbox = Mailbox(replies={b"UIDL": multiline([b"1 " + uid]), b"LIST": multiline([b"1 4"])})
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        assert drop.messages == [MessageInfo(uid.decode(), 4)]
        await drop.aclose()


async def test_too_many_listing_lines_is_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(login_module, "MAX_UPSTREAM_MESSAGES", 5)
    many = {n: (b"u%d" % n, b"x\r\n") for n in range(1, 7)}
    async with scripted_upstream(Mailbox(many)) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    assert_upstream_error(info.value, UpstreamFailure.PROTOCOL, ResponseCode.SYS_TEMP)


async def test_a_listing_at_the_line_limit_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(login_module, "MAX_UPSTREAM_MESSAGES", 5)
    five = {n: (b"u%d" % n, b"x\r\n") for n in range(1, 6)}
    async with scripted_upstream(Mailbox(five)) as upstream:
        drop = await login(upstream)
        assert len(drop.messages) == 5
        await drop.aclose()


async def test_too_many_capability_lines_is_a_protocol_error() -> None:
    capa = [b"X-CAP-%d" % i for i in range(MAX_CAPABILITY_LINES + 1)]
    async with scripted_upstream(Mailbox(capa=capa)) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    assert_upstream_error(info.value, UpstreamFailure.PROTOCOL, ResponseCode.SYS_TEMP)
    assert_no_credentials(upstream)


async def test_an_overlong_listing_line_is_refused_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A complete overlong line fails when it arrives, not when (if ever) the listing ends:
    the listing is held in memory, so its lines must be bounded as they come."""

    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.expect(b"CAPA")
        await peer.send(multiline(CAPA_PIPELINING))
        await peer.expect(b"USER " + USER.encode(), b"PASS " + PASSWORD.encode(), b"UIDL", b"LIST")
        await peer.send(b"+OK\r\n+OK\r\n+OK\r\n1 " + b"u" * 4000 + b"\r\n2 b\r\n")
        await peer.until_eof()  # no terminator: only the line length can end this

    async with scripted_upstream(script) as upstream:
        start = trio.current_time()
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
        assert trio.current_time() - start < LOGIN_TIMEOUT
    assert_upstream_error(info.value, UpstreamFailure.PROTOCOL, ResponseCode.SYS_TEMP)


@pytest.mark.parametrize("capa", [CAPA_PLAIN, CAPA_PIPELINING], ids=["serial", "pipelined"])
@pytest.mark.parametrize("refused", [b"UIDL", b"LIST"])
async def test_uidl_or_list_err_is_unsupported_sys_perm(
    capa: Sequence[bytes], refused: bytes
) -> None:
    mailbox = Mailbox(dict(MESSAGES), capa=capa, replies={refused: b"-ERR not supported\r\n"})
    async with scripted_upstream(mailbox) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    assert_upstream_error(info.value, UpstreamFailure.UNSUPPORTED, ResponseCode.SYS_PERM)
    assert b"QUIT" not in upstream.lines


# -- STLS and implicit TLS ------------------------------------------------------------------


async def test_starttls_not_offered_sends_no_credential(ca_file: Path) -> None:
    async with scripted_upstream(Mailbox(capa=CAPA_SASL)) as upstream:
        with pytest.raises(UpstreamError) as info:
            await starttls_login(upstream, ca_file)
    assert_upstream_error(info.value, UpstreamFailure.STLS_UNAVAILABLE, ResponseCode.SYS_TEMP)
    assert upstream.lines == [b"CAPA"]
    assert_no_credentials(upstream)


async def test_starttls_refused_sends_no_credential(ca_file: Path) -> None:
    mailbox = Mailbox(capa=(*CAPA_SASL, b"STLS"), replies={b"STLS": b"-ERR not now\r\n"})
    async with scripted_upstream(mailbox) as upstream:
        with pytest.raises(UpstreamError) as info:
            await starttls_login(upstream, ca_file)
    assert_upstream_error(info.value, UpstreamFailure.STLS_UNAVAILABLE, ResponseCode.SYS_TEMP)
    assert upstream.lines == [b"CAPA", b"STLS"]
    assert_no_credentials(upstream)


async def test_octets_after_the_stls_reply_abort_before_the_handshake(ca_file: Path) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.expect(b"CAPA")
        await peer.send(multiline((*CAPA_PIPELINING, b"STLS")))
        await peer.expect(b"STLS")
        await peer.send(b"+OK Begin TLS\r\n+OK injected\r\n")
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        with pytest.raises(UpstreamError) as info:
            await starttls_login(upstream, ca_file)
    assert_upstream_error(info.value, UpstreamFailure.PROTOCOL, ResponseCode.SYS_TEMP)
    assert upstream.lines == [b"CAPA", b"STLS"]
    assert upstream.peer.raw() == b"CAPA\r\nSTLS\r\n"  # not even a ClientHello followed
    assert_no_credentials(upstream)


async def test_starttls_reissues_capa_and_logs_in_over_tls(
    ca_file: Path, good_server_tls: ssl.SSLContext
) -> None:
    # In the clear: PIPELINING and no SASL. After TLS: SASL PLAIN and no PIPELINING. The
    # client must use what it was told over TLS only (RFC 2595 §4).
    mailbox = Mailbox(
        dict(MESSAGES),
        capa=(b"UIDL", b"PIPELINING", b"STLS"),
        capa_after_tls=(b"UIDL", b"SASL PLAIN"),
        stls=good_server_tls,
    )

    async def script(peer: Peer) -> None:
        await mailbox(peer)
        # The commands after CAPA came one per write: PIPELINING from the clear was forgotten.
        secure_reads = [data for data, secure in peer.reads if secure]
        auth = b"AUTH PLAIN " + PLAIN_B64 + b"\r\n"
        assert secure_reads[:4] == [b"CAPA\r\n", auth, b"UIDL\r\n", b"LIST\r\n"]

    async with scripted_upstream(script) as upstream:
        drop = await starttls_login(upstream, ca_file)
        assert drop.messages == listing_of(MESSAGES)
        assert await collect(drop, 1) == stuff(MESSAGES[2][1])
        await drop.commit({0})
    peer = upstream.peer
    assert [(r.line.split(b" ")[0], r.secure) for r in peer.received] == [
        (b"CAPA", False),
        (b"STLS", False),
        (b"CAPA", True),
        (b"AUTH", True),
        (b"UIDL", True),
        (b"LIST", True),
        (b"RETR", True),
        (b"DELE", True),
        (b"QUIT", True),
    ]
    cleartext = b"".join(data for data, secure in peer.reads if not secure)
    assert cleartext == b"CAPA\r\nSTLS\r\n"


@pytest.mark.parametrize("mode", [TlsMode.STARTTLS, TlsMode.IMPLICIT])
@pytest.mark.parametrize("fault", ["wrong-host", "untrusted-ca"])
async def test_bad_certificate_is_a_tls_failure_and_no_credential_is_sent(
    ca: trustme.CA, ca_file: Path, mode: TlsMode, fault: str
) -> None:
    if fault == "wrong-host":
        bad = server_tls(ca, "pop.example.net")
    else:
        bad = server_tls(trustme.CA(), "127.0.0.1", "localhost")
    if mode is TlsMode.STARTTLS:
        server = scripted_upstream(Mailbox(capa=(*CAPA_SASL, b"STLS"), stls=bad))
    else:
        server = scripted_upstream(Mailbox(capa=CAPA_SASL), implicit_tls=bad)
    async with server as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream, tls=mode, tls_context=verifying_context(ca_file, mode))
    assert_upstream_error(info.value, UpstreamFailure.TLS, ResponseCode.SYS_TEMP)
    assert upstream.peer.tls_failed
    assert_no_credentials(upstream)


@pytest.mark.parametrize("mode", [TlsMode.STARTTLS, TlsMode.IMPLICIT])
async def test_verify_false_accepts_an_untrusted_certificate(mode: TlsMode) -> None:
    untrusted = server_tls(trustme.CA(), "pop.example.net")
    context = client_context(account(1, tls=mode, verify=False).upstream)
    if mode is TlsMode.STARTTLS:
        server = scripted_upstream(
            Mailbox(dict(MESSAGES), capa=(*CAPA_PIPELINING, b"STLS"), stls=untrusted)
        )
    else:
        server = scripted_upstream(Mailbox(dict(MESSAGES)), implicit_tls=untrusted)
    async with server as upstream:
        drop = await login(upstream, tls=mode, verify=False, tls_context=context)
        assert drop.messages == listing_of(MESSAGES)
        await drop.aclose()
    assert all(r.secure for r in upstream.peer.received if r.line.startswith(CREDENTIAL_VERBS))


async def test_implicit_tls_login(ca_file: Path, good_server_tls: ssl.SSLContext) -> None:
    mailbox = Mailbox(dict(MESSAGES), capa=CAPA_SASL)
    async with scripted_upstream(mailbox, implicit_tls=good_server_tls) as upstream:
        drop = await login(
            upstream, tls=TlsMode.IMPLICIT, tls_context=verifying_context(ca_file, TlsMode.IMPLICIT)
        )
        assert drop.messages == listing_of(MESSAGES)
        assert await collect(drop, 2) == stuff(MESSAGES[3][1])
        await drop.commit(set())
    peer = upstream.peer
    assert peer.lines == [b"CAPA", b"AUTH PLAIN " + PLAIN_B64, b"UIDL", b"LIST", b"RETR 3", b"QUIT"]
    assert all(r.secure for r in peer.received)


# -- error mapping (RFC 3206) ---------------------------------------------------------------


# Upstream hosts as configured, and the loopback address each reaches: an IPv4 and an IPv6
# literal (one socket, one connect) and a host name (resolved, raced: open_tcp_stream).
CONNECT_HOSTS = {"127.0.0.1": "127.0.0.1", "::1": "::1", "localhost": "127.0.0.1"}


def bound_socket(host: str) -> socket.socket:
    """A TCP socket bound to a free port of ``host``'s loopback address."""
    address = CONNECT_HOSTS[host]
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.bind((address, 0))
    return sock


@pytest.mark.parametrize("host", CONNECT_HOSTS)
async def test_connection_refused_is_sys_temp_connect(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A bound port that does not listen refuses connections, and nobody else can take it.
    with bound_socket(host) as closed:
        port = closed.getsockname()[1]
        with pytest.raises(UpstreamError) as info:
            await open_upstream(account(port, host=host), tls_context=None)
    assert_upstream_error(info.value, UpstreamFailure.CONNECT, ResponseCode.SYS_TEMP)
    assert info.value.detail == f"cannot connect to {host}:{port}: Connection refused"
    logged = [r for r in caplog.records if r.getMessage() == "upstream_connect_failed"]
    fields = {"upstream": "provider", "reason": "Connection refused"}
    assert [getattr(r, "fields", None) for r in logged] == [fields]


@pytest.mark.parametrize("host", CONNECT_HOSTS)
async def test_connect_timeout_is_sys_temp_timeout(
    host: str, autojump_clock: trio.testing.MockClock
) -> None:
    # A listener whose accept queue is full drops new SYNs (Linux): the connect hangs.
    with contextlib.ExitStack() as stack:
        full = stack.enter_context(bound_socket(host))
        full.listen(0)
        port = full.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket(full.family))
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((CONNECT_HOSTS[host], port))
        start = trio.current_time()
        with pytest.raises(UpstreamError) as info:
            await open_upstream(account(port, connect_timeout=3.0, host=host), tls_context=None)
        assert trio.current_time() - start == pytest.approx(3.0)
    assert_upstream_error(info.value, UpstreamFailure.TIMEOUT, ResponseCode.SYS_TEMP)
    assert info.value.detail == f"no TCP connection to {host}:{port} within 3 s"


@pytest.mark.parametrize("host", CONNECT_HOSTS)
async def test_every_kind_of_host_connects_with_nodelay(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An IP literal gets its own socket, a host name goes through trio's resolution; the
    session is the same, and both streams send small writes at once (TCP_NODELAY)."""
    resolved: list[str] = []
    open_tcp_stream = trio.open_tcp_stream

    async def counted(host: str, port: int) -> trio.SocketStream:
        resolved.append(host)
        return await open_tcp_stream(host, port)

    monkeypatch.setattr(trio, "open_tcp_stream", counted)
    mailbox = Mailbox(MESSAGES)
    async with scripted_upstream(mailbox, host=CONNECT_HOSTS[host]) as upstream:
        drop = await open_upstream(account(upstream.port, host=host), tls_context=None)
        assert drop.messages == listing_of(MESSAGES)
        stream = drop._connection._stream
        # The connection took the socket over (popproxy/socket_stream.py), options and all.
        assert isinstance(stream, TcpStream)
        assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await drop.commit(set())
    assert upstream.peer.lines[-1] == b"QUIT"
    assert resolved == ([] if host != "localhost" else ["localhost"])


async def test_an_upstream_that_never_greets_is_a_login_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scripted_upstream(Peer.until_eof) as upstream:
        start = trio.current_time()
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
        assert trio.current_time() - start == pytest.approx(LOGIN_TIMEOUT)
    assert_upstream_error(info.value, UpstreamFailure.TIMEOUT, ResponseCode.SYS_TEMP)
    assert upstream.peer.eof  # the connection was closed
    assert upstream.lines == []


async def test_the_login_timeout_bounds_the_whole_login(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each reply comes within the timeout, but all of them together do not."""

    async def script(peer: Peer) -> None:
        step = LOGIN_TIMEOUT * 0.3
        await trio.sleep(step)
        await peer.send(b"+OK ready\r\n")
        await peer.expect(b"CAPA")
        await trio.sleep(step)
        await peer.send(multiline(CAPA_PLAIN))
        await peer.expect(b"USER " + USER.encode())
        await trio.sleep(step)
        await peer.send(b"+OK\r\n")
        await peer.expect(b"PASS " + PASSWORD.encode())
        await trio.sleep(step)
        await peer.send(b"+OK\r\n")
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    assert_upstream_error(info.value, UpstreamFailure.TIMEOUT, ResponseCode.SYS_TEMP)


LOGIN_REFUSALS = {
    "auth": (b"-ERR [AUTH] Invalid credentials\r\n", UpstreamFailure.AUTH_REJECTED, "SYS/PERM"),
    "plain-err": (b"-ERR nope\r\n", UpstreamFailure.AUTH_REJECTED, "SYS/PERM"),
    "sys-perm": (b"-ERR [SYS/PERM] disabled\r\n", UpstreamFailure.AUTH_REJECTED, "SYS/PERM"),
    "unknown-code": (b"-ERR [X-WHAT] hmm\r\n", UpstreamFailure.AUTH_REJECTED, "SYS/PERM"),
    "in-use": (b"-ERR [IN-USE] locked\r\n", UpstreamFailure.IN_USE, "IN-USE"),
    "login-delay": (b"-ERR [LOGIN-DELAY] wait\r\n", UpstreamFailure.LOGIN_DELAY, "LOGIN-DELAY"),
    "sys-temp": (b"-ERR [SYS/TEMP] backend down\r\n", UpstreamFailure.REJECTED, "SYS/TEMP"),
}


@pytest.mark.parametrize(("reply", "failure", "code"), LOGIN_REFUSALS.values(), ids=LOGIN_REFUSALS)
@pytest.mark.parametrize("method", ["user", "plain"])
@pytest.mark.parametrize("capa", [CAPA_PLAIN, CAPA_PIPELINING], ids=["serial", "pipelined"])
async def test_login_refusal_mapping(
    reply: bytes, failure: UpstreamFailure, code: str, method: str, capa: Sequence[bytes]
) -> None:
    command = b"PASS " + PASSWORD.encode() if method == "user" else b"AUTH PLAIN " + PLAIN_B64
    mailbox = Mailbox(dict(MESSAGES), capa=capa, replies={command: reply})
    login_method = UpstreamLogin.USER if method == "user" else UpstreamLogin.PLAIN
    async with scripted_upstream(mailbox) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream, method=login_method)
    assert_upstream_error(info.value, failure, ResponseCode(code))
    assert info.value.text  # the client's -ERR text
    assert b"QUIT" not in upstream.lines


@pytest.mark.parametrize(
    ("reply", "failure", "code"),
    [LOGIN_REFUSALS["in-use"], LOGIN_REFUSALS["auth"], LOGIN_REFUSALS["login-delay"]],
    ids=["in-use", "auth", "login-delay"],
)
async def test_pipelined_refusal_then_close_keeps_its_code(
    reply: bytes, failure: UpstreamFailure, code: str
) -> None:
    """A server may close the connection after a refused login: the replies to the
    pipelined UIDL and LIST never come, and the refusal must still be what counts."""

    async def script(peer: Peer) -> None:
        await peer.send(b"+OK ready\r\n")
        await peer.expect(b"CAPA")
        await peer.send(multiline(CAPA_PIPELINING))
        await peer.expect(b"USER " + USER.encode(), b"PASS " + PASSWORD.encode(), b"UIDL", b"LIST")
        await peer.send(b"+OK\r\n" + reply)
        # the script returns: the connection is closed

    async with scripted_upstream(script) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    assert_upstream_error(info.value, failure, ResponseCode(code))


async def test_user_refused_without_pipelining_sends_no_password() -> None:
    mailbox = Mailbox(capa=CAPA_PLAIN, replies={b"USER " + USER.encode(): b"-ERR who?\r\n"})
    async with scripted_upstream(mailbox) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    assert_upstream_error(info.value, UpstreamFailure.AUTH_REJECTED, ResponseCode.SYS_PERM)
    assert upstream.lines == [b"CAPA", b"USER " + USER.encode()]
    assert PASSWORD.encode() not in upstream.peer.raw()


GREETING_REFUSALS = {
    "no-code": (b"-ERR go away\r\n", UpstreamFailure.REJECTED, "SYS/TEMP"),
    "sys-temp": (b"-ERR [SYS/TEMP] overloaded\r\n", UpstreamFailure.REJECTED, "SYS/TEMP"),
    "in-use": (b"-ERR [IN-USE] busy\r\n", UpstreamFailure.IN_USE, "IN-USE"),
    "login-delay": (b"-ERR [LOGIN-DELAY] later\r\n", UpstreamFailure.LOGIN_DELAY, "LOGIN-DELAY"),
    # No credential was sent yet: only "unavailable", never "credentials rejected".
    "sys-perm": (b"-ERR [SYS/PERM] closed\r\n", UpstreamFailure.REJECTED, "SYS/TEMP"),
}


@pytest.mark.parametrize(
    ("greeting", "failure", "code"), GREETING_REFUSALS.values(), ids=GREETING_REFUSALS
)
async def test_greeting_err_is_mapped(greeting: bytes, failure: UpstreamFailure, code: str) -> None:
    async with scripted_upstream(Mailbox(greeting=greeting)) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    assert_upstream_error(info.value, failure, ResponseCode(code))
    assert upstream.lines == []


@pytest.mark.parametrize(
    "greeting",
    [b"+OK " + b"x" * 600 + b"\r\n", b"* OK IMAP4 ready\r\n", b"+OK ready\r\n+OK unasked\r\n"],
    ids=["overlong", "not-pop3", "unsolicited"],
)
async def test_bad_greeting_is_a_protocol_error(greeting: bytes) -> None:
    async with scripted_upstream(Mailbox(greeting=greeting)) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    assert_upstream_error(info.value, UpstreamFailure.PROTOCOL, ResponseCode.SYS_TEMP)
    assert_no_credentials(upstream)


async def test_max_reply_line_bytes_admits_a_long_greeting_and_still_bounds_it() -> None:
    """An upstream that breaks RFC 2449 §4 with a long greeting can be allowed for."""
    long_greeting = b"+OK " + b"x" * 1500 + b"\r\n"
    config = dataclasses.replace(account(0).upstream, max_reply_line_bytes=2048)
    async with scripted_upstream(Mailbox(greeting=long_greeting)) as upstream:
        acct = account(upstream.port)
        wide = UpstreamAccount(
            dataclasses.replace(config, port=upstream.port), acct.user, acct.credential
        )
        drop = await open_upstream(wide, tls_context=None)
        await drop.aclose()
    async with scripted_upstream(Mailbox(greeting=b"+OK " + b"x" * 2100 + b"\r\n")) as upstream:
        acct = account(upstream.port)
        wide = UpstreamAccount(
            dataclasses.replace(config, port=upstream.port), acct.user, acct.credential
        )
        with pytest.raises(UpstreamError) as info:
            await open_upstream(wide, tls_context=None)
    assert_upstream_error(info.value, UpstreamFailure.PROTOCOL, ResponseCode.SYS_TEMP)
    assert_no_credentials(upstream)


async def test_own_greeting_token_is_a_loop_and_nothing_is_sent() -> None:
    token = "<popproxy-7f3a9c@proxy>"
    mailbox = Mailbox(greeting=b"+OK popproxy ready " + token.encode() + b"\r\n")
    async with scripted_upstream(mailbox) as upstream:
        with pytest.raises(UpstreamError) as info:
            await open_upstream(account(upstream.port), tls_context=None, own_greeting_token=token)
    assert_upstream_error(info.value, UpstreamFailure.LOOP, ResponseCode.SYS_PERM)
    assert upstream.peer.raw() == b""


async def test_other_greeting_tokens_are_not_a_loop() -> None:
    mailbox = Mailbox(greeting=b"+OK ready <1896.697170952@dbc.mtview.ca.us>\r\n")
    async with scripted_upstream(mailbox) as upstream:
        drop = await open_upstream(
            account(upstream.port), tls_context=None, own_greeting_token="<popproxy-7f3a9c@proxy>"
        )
        await drop.aclose()


# -- retrieve -------------------------------------------------------------------------------

STUFFED_BODY = (
    b"Subject: dots\r\n"
    b"\r\n"
    b"..\r\n"  # a line that is a single dot, stuffed
    b"...two dots\r\n"
    b"..leading dot\r\n"
    b"a . in the middle\r\n"
    b"last line\r\n"
)


async def one_message_script(
    peer: Peer, reply: Callable[[Peer], Awaitable[None]], *, listed: int = 1
) -> None:
    """Log in (pipelined, one message of upstream number ``listed``), then run ``reply``."""
    await peer.send(b"+OK ready\r\n")
    await peer.expect(b"CAPA")
    await peer.send(multiline(CAPA_PIPELINING))
    await peer.expect(b"USER " + USER.encode(), b"PASS " + PASSWORD.encode(), b"UIDL", b"LIST")
    size = len(STUFFED_BODY) - STUFFED_BODY.count(b"\n..")
    await peer.send(
        b"+OK\r\n+OK\r\n" + multiline([b"%d uid" % listed]) + multiline([b"%d %d" % (listed, size)])
    )
    await reply(peer)
    await peer.until_eof()


@pytest.mark.parametrize("split", ["whole", "byte-by-byte", "terminator-split"])
async def test_retr_relays_the_body_still_dot_stuffed(split: str) -> None:
    wire = b"+OK message follows\r\n" + STUFFED_BODY + b".\r\n"

    async def reply(peer: Peer) -> None:
        await peer.expect(b"RETR 1")
        if split == "whole":
            await peer.send(wire)
        elif split == "byte-by-byte":
            for i in range(len(wire)):
                await peer.send(wire[i : i + 1])
                await trio.testing.wait_all_tasks_blocked()
        else:
            await peer.send(wire[:-2])  # "...\r\n." : the client cannot decide yet
            await trio.testing.wait_all_tasks_blocked()
            await peer.send(wire[-2:])

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        drop = await login(upstream)
        chunks = [c async for c in drop.retrieve(0)]
        assert b"".join(chunks) == STUFFED_BODY
        assert all(chunks)
        await drop.aclose()


async def test_top_asks_for_n_lines_of_the_upstream_number() -> None:
    message = b"Subject: top\r\n\r\n.one\r\ntwo\r\nthree\r\n"
    mailbox = Mailbox({4: (b"uid4", message)})
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        assert await collect(drop, 0, body_lines=2) == b"Subject: top\r\n\r\n..one\r\ntwo\r\n"
        assert await collect(drop, 0, body_lines=0) == b"Subject: top\r\n\r\n"
        await drop.aclose()
    assert after_login(upstream.lines) == [b"TOP 4 2", b"TOP 4 0"]


async def test_retr_err_raises_before_any_chunk_and_the_connection_stays_usable() -> None:
    mailbox = Mailbox(dict(MESSAGES), replies={b"RETR 2": b"-ERR [SYS/TEMP] gone\r\n"})
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        chunks: list[bytes] = []
        with pytest.raises(MaildropError) as info:
            async with contextlib.aclosing(drop.retrieve(1)) as stream:
                async for chunk in stream:
                    chunks.append(chunk)
        assert chunks == []
        assert not isinstance(info.value, UpstreamError)
        assert info.value.code is ResponseCode.SYS_TEMP  # RFC 3206 codes that still apply pass
        assert await collect(drop, 2) == stuff(MESSAGES[3][1])
        await drop.keep_alive()
        await drop.commit({0})
    assert after_login(upstream.lines) == [b"RETR 2", b"RETR 3", b"NOOP", b"DELE 1", b"QUIT"]


async def test_a_retrieval_closed_before_its_first_chunk_sends_nothing_and_breaks_nothing() -> None:
    mailbox = Mailbox(dict(MESSAGES))
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        unstarted = drop.retrieve(0)
        await unstarted.aclose()
        assert await anext(unstarted, None) is None  # closed: no chunk, no command
        assert await collect(drop, 1) == stuff(MESSAGES[2][1])
        await drop.keep_alive()
        await drop.aclose()
    assert after_login(upstream.lines) == [b"RETR 2", b"NOOP"]


async def test_a_retrieval_read_to_its_end_stays_ended_and_frees_the_connection() -> None:
    mailbox = Mailbox(dict(MESSAGES))
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        chunks = drop.retrieve(0)
        assert b"".join([chunk async for chunk in chunks]) == stuff(MESSAGES[1][1])
        assert await anext(chunks, None) is None
        await chunks.aclose()  # after the end: nothing left half read
        assert await collect(drop, 0) == stuff(MESSAGES[1][1])
        await drop.aclose()
    assert after_login(upstream.lines) == [b"RETR 1", b"RETR 1"]


@pytest.mark.parametrize("operation", ["retrieve", "keep_alive", "commit"])
async def test_a_line_sent_unasked_while_idle_is_not_taken_for_the_next_reply(
    operation: str,
) -> None:
    """RFC 1939 §3: a server only answers. A line the upstream sends on its own while the
    session is idle is found before the next command goes out, so it can never be read
    as that command's reply (and relayed as the start of a message)."""
    mailbox = Mailbox(dict(MESSAGES))
    logged_in, unasked_sent = trio.Event(), trio.Event()

    async def script(peer: Peer) -> None:
        await peer.send(mailbox.greeting)
        while (line := await peer.line()) is not None:
            await peer.send(mailbox.answer(peer, line)[0])
            if line == b"LIST":
                break
        await logged_in.wait()
        await peer.send(b"+OK unasked\r\n")
        unasked_sent.set()
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        drop = await login(upstream)
        logged_in.set()
        await unasked_sent.wait()
        match operation:
            case "retrieve":
                with pytest.raises(UpstreamError) as info:
                    await collect(drop, 0)
                assert info.value.failure is UpstreamFailure.PROTOCOL
            case "keep_alive":
                await drop.keep_alive()  # fails quietly: the maildrop is broken
                with pytest.raises(UpstreamError) as info:
                    await collect(drop, 0)
                assert info.value.failure is UpstreamFailure.CLOSED
            case _:
                with pytest.raises(UpstreamError) as info:
                    await drop.commit({0})
                assert info.value.failure is UpstreamFailure.PROTOCOL
        await drop.aclose()
    assert after_login(upstream.lines) == []  # no RETR, NOOP, DELE or QUIT went out


RETRIEVE_FAULTS = {
    "unsolicited-after-terminator": b"+OK\r\nbody\r\n.\r\n+OK unsolicited\r\n",
    "overlong-status": b"+OK " + b"x" * 600 + b"\r\nbody\r\n.\r\n",
    "eof-in-body": b"+OK\r\nbody\r\nmore bo",
    "eof-before-status": b"",
    "malformed-status": b"OK\r\nbody\r\n.\r\n",
    "sasl-challenge": b"+ \r\n",
}


@pytest.mark.parametrize("wire", RETRIEVE_FAULTS.values(), ids=RETRIEVE_FAULTS)
async def test_retrieve_fault_breaks_the_maildrop(wire: bytes) -> None:
    async def reply(peer: Peer) -> None:
        await peer.expect(b"RETR 1")
        await peer.send(wire)
        if wire.endswith(b"\r\n"):
            return  # until_eof: the client closes
        # a close in the middle of the reply
        assert isinstance(peer.stream, trio.SocketStream)
        await peer.stream.send_eof()

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        drop = await login(upstream)
        chunks: list[bytes] = []
        with pytest.raises(UpstreamError) as info:
            async with contextlib.aclosing(drop.retrieve(0)) as stream:
                async for chunk in stream:
                    chunks.append(chunk)
        assert_upstream_error(info.value, UpstreamFailure.PROTOCOL, ResponseCode.SYS_TEMP)
        # What was passed on is a prefix of the body, never with a terminator after it.
        assert wire.partition(b"\r\n")[2].startswith(b"".join(chunks))
        # Refused from now on, without another word upstream.
        with pytest.raises(UpstreamError) as again:
            await collect(drop, 0)
        assert_upstream_error(again.value, UpstreamFailure.CLOSED, ResponseCode.SYS_TEMP)
        await drop.keep_alive()
        with pytest.raises(UpstreamError):
            await drop.commit(set())
        await drop.aclose()
    assert after_login(upstream.lines) == [b"RETR 1"]


async def test_a_stall_inside_a_body_is_a_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def reply(peer: Peer) -> None:
        await peer.expect(b"RETR 1")
        await peer.send(b"+OK\r\nfirst part\r\n")
        await trio.sleep(COMMAND_TIMEOUT * 0.9)  # each read within the timeout ...
        await peer.send(b"second part\r\n")
        await trio.sleep(COMMAND_TIMEOUT * 1.2)  # ... until one is not

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        drop = await login(upstream)
        chunks: list[bytes] = []
        with pytest.raises(UpstreamError) as info:
            async with contextlib.aclosing(drop.retrieve(0)) as stream:
                async for chunk in stream:
                    chunks.append(chunk)
        assert_upstream_error(info.value, UpstreamFailure.TIMEOUT, ResponseCode.SYS_TEMP)
        assert b"".join(chunks) == b"first part\r\nsecond part\r\n"
        with pytest.raises(UpstreamError) as again:
            await collect(drop, 0)
        assert again.value.code is ResponseCode.SYS_TEMP
        await drop.aclose()


async def retrieval_times_out(upstream: Upstream) -> None:
    """Log in and RETR message 1: it fails as a [SYS/TEMP] timeout COMMAND_TIMEOUT later."""
    drop = await login(upstream)
    start = trio.current_time()
    with pytest.raises(UpstreamError) as info:
        await collect(drop, 0)
    assert trio.current_time() - start == pytest.approx(COMMAND_TIMEOUT)
    assert_upstream_error(info.value, UpstreamFailure.TIMEOUT, ResponseCode.SYS_TEMP)
    await drop.aclose()


async def test_no_status_reply_is_a_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def reply(peer: Peer) -> None:
        await peer.expect(b"RETR 1")

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        await retrieval_times_out(upstream)


async def test_a_status_line_in_pieces_is_timed_as_a_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def reply(peer: Peer) -> None:
        await peer.expect(b"RETR 1")
        await peer.send(b"+O")
        await trio.sleep(COMMAND_TIMEOUT * 0.6)  # each piece within the timeout ...
        await peer.send(b"K 5 octets")
        await trio.sleep(COMMAND_TIMEOUT * 0.6)  # ... the whole line not
        await peer.send(b"\r\nhello\r\n.\r\n")

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        await retrieval_times_out(upstream)


async def test_closing_the_stream_early_breaks_the_maildrop() -> None:
    body = b"".join(b"line %d\r\n" % i for i in range(50_000))  # several reads

    async def reply(peer: Peer) -> None:
        await peer.expect(b"RETR 1")
        await peer.send(b"+OK\r\n" + body + b".\r\n")
        assert peer.send_failed  # the client closed with most of it unread

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        drop = await login(upstream)
        async with contextlib.aclosing(drop.retrieve(0)) as stream:
            async for chunk in stream:
                assert body.startswith(chunk)
                break
        with pytest.raises(UpstreamError) as info:
            await collect(drop, 0)
        assert_upstream_error(info.value, UpstreamFailure.CLOSED, ResponseCode.SYS_TEMP)
        await drop.keep_alive()  # nothing: the rest of the body is still in flight
        with pytest.raises(UpstreamError):
            await drop.commit(set())
        await drop.aclose()
    assert after_login(upstream.lines) == [b"RETR 1"]


async def test_a_large_body_streams_in_bounded_chunks() -> None:
    line = b"0123456789" * 7 + b"\r\n"  # 72 octets
    body = line * (5 * 1024 * 1024 // len(line))  # about 5 MB
    mailbox = Mailbox({1: (b"big", body)})
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        assert drop.messages == [MessageInfo("big", len(body))]
        before = drop.bytes_received
        sizes: list[int] = []
        yielded = 0
        total = bytearray()
        async with contextlib.aclosing(drop.retrieve(0)) as stream:
            async for chunk in stream:
                sizes.append(len(chunk))
                yielded += len(chunk)
                total += chunk
                # Read ahead of what was passed on: less than one read.
                ahead = drop.bytes_received - before - yielded
                assert ahead <= UPSTREAM_RECEIVE_BYTES, ahead
        assert total == body
        assert max(sizes) <= UPSTREAM_RECEIVE_BYTES
        assert len(sizes) >= len(body) // UPSTREAM_RECEIVE_BYTES
        await drop.commit(set())


async def test_one_retrieve_at_a_time_and_no_keep_alive_in_between() -> None:
    body = b"".join(b"line %d\r\n" % i for i in range(50_000))
    mailbox = Mailbox({1: (b"u", body)})
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        got = bytearray()
        async with contextlib.aclosing(drop.retrieve(0)) as stream:
            async for chunk in stream:
                if not got:
                    with pytest.raises(RuntimeError):
                        await collect(drop, 0)
                    await drop.keep_alive()  # busy: does nothing
                got += chunk
        assert got == body
        await drop.keep_alive()
        await drop.commit(set())
    assert after_login(upstream.lines) == [b"RETR 1", b"NOOP", b"QUIT"]


# -- commit ---------------------------------------------------------------------------------


async def test_commit_pipelines_deles_of_upstream_numbers_then_quits() -> None:
    messages = {n: (b"u%d" % n, b"m\r\n") for n in (3, 4, 7, 8)}

    async def script(peer: Peer) -> None:
        mailbox = Mailbox(messages)
        await peer.send(mailbox.greeting)
        for _ in range(5):  # CAPA, USER, PASS, UIDL, LIST
            line = await peer.line()
            assert line is not None
            await peer.send(mailbox.answer(peer, line)[0])
        reads_before = len(peer.reads)
        await peer.expect(b"DELE 4", b"DELE 8")  # indexes 1 and 3, ascending
        assert len(peer.reads) == reads_before + 1, "the DELEs took several writes"
        await trio.testing.wait_all_tasks_blocked()
        assert not peer.pending(), "QUIT was sent before the DELEs were confirmed"
        await peer.send(b"+OK\r\n+OK\r\n")
        await peer.expect(b"QUIT")
        await peer.send(b"+OK 2 deleted\r\n")
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        drop = await login(upstream)
        await drop.commit({3, 1})
        with pytest.raises(UpstreamError):
            await collect(drop, 0)
    assert upstream.peer.eof  # commit closed the connection


async def test_commit_without_pipelining_sends_one_dele_per_reply() -> None:
    async def script(peer: Peer) -> None:
        mailbox = Mailbox(dict(MESSAGES), capa=CAPA_PLAIN)
        await peer.send(mailbox.greeting)
        for _ in range(5):
            line = await peer.line()
            assert line is not None
            await peer.send(mailbox.answer(peer, line)[0])
        await peer.reply_after_one_line(b"DELE 1", b"+OK\r\n")
        await peer.reply_after_one_line(b"DELE 3", b"+OK\r\n")
        await peer.reply_after_one_line(b"QUIT", b"+OK\r\n")
        await peer.until_eof()

    async with scripted_upstream(script) as upstream:
        drop = await login(upstream)
        await drop.commit({0, 2})


@pytest.mark.parametrize("capa", [CAPA_PLAIN, CAPA_PIPELINING], ids=["serial", "pipelined"])
async def test_a_refused_dele_means_no_quit(capa: Sequence[bytes]) -> None:
    mailbox = Mailbox(dict(MESSAGES), capa=capa, replies={b"DELE 2": b"-ERR no such message\r\n"})
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        with pytest.raises(UpstreamError) as info:
            await drop.commit({0, 1, 2})
        assert_upstream_error(info.value, UpstreamFailure.REJECTED, ResponseCode.SYS_TEMP)
        with pytest.raises(UpstreamError):
            await drop.commit({0})
        await drop.keep_alive()
        await drop.aclose()
    sent = after_login(upstream.lines)
    assert b"QUIT" not in sent
    if capa == CAPA_PIPELINING:
        assert sent == [b"DELE 1", b"DELE 2", b"DELE 3"]
    else:
        assert sent == [b"DELE 1", b"DELE 2"]  # nothing after the refusal


async def test_quit_err_is_an_upstream_error() -> None:
    mailbox = Mailbox(dict(MESSAGES), replies={b"QUIT": b"-ERR [SYS/TEMP] could not expunge\r\n"})
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        with pytest.raises(UpstreamError) as info:
            await drop.commit({1})
        assert_upstream_error(info.value, UpstreamFailure.REJECTED, ResponseCode.SYS_TEMP)
        await drop.aclose()
    assert after_login(upstream.lines) == [b"DELE 2", b"QUIT"]
    assert upstream.peer.eof


async def test_quit_without_a_reply_is_an_upstream_error() -> None:
    async def reply(peer: Peer) -> None:
        await peer.expect(b"QUIT")
        assert isinstance(peer.stream, trio.SocketStream)
        await peer.stream.send_eof()

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        drop = await login(upstream)
        with pytest.raises(UpstreamError) as info:
            await drop.commit(set())
        assert_upstream_error(info.value, UpstreamFailure.PROTOCOL, ResponseCode.SYS_TEMP)
        await drop.aclose()


async def test_a_commit_that_stalls_is_a_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def reply(peer: Peer) -> None:
        await peer.expect(b"DELE 1")

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        drop = await login(upstream)
        with pytest.raises(UpstreamError) as info:
            await drop.commit({0})
        assert_upstream_error(info.value, UpstreamFailure.TIMEOUT, ResponseCode.SYS_TEMP)
        await drop.aclose()
    assert b"QUIT" not in upstream.lines


@pytest.mark.parametrize("marked", [set(), {0}], ids=["quit", "dele-then-quit"])
async def test_a_commit_is_bounded_by_one_command_timeout_in_all(
    autojump_clock: trio.testing.MockClock, marked: set[int]
) -> None:
    """DELE and QUIT share one deadline: each reply waits for what is left of it, not a
    timeout of its own (the reads and writes take a scope only when they wait)."""

    async def reply(peer: Peer) -> None:
        if marked:
            await peer.expect(b"DELE 1")
            await trio.sleep(COMMAND_TIMEOUT * 0.6)
            await peer.send(b"+OK\r\n")
        await peer.expect(b"QUIT")  # and no answer
        await peer.until_eof()

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        drop = await login(upstream)
        started = trio.current_time()
        with pytest.raises(UpstreamError) as info:
            await drop.commit(marked)
        assert trio.current_time() - started == pytest.approx(COMMAND_TIMEOUT)
        assert_upstream_error(info.value, UpstreamFailure.TIMEOUT, ResponseCode.SYS_TEMP)
        await drop.aclose()


async def test_closing_a_plain_connection_takes_no_pass_through_the_scheduler() -> None:
    """A plain upstream socket closes at once: neither a commit's close nor aclose waits."""
    async with scripted_upstream(Mailbox(dict(MESSAGES))) as upstream:
        drop = await login(upstream)
        with steps_of_this_task() as steps:
            await drop.aclose()
            await drop.aclose()  # idempotent
        assert steps.steps == 0
    assert upstream.peer.eof


async def test_commit_with_nothing_marked_sends_only_quit() -> None:
    async with scripted_upstream(Mailbox(dict(MESSAGES))) as upstream:
        drop = await login(upstream)
        await drop.commit(set())
        await drop.aclose()  # idempotent
    assert after_login(upstream.lines) == [b"QUIT"]


async def test_aclose_without_commit_sends_neither_dele_nor_quit() -> None:
    async with scripted_upstream(Mailbox(dict(MESSAGES))) as upstream:
        drop = await login(upstream)
        assert await collect(drop, 0) == stuff(MESSAGES[1][1])
        await drop.aclose()
        with pytest.raises(UpstreamError) as info:
            await drop.commit({0})
        assert_upstream_error(info.value, UpstreamFailure.CLOSED, ResponseCode.SYS_TEMP)
        await drop.keep_alive()
    assert after_login(upstream.lines) == [b"RETR 1"]
    assert upstream.peer.eof


# -- keep-alive -----------------------------------------------------------------------------


async def test_keep_alive_sends_noop() -> None:
    async with scripted_upstream(Mailbox(dict(MESSAGES))) as upstream:
        drop = await login(upstream)
        await drop.keep_alive()
        await drop.keep_alive()
        assert await collect(drop, 0) == stuff(MESSAGES[1][1])
        await drop.commit(set())
    assert after_login(upstream.lines) == [b"NOOP", b"NOOP", b"RETR 1", b"QUIT"]


@pytest.mark.parametrize("fault", ["err", "eof", "garbage"])
async def test_a_failed_keep_alive_breaks_the_maildrop(fault: str) -> None:
    async def reply(peer: Peer) -> None:
        await peer.expect(b"NOOP")
        if fault == "err":
            await peer.send(b"-ERR autologout\r\n")
        elif fault == "garbage":
            await peer.send(b"HTTP/1.1 400 Bad Request\r\n")
        else:
            assert isinstance(peer.stream, trio.SocketStream)
            await peer.stream.send_eof()

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        drop = await login(upstream)
        await drop.keep_alive()  # never raises
        with pytest.raises(UpstreamError) as info:
            await collect(drop, 0)
        assert_upstream_error(info.value, UpstreamFailure.CLOSED, ResponseCode.SYS_TEMP)
        await drop.keep_alive()  # broken: sends nothing
        with pytest.raises(UpstreamError):
            await drop.commit(set())
        await drop.aclose()
    assert after_login(upstream.lines) == [b"NOOP"]


async def test_a_keep_alive_that_stalls_breaks_the_maildrop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def reply(peer: Peer) -> None:
        await peer.expect(b"NOOP")

    async with scripted_upstream(lambda peer: one_message_script(peer, reply)) as upstream:
        drop = await login(upstream)
        start = trio.current_time()
        await drop.keep_alive()
        assert trio.current_time() - start == pytest.approx(COMMAND_TIMEOUT)
        with pytest.raises(UpstreamError) as info:
            await collect(drop, 0)
        assert info.value.code is ResponseCode.SYS_TEMP
        await drop.aclose()
    assert after_login(upstream.lines) == [b"NOOP"]


# -- secrets (invariant 6) ------------------------------------------------------------------


def secret_forms() -> list[bytes]:
    return [PASSWORD.encode(), PLAIN_B64, base64.b64encode(PASSWORD.encode())]


def assert_no_secret(text: str) -> None:
    for form in secret_forms():
        assert form.decode() not in text


def exception_texts(exc: BaseException) -> Iterator[str]:
    yield str(exc)
    yield repr(exc)
    yield repr(exc.args)
    yield "".join(traceback.format_exception(exc))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield repr(current)
        yield repr(vars(current))
        current = current.__cause__ or current.__context__


def echo_password(peer_reply: bytes) -> Mailbox:
    """An upstream that answers the password with a reply that quotes it."""
    return Mailbox(
        dict(MESSAGES),
        capa=CAPA_PLAIN,
        replies={b"PASS " + PASSWORD.encode(): peer_reply.replace(b"$PW", PASSWORD.encode())},
    )


SECRET_SCENARIOS: dict[str, Mailbox] = {
    "rejected": echo_password(b"-ERR [AUTH] bad password $PW\r\n"),
    "echoed-as-garbage": echo_password(b"PASS $PW\r\n"),
    "echoed-overlong": echo_password(b"-ERR $PW" + b"!" * 600 + b"\r\n"),
    "in-use": echo_password(b"-ERR [IN-USE] $PW is in use\r\n"),
    "plain-rejected": Mailbox(
        capa=CAPA_SASL,
        replies={b"AUTH PLAIN " + PLAIN_B64: b"-ERR [AUTH] " + PLAIN_B64 + b" rejected\r\n"},
    ),
    "bad-listing": Mailbox(
        capa=CAPA_SASL,
        replies={b"UIDL": multiline([PASSWORD.encode()]), b"LIST": multiline([b"1 1"])},
    ),
}


@pytest.mark.parametrize("mailbox", SECRET_SCENARIOS.values(), ids=SECRET_SCENARIOS)
async def test_password_never_in_logs_or_errors(
    mailbox: Mailbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with scripted_upstream(mailbox) as upstream:
        with pytest.raises(UpstreamError) as info:
            await login(upstream)
    for text in exception_texts(info.value):
        assert_no_secret(text)
    assert info.value.text in str(info.value)
    for record in caplog.records:
        assert_no_secret(record.getMessage())
        assert_no_secret(repr(vars(record)))
    assert_no_secret(caplog.text)


async def test_password_never_in_logs_of_a_whole_session(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    mailbox = Mailbox(dict(MESSAGES), replies={b"NOOP": b"-ERR " + PASSWORD.encode() + b"\r\n"})
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        await collect(drop, 0)
        await drop.keep_alive()  # fails, and logs that it did
        with pytest.raises(UpstreamError) as info:
            await drop.commit({0})
        await drop.aclose()
    assert caplog.records, "the failed keep-alive was not logged"
    for text in exception_texts(info.value):
        assert_no_secret(text)
    for record in caplog.records:
        assert_no_secret(repr(vars(record)))
    assert "***" in repr(account(1).credential)


# -- headers for header rules (TOP n 0, pipelined) -------------------------------------


def top_reads(peer: Peer) -> list[int]:
    """How many TOP commands each read of the upstream's socket carried (those with any)."""
    counts = [data.count(b"TOP ") for data, _ in peer.reads]
    return [n for n in counts if n]


async def all_headers(drop: UpstreamMaildrop, limit: int = 1000) -> list[bytes | None]:
    got: list[bytes | None] = []
    indexes = list(range(len(drop.messages)))
    async with contextlib.aclosing(drop.headers(indexes, limit)) as replies:
        async for index, wire in replies:
            assert index == len(got)
            got.append(wire)
    return got


async def test_headers_are_pipelined_a_window_at_a_time() -> None:
    """From a PIPELINING upstream, TOP n 0 goes HEADER_WINDOW commands to a write; a
    -ERR gives None and the others follow; the connection stays usable."""
    many = {n: (b"u%d" % n, b"Subject: s%d\r\n\r\nbody %d\r\n" % (n, n)) for n in range(1, 41)}
    mailbox = Mailbox(many, replies={b"TOP 7 0": b"-ERR [SYS/PERM] gone\r\n"})
    async with scripted_upstream(mailbox) as upstream:
        drop = await login(upstream)
        got = await all_headers(drop)
        assert await collect(drop, 0) == many[1][1]
        await drop.commit(set())
    assert top_reads(upstream.peer) == [HEADER_WINDOW, 40 - HEADER_WINDOW]
    assert got[6] is None
    assert got[0] == b"Subject: s1\r\n\r\n"
    assert got[39] == b"Subject: s40\r\n\r\n"
    assert sum(wire is not None for wire in got) == 39


async def test_headers_without_pipelining_go_one_per_reply() -> None:
    async with scripted_upstream(Mailbox(dict(MESSAGES), capa=CAPA_PLAIN)) as upstream:
        drop = await login(upstream)
        got = await all_headers(drop)
        await drop.commit(set())
    assert top_reads(upstream.peer) == [1, 1, 1]
    assert got == [b"Subject: one\r\n\r\n", b"Subject: two\r\n\r\n", b"Subject: three\r\n\r\n"]


async def test_a_header_over_the_limit_is_cut_and_its_reply_read_to_the_end() -> None:
    long_header = b"Subject: " + b"x" * 5000 + b"\r\n\r\nbody\r\n"
    messages = {1: (b"big", long_header), 2: (b"small", b"Subject: s\r\n\r\nb\r\n")}
    async with scripted_upstream(Mailbox(messages)) as upstream:
        drop = await login(upstream)
        got = await all_headers(drop, limit=100)
        assert await collect(drop, 1) == messages[2][1]  # nothing of the long reply is left
        await drop.commit(set())
    assert got[0] == long_header[:100]
    assert got[1] == b"Subject: s\r\n\r\n"


async def test_header_rules_over_an_upstream_read_pipelined_headers() -> None:
    """open_retained with a header rule: every header comes from pipelined TOPs, and the
    rule hides the messages whose header matches."""
    listed = b"List-Id: <l.example>\r\n"
    messages = {
        n: (b"u%d" % n, b"Subject: s%d\r\n%s\r\nbody\r\n" % (n, listed * (n % 2)))
        for n in range(1, 6)
    }
    hide_lists = Rule(
        name="no-lists",
        match=Match(headers=(HeaderMatch("list-id", header_pattern(".")),)),
        action=Action.HIDE,
    )
    store = await open_sqlite(None, busy_timeout_seconds=1)
    async with scripted_upstream(Mailbox(messages)) as upstream:
        drop = await login(upstream)
        context = RetentionContext(
            account=AccountKey("scripted", "user"),
            user="alice",
            session_id="s1",
            policy=Policy(rules=(hide_lists,)).for_user("alice", "scripted"),
            store=store,
            clock=lambda: datetime(2026, 3, 1, tzinfo=UTC),
        )
        retained = await open_retained(drop, context, on_close=trio.lowlevel.checkpoint)
        assert [m.uid for m in retained.messages] == ["u2", "u4"]
        await retained.aclose()
    await store.aclose()
    assert top_reads(upstream.peer) == [5]
