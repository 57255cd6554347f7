"""A hostile upstream, written here (hostile.py), in front of which popproxy must never
send credentials in clear and never relay the bad part of a reply: the client gets a
mapped -ERR or a closed connection, never a truncated message that looks complete
(RFC 1939 §3, RFC 2595 §4, RFC 3206, docs/security.md)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from integration.conftest import StartServer
from integration.dovecot import DovecotServer, DovecotUser
from integration.harness import (
    LOOPBACK,
    PASSWORD,
    Corpus,
    GatewayUser,
    ProxyUser,
    RssSampler,
    Source,
    TlsFiles,
    Upstream,
    write_config,
)
from integration.test_retention import stored

from popproxy.config import load_config
from popproxy.gateway.fetcher import Fetcher
from popproxy.maildrop.maildir import open_maildir
from popproxy.outcomes import PollResult
from popproxy.pop3.dotstuff import DotStuffer
from popproxy.state import open_store
from popproxy.state.base import GatewayStore

from .hostile import (
    HOSTILE_TIMEOUT_SECONDS,
    HostileConnection,
    HostileUpstream,
    Script,
    hostile_upstream,
    server_context,
    tls_1_1_works_here,
)
from .probe import Target

VICTIM = "victim"
HOSTILE = "hostile"
UNAVAILABLE = b"-ERR [SYS/TEMP] The mail provider is unavailable, try again later."
LOST = b"-ERR [SYS/TEMP] Lost the connection to the mail provider."
TEN_MB = 10 * 1024 * 1024
SEND_CHUNK_BYTES = 64 * 1024
# As in test_lines.py: far below the 10 MB a server that buffered the line would need.
TEN_MB_RSS_GROWTH_BOUND_KIB = 4 * 1024
MESSAGE = b"Subject: hostile\r\n\r\nhello\r\n"


Launch = Callable[[HostileUpstream, str], Target]
Run = Callable[..., tuple[Target, HostileUpstream, bytes]]


@pytest.fixture
def launch(
    start: StartServer,
    dovecot: DovecotServer,
    mailbox: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
) -> Launch:
    """Start popproxy with VICTIM routed to a hostile upstream (over `tls`: none,
    starttls, implicit), and the usual user routed to Dovecot, for `still_serves`."""

    def _launch(upstream: HostileUpstream, tls: str) -> Target:
        ca_file = tls_files.ca_cert if tls != "none" else None
        return Target.start(
            start,
            dovecot,
            mailbox,
            corpus,
            users=(ProxyUser(VICTIM, PASSWORD, HOSTILE, "victim@hostile", "upstream-secret"),),
            upstreams={HOSTILE: Upstream(LOOPBACK, upstream.port, tls, ca_file=ca_file)},
        )

    return _launch


def victim_login(target: Target) -> bytes:
    with target.connect() as pop:
        reply = pop.login(VICTIM, PASSWORD)
        assert pop.cmd(b"QUIT") == b"+OK Logging out."
    return reply


def exchange(conn: HostileConnection, *exchanges: tuple[bytes, bytes]) -> bool:
    """Greet, then answer each expected verb with canned octets; False if popproxy
    sent something else or closed."""
    conn.send(b"+OK hostile POP3\r\n")
    for verb, answer in exchanges:
        if conn.verb() != verb:
            return False
        conn.send(answer)
    return True


def greeting_then(*exchanges: tuple[bytes, bytes]) -> Script:
    """A script: `exchange`, then read to the end."""

    def script(conn: HostileConnection) -> None:
        exchange(conn, *exchanges)
        conn.drain()

    return script


CAPA_STLS = b"+OK\r\nUSER\r\nUIDL\r\nSTLS\r\n.\r\n"
CAPA_NO_STLS = b"+OK\r\nUSER\r\nUIDL\r\n.\r\n"


@pytest.fixture
def run(launch: Launch) -> Run:
    """Run a VICTIM login against a hostile upstream; the upstream is closed after it."""

    def _run(
        script: Script, tls: str, *, implicit_tls: ssl.SSLContext | None = None
    ) -> tuple[Target, HostileUpstream, bytes]:
        with hostile_upstream(script, implicit_tls=implicit_tls) as upstream:
            target = launch(upstream, tls)
            reply = victim_login(target)
        return target, upstream, reply

    return _run


# -- STLS on the upstream leg: no downgrade, no injection ---------------------------------------


def test_an_upstream_that_strips_stls_gets_no_credentials(
    run: Run,
) -> None:
    target, upstream, reply = run(greeting_then((b"CAPA", CAPA_NO_STLS)), "starttls")
    assert reply == UNAVAILABLE
    assert upstream.all_command_lines() == [b"CAPA"]
    assert upstream.credentials_in_clear() == []
    assert target.server.records("upstream_stls_unavailable")
    target.still_serves()


def test_an_upstream_that_refuses_stls_gets_no_credentials(
    run: Run,
) -> None:
    script = greeting_then((b"CAPA", CAPA_STLS), (b"STLS", b"-ERR not today\r\n"))
    target, upstream, reply = run(script, "starttls")
    assert reply == UNAVAILABLE
    assert upstream.all_command_lines() == [b"CAPA", b"STLS"]
    assert upstream.credentials_in_clear() == []
    target.still_serves()


def protocol_errors_now(target: Target) -> list[str]:
    """The reasons of the upstream_protocol_error lines logged so far."""
    return [r["reason"] for r in target.server.records("upstream_protocol_error")]


def protocol_errors(target: Target) -> list[str]:
    """The reasons of the server's upstream_protocol_error lines, once there is one: the
    client's -ERR can overtake the server's log line, so the line is waited for."""
    target.server.wait_for_log(
        lambda records: any(r.get("msg") == "upstream_protocol_error" for r in records),
        timeout=HOSTILE_TIMEOUT_SECONDS,
        what="an upstream_protocol_error line",
    )
    return [r["reason"] for r in target.server.records("upstream_protocol_error")]


@pytest.mark.parametrize(
    "after_ok",
    [b"+OK injected\r\n", b"+OK\r\n+OK\r\n+OK 0 0\r\n", b"-ERR"],
    ids=["a-reply", "replies-to-a-login", "a-partial-line"],
)
def test_octets_after_the_upstreams_stls_reply_abort_before_the_handshake(
    run: Run, after_ok: bytes
) -> None:
    script = greeting_then((b"CAPA", CAPA_STLS), (b"STLS", b"+OK begin TLS\r\n" + after_ok))
    target, upstream, reply = run(script, "starttls")
    assert reply == LOST
    assert upstream.all_command_lines() == [b"CAPA", b"STLS"]
    assert upstream.credentials_in_clear() == []
    # Octets behind the last awaited reply are refused as soon as they are read, before
    # the STLS step's own check for them.
    errors = protocol_errors(target)
    assert errors in (["unsolicited reply"], ["data after the STLS reply"])
    target.still_serves()


def test_an_upstream_that_offers_only_tls_1_1_gets_nothing(run: Run, tls_files: TlsFiles) -> None:
    assert tls_1_1_works_here(tls_files), "this OpenSSL cannot offer TLS 1.1 at all"
    tls_1_1 = server_context(tls_files, tls_1_1_only=True)
    # Implicit TLS: the handshake fails before a single octet of POP3.
    target, upstream, reply = run(greeting_then(), "implicit", implicit_tls=tls_1_1)
    assert reply == UNAVAILABLE
    assert upstream.tls_failures and upstream.connections
    assert all(not r.clear and not r.secure for r in upstream.connections)
    assert target.server.records("upstream_tls_failed")

    # STLS: the handshake after "+OK" fails; nothing follows it.
    def stls_then_tls_1_1(conn: HostileConnection) -> None:
        conn.send(b"+OK hostile POP3\r\n")
        if conn.verb() != b"CAPA":
            return
        conn.send(CAPA_STLS)
        if conn.verb() != b"STLS":
            return
        conn.send(b"+OK begin TLS\r\n")
        try:
            conn.start_tls(tls_1_1)
        except OSError:
            return
        conn.drain()

    target, upstream, reply = run(stls_then_tls_1_1, "starttls")
    assert reply == UNAVAILABLE
    assert upstream.all_command_lines() == [b"CAPA", b"STLS"]
    assert upstream.credentials_in_clear() == []
    target.still_serves()


# -- injected and unsolicited replies -----------------------------------------------------------


def test_a_reply_before_its_command_is_a_protocol_error(
    run: Run,
) -> None:
    # A reply in the greeting's write, before any command was sent.
    target, upstream, reply = run(
        lambda conn: (conn.send(b"+OK hostile POP3\r\n+OK early\r\n"), conn.drain()), "none"
    )
    assert reply == LOST
    assert upstream.all_command_lines() == []
    # Replies to a login that was never sent, behind the CAPA listing.
    target, upstream, reply = run(
        greeting_then((b"CAPA", CAPA_NO_STLS + b"+OK\r\n+OK\r\n")), "none"
    )
    assert reply == LOST
    assert upstream.all_command_lines() == [b"CAPA"]
    target.still_serves()


# A plain upstream's login and listing of one message (RFC 1939 §§4-7).
LOGIN_AND_LISTING = (
    (b"CAPA", CAPA_NO_STLS),
    (b"USER", b"+OK\r\n"),
    (b"PASS", b"+OK\r\n"),
    (b"UIDL", b"+OK\r\n1 only\r\n.\r\n"),
    (b"LIST", b"+OK\r\n1 %d\r\n.\r\n" % len(MESSAGE)),
)


def logged_in(retr_answer: bytes) -> Script:
    """Logs anyone in, lists one message, answers RETR with `retr_answer`, then closes."""

    def script(conn: HostileConnection) -> None:
        exchange(conn, *LOGIN_AND_LISTING, (b"RETR", retr_answer))

    return script


def retr_through_the_proxy(target: Target) -> bytes:
    """Log VICTIM in and RETR 1. Where the fault shows before anything of the message
    went out, the client gets the mapped -ERR and the session goes on (returns b"");
    otherwise returns everything that came until the proxy closed."""
    with target.connect() as pop:
        assert pop.login(VICTIM, PASSWORD).startswith(b"+OK Logged in, 1 messages")
        pop.send(b"RETR 1\r\n")
        pop.receive()
        if pop.buf.startswith(b"-ERR"):
            assert pop.line() == LOST
            assert pop.cmd(b"RETR 1") == LOST  # the upstream connection is gone for good
            assert pop.cmd(b"QUIT").startswith(b"-ERR [SYS/TEMP]")  # nothing was confirmed
            return b""
        return pop.rest_until_closed()


@pytest.mark.parametrize(
    "answer",
    [
        b"+OK\r\n" + MESSAGE + b".\r\n+OK unsolicited\r\n",  # a line nobody asked for
        b"+OK\r\n" + MESSAGE[:-2] + b"\r\n.",  # dies on what could begin a terminator
        b"+OK\r\n" + MESSAGE + b".\n",  # dies after a dot and a bare LF (content, no end)
        b"+OK\r\n" + MESSAGE[:10],  # dies in the middle of a line
    ],
    ids=["unsolicited-line", "dies-after-a-dot", "dies-after-a-poisoned-dot", "dies-mid-line"],
)
def test_a_bad_message_is_never_relayed_as_complete(
    launch: Launch,
    answer: bytes,
) -> None:
    with hostile_upstream(logged_in(answer)) as upstream:
        target = launch(upstream, "none")
        received = retr_through_the_proxy(target)
    assert not received.endswith(b"\r\n.\r\n"), received
    assert b"unsolicited" not in received
    assert not lenient_lines(received)[1], received  # no LF-ended line reads as the end
    target.still_serves()


# A message as an upstream that does not dot-stuff holds and sends it: two lines of a
# single dot ended by a bare LF. A client that ends lines at LF would read the first as
# the end of the message and "+OK FAKE reply" as the reply to its next command.
POISONED = b"Subject: poisoned\r\n\r\nbefore\r\n.\n+OK FAKE reply\r\n.\nafter\r\n"
# What popproxy relays: each such line dot-stuffed, every other octet as it came.
RELAYED = b"Subject: poisoned\r\n\r\nbefore\r\n..\n+OK FAKE reply\r\n..\nafter\r\n"


def strict_lines(wire: bytes) -> tuple[bytes, bool]:
    """``wire`` as a client that ends lines at CRLF reads a body (RFC 1939 §3): the
    un-stuffed content before the first terminator line, and whether there was one."""
    out: list[bytes] = []
    for line in wire.split(b"\r\n")[:-1]:
        if line == b".":
            return b"".join(out), True
        out.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
    return b"".join(out), False


def lenient_lines(wire: bytes) -> tuple[bytes, bool]:
    """The same for a client that ends lines at LF and drops one CR before it."""
    out: list[bytes] = []
    for line in wire.split(b"\n")[:-1]:
        if line in (b".", b".\r"):
            return b"".join(out), True
        out.append((line[1:] if line.startswith(b".") else line) + b"\n")
    return b"".join(out), False


def test_a_poisoned_dot_line_is_relayed_stuffed_and_the_session_goes_on(
    launch: Launch,
) -> None:
    """RFC 1939 §3 has no line of a single dot ended by a bare LF. popproxy relays it as
    content, dot-stuffed, so no client (ending lines at CRLF or at LF) reads it as the
    end: the message is retrievable, every client gets the upstream's octets (the LIST
    size, invariant 4), the other message and the session stay usable and the upstream
    connection is kept. Each such reply is logged once, with the session."""

    def script(conn: HostileConnection) -> None:
        listed = exchange(
            conn,
            (b"CAPA", CAPA_NO_STLS),
            (b"USER", b"+OK\r\n"),
            (b"PASS", b"+OK\r\n"),
            (b"UIDL", b"+OK\r\n1 poisoned\r\n2 plain\r\n.\r\n"),
            (b"LIST", b"+OK\r\n1 %d\r\n2 %d\r\n.\r\n" % (len(POISONED), len(MESSAGE))),
        )
        while listed and (line := conn.line()) is not None:
            match line:
                case b"RETR 1":
                    conn.send(b"+OK\r\n" + POISONED + b".\r\n")
                case b"RETR 2":
                    conn.send(b"+OK\r\n" + MESSAGE + b".\r\n")
                case b"QUIT":
                    conn.send(b"+OK bye\r\n")
                    return
                case _:
                    conn.send(b"-ERR unexpected\r\n")

    with hostile_upstream(script) as upstream:
        target = launch(upstream, "none")
        with target.connect() as pop:
            assert pop.login(VICTIM, PASSWORD).startswith(b"+OK Logged in, 2 messages")
            assert pop.cmd(b"LIST 1") == b"+OK 1 %d" % len(POISONED)
            for _ in range(2):  # retrievable, again and again, on one upstream connection
                pop.send(b"RETR 1\r\n")
                while not pop.buf.endswith(b"\r\n.\r\n"):
                    assert pop.receive(), bytes(pop.buf)
                wire = bytes(pop.buf)
                pop.buf.clear()
                assert wire == b"+OK %d octets\r\n" % len(POISONED) + RELAYED + b".\r\n"
                body = wire.split(b"\r\n", 1)[1]
                assert strict_lines(body) == (POISONED, True)
                assert lenient_lines(body) == (POISONED, True)
            assert pop.cmd(b"RETR 2") == b"+OK %d octets" % len(MESSAGE)
            assert b"".join(line + b"\r\n" for line in pop.body()) == MESSAGE
            assert pop.cmd(b"NOOP") == b"+OK"
            assert pop.cmd(b"QUIT") == b"+OK Logging out, 0 messages deleted."
        target.server.wait_for_log(
            lambda records: any(
                r.get("msg") == "session_end" and r.get("user") == VICTIM for r in records
            ),
            timeout=HOSTILE_TIMEOUT_SECONDS,
            what="the victim's session_end line",
        )
    assert len(upstream.connections) == 1
    (end,) = [r for r in target.server.records("session_end") if r.get("user") == VICTIM]
    assert end.get("result") == "quit", end
    logged = target.server.records("upstream_poisoned_dot_line")
    assert [(r.get("session"), r.get("upstream"), r.get("lines")) for r in logged] == [
        (end["session"], HOSTILE, "2")
    ] * 2
    assert protocol_errors_now(target) == []
    target.still_serves()


def test_an_upstream_quit_answering_err_records_nothing_as_deleted(
    start: StartServer,
    dovecot: DovecotServer,
    mailbox: DovecotUser,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    """The upstream takes the DELE, then answers QUIT with -ERR: it did not delete (RFC
    1939 §6, the UPDATE state did not complete). The client hears -ERR, and the state
    store records nothing, so nothing is counted as deleted and the message is offered
    again at the next login (invariants 1 and 2)."""

    def script(conn: HostileConnection) -> None:
        if exchange(
            conn,
            *LOGIN_AND_LISTING,
            (b"RETR", b"+OK\r\n" + MESSAGE + b".\r\n"),
            (b"DELE", b"+OK marked\r\n"),
            (b"QUIT", b"-ERR [SYS/TEMP] could not expunge\r\n"),
        ):
            conn.drain()

    state = tmp_path / "state.db"
    with hostile_upstream(script) as upstream:
        target = Target.start(
            start,
            dovecot,
            mailbox,
            corpus,
            users=(ProxyUser(VICTIM, PASSWORD, HOSTILE, "victim@hostile", "upstream-secret"),),
            upstreams={HOSTILE: Upstream(LOOPBACK, upstream.port, "none")},
            state=state,
        )
        with target.connect() as pop:
            assert pop.login(VICTIM, PASSWORD).startswith(b"+OK Logged in, 1 messages")
            assert pop.cmd(b"RETR 1").startswith(b"+OK")
            assert b"".join(line + b"\r\n" for line in pop.body()) == MESSAGE
            assert pop.cmd(b"DELE 1").startswith(b"+OK")
            assert pop.cmd(b"QUIT").startswith(b"-ERR [SYS/TEMP]")
        target.server.wait_for_log(
            lambda records: any(
                r.get("msg") == "session_end" and r.get("user") == VICTIM for r in records
            ),
            timeout=HOSTILE_TIMEOUT_SECONDS,
            what="the victim's session_end line",
        )
    assert [line for line in upstream.all_command_lines() if line in (b"DELE 1", b"QUIT")] == [
        b"DELE 1",
        b"QUIT",
    ]
    assert stored(state) == []  # no listing, retrieval or deletion recorded
    assert not target.server.records("policy_deleted")
    (end,) = [r for r in target.server.records("session_end") if r.get("user") == VICTIM]
    assert (end.get("deleted_upstream"), end.get("hidden")) == ("0", "0"), end
    target.still_serves()


def gateway_upstream(conn: HostileConnection) -> None:
    """Serves the gateway: POISONED as the only message, kept (no DELE), then QUIT."""
    if not exchange(
        conn,
        (b"CAPA", CAPA_NO_STLS),
        (b"USER", b"+OK\r\n"),
        (b"PASS", b"+OK\r\n"),
        (b"UIDL", b"+OK\r\n1 poisoned\r\n.\r\n"),
        (b"LIST", b"+OK\r\n1 %d\r\n.\r\n" % len(POISONED)),
    ):
        return
    while (line := conn.line()) is not None:
        match line:
            case b"RETR 1":
                conn.send(b"+OK\r\n" + POISONED + b".\r\n")
            case b"QUIT":
                conn.send(b"+OK bye\r\n")
                return
            case _:
                conn.send(b"-ERR unexpected\r\n")


async def test_the_gateway_keeps_a_poisoned_dot_line_as_content_and_serves_it_stuffed(
    tls_files: TlsFiles, tmp_path: Path
) -> None:
    """The gateway's local copy of a message with poisoned dot lines holds the octets the
    upstream sent (the lines are content, not the end), and serving it from the Maildir
    stuffs them, so no client reads one as the end of the message."""
    mail = tmp_path / "carol-mail"
    with hostile_upstream(gateway_upstream) as upstream:
        config = load_config(
            write_config(
                tmp_path / "popproxy.yaml",
                users=[
                    GatewayUser(
                        "carol", PASSWORD, mail, (Source(HOSTILE, "carol@hostile", "secret"),)
                    )
                ],
                tls=tls_files,
                listeners=["none"],
                upstreams={HOSTILE: Upstream(LOOPBACK, upstream.port, "none")},
                rules={"10-keep.yaml": "rules:\n  - name: keep-all\n    action: keep\n"},
            )
        )
        store = await open_store(config.state)
        try:

            async def get() -> GatewayStore:
                return store

            fetcher = Fetcher(get, clock=lambda: datetime.now(UTC))
            with trio.fail_after(HOSTILE_TIMEOUT_SECONDS):
                (user,) = config.gateway_users
                report = await fetcher.poll(config, user, user.fetch[0])
        finally:
            await store.aclose()
    assert (report.result, report.fetched, report.deleted) == (PollResult.OK, 1, 0), report
    (path,) = [p for sub in ("new", "cur") for p in (mail / sub).iterdir()]
    assert path.read_bytes() == POISONED  # byte exact: the lines are the upstream's content
    local = await open_maildir(mail)
    try:
        crlf = POISONED.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert [m.size for m in local.messages] == [len(crlf)]
        stuffer = DotStuffer()
        chunks = [c async for c in local.retrieve(0)]
        wire = b"".join(stuffer.stuff(c) for c in chunks) + stuffer.finish()
    finally:
        await local.aclose()
    assert wire == crlf.replace(b"\r\n.\r\n", b"\r\n..\r\n") + b".\r\n"
    assert strict_lines(wire) == (crlf, True)
    assert lenient_lines(wire) == (crlf, True)
    assert [line for line in upstream.all_command_lines() if line.startswith(b"DELE")] == []


def test_a_line_sent_unasked_while_the_session_is_idle_is_never_relayed(launch: Launch) -> None:
    """The unasked line arrives on its own between commands; the proxy must not read it
    as the next command's reply: the client's RETR gets the mapped -ERR and no RETR
    goes upstream."""
    client_logged_in, unasked_sent = threading.Event(), threading.Event()

    def script(conn: HostileConnection) -> None:
        if not exchange(conn, *LOGIN_AND_LISTING):
            return
        client_logged_in.wait(HOSTILE_TIMEOUT_SECONDS)
        conn.send(b"+OK unasked\r\n")
        unasked_sent.set()
        if conn.verb() == b"RETR":
            conn.send(b"+OK\r\n" + MESSAGE + b".\r\n")
        conn.drain()

    with hostile_upstream(script) as upstream:
        target = launch(upstream, "none")
        with target.connect() as pop:
            assert pop.login(VICTIM, PASSWORD).startswith(b"+OK Logged in, 1 messages")
            client_logged_in.set()
            assert unasked_sent.wait(HOSTILE_TIMEOUT_SECONDS)
            assert pop.cmd(b"RETR 1") == LOST
            assert pop.cmd(b"QUIT").startswith(b"-ERR [SYS/TEMP]")
    assert b"RETR 1" not in upstream.all_command_lines()
    assert protocol_errors(target) == ["unsolicited reply"]
    target.still_serves()


def send_ten_megabytes(conn: HostileConnection, head: bytes) -> None:
    """`head`, then 10 MB without a line end, for as long as popproxy reads."""
    if not conn.send(head):
        return
    chunk = b"x" * SEND_CHUNK_BYTES
    for _ in range(TEN_MB // SEND_CHUNK_BYTES):
        if not conn.send(chunk):
            return
    conn.drain()


def test_a_10_mb_status_line_is_refused_in_bounded_memory(
    launch: Launch,
) -> None:
    # As the greeting: the login fails, nothing is sent upstream.
    with hostile_upstream(lambda conn: send_ten_megabytes(conn, b"+OK ")) as upstream:
        target = launch(upstream, "none")
        target.still_serves()
        before_kib = target.server.rss_kib()
        with RssSampler(target.server.pid) as rss:
            assert victim_login(target) == LOST
    assert upstream.all_command_lines() == []
    assert rss.peak_kib - before_kib < TEN_MB_RSS_GROWTH_BOUND_KIB

    # As the reply to RETR: the client gets the mapped -ERR, and the session goes on.
    def retr_ten_megabytes(conn: HostileConnection) -> None:
        if exchange(conn, *LOGIN_AND_LISTING) and conn.verb() == b"RETR":
            send_ten_megabytes(conn, b"+OK ")

    with hostile_upstream(retr_ten_megabytes) as upstream:
        target = launch(upstream, "none")
        with target.connect() as pop:
            assert pop.login(VICTIM, PASSWORD).startswith(b"+OK Logged in, 1 messages")
            assert pop.cmd(b"RETR 1") == LOST
            assert pop.cmd(b"STAT") == b"+OK 1 %d" % len(MESSAGE)
            assert pop.cmd(b"RETR 1") == LOST
    target.still_serves()
