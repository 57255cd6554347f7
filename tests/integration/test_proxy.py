"""Proxy mode against a real Dovecot (issue 3): what a client gets through popproxy is
what it gets from Dovecot directly, and deletions reach Dovecot only through QUIT.

Every test runs popproxy as a subprocess whose users are routed to accounts on the
session's Dovecot (tests/integration/dovecot.py); the "direct" side of each comparison is
the same Dovecot account, read in the same test.
"""

from __future__ import annotations

import base64
import hashlib
import poplib
import socket
import struct
import threading
from collections.abc import Sequence
from typing import cast

import pytest

from .conftest import StartServer
from .dovecot import DovecotServer, DovecotUser
from .harness import (
    LISTENER_KINDS,
    LOOPBACK,
    PASSWORD,
    SOCKET_TIMEOUT_SECONDS,
    Corpus,
    ProxyUser,
    ServerProcess,
    StreamingPop3,
    TlsFiles,
    Upstream,
    poplib_connection,
)

UPSTREAM = "dovecot"
# The upstream leg's TLS modes (config upstreams.NAME.tls); each is tested.
LEGS = LISTENER_KINDS
# Scripted upstreams in these tests answer within this.
SCRIPT_TIMEOUT_SECONDS = 10.0


def upstream_for(dovecot: DovecotServer, leg: str, **settings: object) -> Upstream:
    """The `upstreams:` entry reaching `dovecot` through its listener of kind `leg`."""
    host, port = dovecot.endpoint(leg)
    ca_file = dovecot.ca_file if leg != "none" else None
    return Upstream(host, port, leg, ca_file=ca_file, settings=settings)


def local_name(user: DovecotUser) -> str:
    return f"local-{user.name}"


def local_user(account: DovecotUser, name: str | None = None) -> ProxyUser:
    """The local user (``local-NAME`` unless ``name``, password PASSWORD) routed to
    ``account`` on UPSTREAM."""
    return ProxyUser(
        name or local_name(account), PASSWORD, UPSTREAM, account.name, account.password
    )


def start_proxy(
    start: StartServer,
    dovecot: DovecotServer,
    accounts: Sequence[DovecotUser],
    *,
    leg: str = "starttls",
    upstream: Upstream | None = None,
    limits: dict[str, float | int] | None = None,
) -> ServerProcess:
    """popproxy with one local user per Dovecot account (`local-NAME`, password PASSWORD)."""
    return start(
        users=[local_user(u) for u in accounts],
        upstreams={UPSTREAM: upstream or upstream_for(dovecot, leg)},
        limits=limits,
    )


def direct(dovecot: DovecotServer, user: DovecotUser) -> poplib.POP3:
    """poplib logged in to Dovecot itself (its plain listener)."""
    host, port = dovecot.endpoint("none")
    pop = poplib_connection(port, host=host)
    pop.user(user.name)
    pop.pass_(user.password)
    return pop


def proxied(server: ServerProcess, user: DovecotUser) -> poplib.POP3:
    """poplib logged in to popproxy as the local user routed to `user`."""
    pop = poplib_connection(server.port("none"))
    pop.user(local_name(user))
    pop.pass_(PASSWORD)
    return pop


def lines_of(reply: tuple[bytes, list[bytes], int]) -> list[bytes]:
    resp, lines, _ = reply
    assert resp.startswith(b"+OK"), resp
    return lines


# -- through the proxy, clients get what Dovecot gives ---------------------------------------


@pytest.mark.parametrize("leg", LEGS)
def test_every_poplib_command_gives_what_dovecot_gives(
    start: StartServer, dovecot: DovecotServer, dovecot_user: DovecotUser, leg: str
) -> None:
    server = start_proxy(start, dovecot, [dovecot_user], leg=leg)
    here, there = direct(dovecot, dovecot_user), proxied(server, dovecot_user)
    assert here.stat() == there.stat()
    assert lines_of(here.list()) == lines_of(there.list())
    assert lines_of(here.uidl()) == lines_of(there.uidl())
    count = here.stat()[0]
    sizes = {int(n): int(size) for n, size in (line.split() for line in lines_of(here.list()))}
    for n in range(1, count + 1):
        assert cast(bytes, here.list(n)).split()[1:] == cast(bytes, there.list(n)).split()[1:]
        assert here.uidl(n).split()[1:] == there.uidl(n).split()[1:]
        assert lines_of(here.top(n, 0)) == lines_of(there.top(n, 0))
        assert lines_of(here.top(n, 3)) == lines_of(there.top(n, 3))
        if sizes[n] < 1 << 20:  # the 50 MB message is compared by digest below
            assert lines_of(here.retr(n)) == lines_of(there.retr(n))
    assert there.noop().startswith(b"+OK")
    assert there.dele(1).startswith(b"+OK")
    assert here.dele(1).startswith(b"+OK")
    assert here.stat() == there.stat()
    with pytest.raises(poplib.error_proto):
        there.retr(1)
    assert there.rset().startswith(b"+OK")
    assert here.rset().startswith(b"+OK")
    assert here.stat() == there.stat()
    with pytest.raises(poplib.error_proto):
        there.retr(count + 1)
    assert there.quit().startswith(b"+OK")
    assert here.quit().startswith(b"+OK")
    assert dovecot_user.count() == count


@pytest.mark.slow
@pytest.mark.parametrize("leg", LEGS)
def test_every_message_arrives_byte_exact_on_every_upstream_leg(
    start: StartServer,
    dovecot: DovecotServer,
    dovecot_user: DovecotUser,
    corpus: Corpus,
    leg: str,
) -> None:
    """sha256 of every message, the dot lines, 8-bit bodies, long lines and 50 MB included."""
    server = start_proxy(start, dovecot, [dovecot_user], leg=leg)
    expected = sorted((m.size, m.sha256) for m in corpus.messages)
    host, port = dovecot.endpoint("none")
    with StreamingPop3(port, host=host) as there:
        there.login(dovecot_user.name, dovecot_user.password)
        count = len(there.multiline("LIST"))
        direct_digests = [there.multiline_digest(f"RETR {n}") for n in range(1, count + 1)]
    with StreamingPop3(server.port("none")) as pop:
        pop.login(local_name(dovecot_user), PASSWORD)
        proxied_digests = [pop.multiline_digest(f"RETR {n}") for n in range(1, count + 1)]
    assert proxied_digests == direct_digests
    assert sorted(proxied_digests) == expected


# -- deletions: only through QUIT ------------------------------------------------------------


def test_dele_then_quit_deletes_exactly_those_messages_in_dovecot(
    start: StartServer, dovecot: DovecotServer, dovecot_user: DovecotUser
) -> None:
    server = start_proxy(start, dovecot, [dovecot_user])
    before = dovecot_user.keys()
    pop = proxied(server, dovecot_user)
    uids = {int(n): u.decode() for n, u in (line.split() for line in lines_of(pop.uidl()))}
    for n in (2, 4):
        pop.dele(n)
    assert pop.quit().startswith(b"+OK")
    # Dovecot's UIDs here are the Maildir unique names (pop3_uidl_format %f or equivalent).
    gone = before - dovecot_user.keys()
    assert len(gone) == 2
    remaining = proxied(server, dovecot_user)
    assert {u.split()[1].decode() for u in lines_of(remaining.uidl())} == (
        set(uids.values()) - {uids[2], uids[4]}
    )
    ends = server.wait_for_log(
        lambda records: any(r.get("deleted_upstream") == "2" for r in records),
        timeout=SOCKET_TIMEOUT_SECONDS,
        what="the deleting session's end",
    )
    summary = next(r for r in ends if r.get("deleted_upstream") == "2")
    assert (summary["msg"], summary["result"]) == ("session_end", "quit")
    assert (summary["user"], summary["upstream"]) == (local_name(dovecot_user), UPSTREAM)


def _login_and_mark(server: ServerProcess, user: DovecotUser) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, server.port("none")), SOCKET_TIMEOUT_SECONDS)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"+OK")
    sock.sendall(f"USER {local_name(user)}\r\nPASS {PASSWORD}\r\nDELE 1\r\nDELE 2\r\n".encode())
    replies = [f.readline() for _ in range(4)]
    assert all(r.startswith(b"+OK") for r in replies), replies
    f.close()
    return sock


@pytest.mark.parametrize("ending", ["fin", "rst", "rset-quit"])
def test_dele_without_quit_or_with_rset_deletes_nothing(
    start: StartServer, dovecot: DovecotServer, dovecot_user: DovecotUser, ending: str
) -> None:
    server = start_proxy(start, dovecot, [dovecot_user])
    before = dovecot_user.digests()
    sock = _login_and_mark(server, dovecot_user)
    match ending:
        case "fin":
            sock.close()
        case "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        case "rset-quit":
            sock.sendall(b"RSET\r\nQUIT\r\n")
            f = sock.makefile("rb")
            assert f.readline().startswith(b"+OK")
            assert f.readline().startswith(b"+OK")
            f.close()
            sock.close()
    server.wait_for_log(
        lambda records: any(r.get("msg") == "session_end" for r in records),
        timeout=SOCKET_TIMEOUT_SECONDS,
        what="the session's end",
    )
    # The upstream session ends when popproxy drops it; a new one sees everything.
    assert proxied(server, dovecot_user).stat()[0] == len(before)
    assert dovecot_user.digests() == before


# -- error mapping and faults ----------------------------------------------------------------


def test_upstream_down_gives_sys_temp_and_the_proxy_keeps_serving(
    start: StartServer, dovecot: DovecotServer, dovecot_user: DovecotUser
) -> None:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        dead_port = probe.getsockname()[1]  # closed again: nothing listens there
    server = start(
        users=[
            ProxyUser("down", PASSWORD, "down", "x", "x"),
            local_user(dovecot_user),
        ],
        upstreams={"down": Upstream(LOOPBACK, dead_port), UPSTREAM: upstream_for(dovecot, "none")},
    )
    pop = poplib_connection(server.port("none"))
    pop.user("down")
    with pytest.raises(poplib.error_proto) as refused:
        pop.pass_(PASSWORD)
    assert refused.value.args[0].startswith(b"-ERR [SYS/TEMP]")
    assert proxied(server, dovecot_user).stat()[0] == dovecot_user.count()


def test_wrong_upstream_password_gives_sys_perm_not_auth(
    start: StartServer, dovecot: DovecotServer, dovecot_user: DovecotUser
) -> None:
    server = start(
        users=[ProxyUser("wrong", PASSWORD, UPSTREAM, dovecot_user.name, "not-the-password")],
        upstreams={UPSTREAM: upstream_for(dovecot, "starttls")},
    )
    pop = poplib_connection(server.port("none"))
    pop.user("wrong")
    with pytest.raises(poplib.error_proto) as refused:
        pop.pass_(PASSWORD)
    reply = refused.value.args[0]
    assert reply.startswith(b"-ERR [SYS/PERM]"), reply
    assert b"not-the-password" not in server.log_text().encode()


class ScriptedUpstream:
    """A scripted POP3 upstream on a real loopback socket: greets, then answers each
    command line with `answer` until it returns False, the peer closes, or the peer
    stays silent for `idle_timeout_seconds` (then `timed_out` runs)."""

    idle_timeout_seconds = SCRIPT_TIMEOUT_SECONDS

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(SCRIPT_TIMEOUT_SECONDS)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.listener:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(self.idle_timeout_seconds)
                f = conn.makefile("rb")
                conn.sendall(b"+OK scripted\r\n")
                try:
                    for raw in f:
                        if not self.answer(conn, raw.split()[0].upper() if raw.split() else b""):
                            return
                except TimeoutError:
                    self.timed_out(conn)

    def answer(self, conn: socket.socket, verb: bytes) -> bool:
        """Answer one command; False ends the connection."""
        raise NotImplementedError

    def timed_out(self, conn: socket.socket) -> None:
        """The peer was silent for `idle_timeout_seconds`."""

    def close(self) -> None:
        self.listener.close()
        self.thread.join(SCRIPT_TIMEOUT_SECONDS)


class DyingUpstream(ScriptedUpstream):
    """Logs anyone in, lists one message, and closes the connection half-way through
    its RETR."""

    SIZE = 1_000_000
    # What it sends before dying: several of popproxy's chunks, so some of it is relayed.
    PART = (b"y" * 76 + b"\r\n") * 6_000

    def answer(self, conn: socket.socket, verb: bytes) -> bool:
        match verb:
            case b"CAPA":
                conn.sendall(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n")
            case b"UIDL":
                conn.sendall(b"+OK\r\n1 only-one\r\n.\r\n")
            case b"LIST":
                conn.sendall(f"+OK\r\n1 {self.SIZE}\r\n.\r\n".encode())
            case b"RETR":
                conn.sendall(b"+OK\r\nSubject: cut\r\n\r\n" + self.PART)
                return False  # dies in the middle of the message
            case _:
                conn.sendall(b"+OK\r\n")
        return True


def test_upstream_dying_mid_retr_closes_the_client_without_a_terminator(
    start: StartServer, dovecot: DovecotServer, dovecot_user: DovecotUser
) -> None:
    dying = DyingUpstream()
    try:
        server = start(
            users=[
                ProxyUser("cut", PASSWORD, "dying", "x", "x"),
                local_user(dovecot_user),
            ],
            upstreams={
                "dying": Upstream(LOOPBACK, dying.port),
                UPSTREAM: upstream_for(dovecot, "none"),
            },
        )
        sock = socket.create_connection((LOOPBACK, server.port("none")), SOCKET_TIMEOUT_SECONDS)
        with sock:
            sock.sendall(f"USER cut\r\nPASS {PASSWORD}\r\nRETR 1\r\n".encode())
            received = bytearray()
            while chunk := sock.recv(65536):
                received += chunk
        assert b"Subject: cut" in received
        assert not received.endswith(b"\r\n.\r\n"), "a truncated message looked complete"
        assert proxied(server, dovecot_user).stat()[0] == dovecot_user.count()
    finally:
        dying.close()


# -- concurrency -----------------------------------------------------------------------------

CONCURRENT_SESSIONS = 300


@pytest.mark.slow
def test_300_concurrent_sessions_of_two_users_each_see_only_their_own_mailbox(
    start: StartServer, dovecot: DovecotServer, corpus: Corpus
) -> None:
    small = corpus.small
    first = dovecot.add_user(corpus=corpus, messages=small[:2])
    second = dovecot.add_user(corpus=corpus, messages=small[2:5])
    try:
        # Overlapping sessions on one account need exclusive_sessions: false (by default
        # the second session on an account waits for the first: test_retention.py).
        shared = upstream_for(dovecot, "none", exclusive_sessions=False)
        server = start_proxy(start, dovecot, [first, second], upstream=shared)
        expected = {
            first.name: sorted(hashlib.sha256(m.crlf or b"").hexdigest() for m in small[:2]),
            second.name: sorted(hashlib.sha256(m.crlf or b"").hexdigest() for m in small[2:5]),
        }
        failures: list[str] = []
        barrier = threading.Barrier(CONCURRENT_SESSIONS, timeout=SOCKET_TIMEOUT_SECONDS)

        def session(user: DovecotUser) -> None:
            try:
                with StreamingPop3(server.port("none")) as pop:
                    pop.login(local_name(user), PASSWORD)
                    barrier.wait()  # all sessions are logged in at once
                    count = len(pop.multiline("LIST"))
                    digests = sorted(
                        pop.multiline_digest(f"RETR {n}")[1] for n in range(1, count + 1)
                    )
                    pop.command("QUIT")
                if digests != expected[user.name]:
                    failures.append(f"{user.name} saw {digests}")
            except Exception as exc:  # collected: a thread's exception is not a test failure
                failures.append(f"{user.name}: {exc!r}")

        threads = [
            threading.Thread(target=session, args=(first if i % 2 else second,))
            for i in range(CONCURRENT_SESSIONS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SOCKET_TIMEOUT_SECONDS * 4)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures[:5]
    finally:
        dovecot.remove_user(first)
        dovecot.remove_user(second)


# -- keep-alive and loops ----------------------------------------------------------------------

# The scripted upstream below logs a client out after this long without a command, as
# RFC 1939 §3's autologout timer does (at least 10 minutes in a real server).
SCRIPTED_AUTOLOGOUT_SECONDS = 0.5
# popproxy's NOOP interval in that test: well inside the autologout.
KEEPALIVE_SECONDS = 0.1
# NOOPs the upstream must see while the client idles: together longer than the autologout.
KEEPALIVE_NOOPS = 8


class AutologoutUpstream(ScriptedUpstream):
    """A scripted upstream with one message that drops a session idle for
    SCRIPTED_AUTOLOGOUT_SECONDS, and counts the NOOPs it gets."""

    MESSAGE = b"Subject: kept alive\r\n\r\nstill here\r\n"
    idle_timeout_seconds = SCRIPTED_AUTOLOGOUT_SECONDS

    def __init__(self) -> None:
        self.noops = 0
        self.enough_noops = threading.Event()
        self.logged_out = threading.Event()
        super().__init__()

    def timed_out(self, conn: socket.socket) -> None:
        self.logged_out.set()  # the autologout timer fired
        conn.sendall(b"-ERR autologout\r\n")

    def answer(self, conn: socket.socket, verb: bytes) -> bool:
        match verb:
            case b"CAPA":
                conn.sendall(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n")
            case b"UIDL":
                conn.sendall(b"+OK\r\n1 kept\r\n.\r\n")
            case b"LIST":
                conn.sendall(f"+OK\r\n1 {len(self.MESSAGE)}\r\n.\r\n".encode())
            case b"RETR":
                conn.sendall(b"+OK\r\n" + self.MESSAGE + b".\r\n")
            case b"NOOP":
                self.noops += 1
                if self.noops >= KEEPALIVE_NOOPS:
                    self.enough_noops.set()
                conn.sendall(b"+OK\r\n")
            case _:
                conn.sendall(b"+OK\r\n")
        return True


def test_an_idle_client_keeps_its_upstream_session_through_the_upstreams_autologout(
    start: StartServer,
) -> None:
    upstream = AutologoutUpstream()
    try:
        server = start(
            users=[ProxyUser("idle", PASSWORD, "slow", "x", "x")],
            upstreams={
                "slow": Upstream(
                    LOOPBACK,
                    upstream.port,
                    settings={"keepalive_interval_seconds": KEEPALIVE_SECONDS},
                )
            },
        )
        pop = poplib_connection(server.port("none"))
        pop.user("idle")
        pop.pass_(PASSWORD)
        # The client says nothing while the upstream counts NOOPs that span its autologout.
        assert upstream.enough_noops.wait(SCRIPT_TIMEOUT_SECONDS)
        assert not upstream.logged_out.is_set()
        assert b"".join(line + b"\r\n" for line in lines_of(pop.retr(1))) == upstream.MESSAGE
        assert pop.quit().startswith(b"+OK")  # the upstream's QUIT confirmed it
    finally:
        upstream.close()


class PortForwarder:
    """Forwards one TCP connection from its own loopback port to `target_port`, set later:
    a second address for a listener, as a NAT rule or a DNS alias would be."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(SCRIPT_TIMEOUT_SECONDS)
        self.port = self.listener.getsockname()[1]
        self.target_port = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.listener:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(
                (LOOPBACK, self.target_port), SCRIPT_TIMEOUT_SECONDS
            )
            with inbound, outbound:
                pump = threading.Thread(target=self._pump, args=(outbound, inbound), daemon=True)
                pump.start()
                self._pump(inbound, outbound)
                pump.join(SCRIPT_TIMEOUT_SECONDS)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(SCRIPT_TIMEOUT_SECONDS)
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(SCRIPT_TIMEOUT_SECONDS)


def test_popproxy_refuses_to_proxy_to_itself_at_run_time(start: StartServer) -> None:
    """A loop the config cannot show (through a port forward): the greeting token gives
    it away, and no credential is sent to the loop."""
    forwarder = PortForwarder()
    try:
        server = start(
            users=[ProxyUser("loop", PASSWORD, "self", "loop", PASSWORD)],
            upstreams={"self": Upstream(LOOPBACK, forwarder.port)},
        )
        forwarder.target_port = server.port("none")
        pop = poplib_connection(server.port("none"))
        pop.user("loop")
        with pytest.raises(poplib.error_proto) as refused:
            pop.pass_(PASSWORD)
        assert refused.value.args[0].startswith(b"-ERR [SYS/PERM]")
        server.wait_for_log(
            lambda records: any(r.get("msg") == "upstream_is_popproxy_itself" for r in records),
            timeout=SOCKET_TIMEOUT_SECONDS,
            what="the loop to be logged",
        )
        # The looped leg ended after the greeting: it never logged in as anyone.
        looped = server.wait_for_log(
            lambda records: sum(r.get("msg") == "session_end" for r in records) >= 1,
            timeout=SOCKET_TIMEOUT_SECONDS,
            what="the looped session's end",
        )
        ends = [r for r in looped if r.get("msg") == "session_end"]
        assert all(r.get("user") in ("-", None) for r in ends), ends
    finally:
        forwarder.close()


def test_capa_stls_and_auth_plain_through_the_proxy(
    start: StartServer, dovecot: DovecotServer, dovecot_user: DovecotUser, tls_files: TlsFiles
) -> None:
    """poplib's remaining commands: CAPA before and after STLS, and AUTH PLAIN; the
    session behind them is Dovecot's, as direct."""
    server = start_proxy(start, dovecot, [dovecot_user])
    pop = poplib_connection(server.port("starttls"))
    before = pop.capa()
    assert {"TOP", "UIDL", "RESP-CODES", "PIPELINING", "STLS"} <= set(before)
    assert pop.stls(tls_files.client_context()).startswith(b"+OK")
    after = pop.capa()
    assert "STLS" not in after
    assert after["SASL"] == ["PLAIN", "LOGIN"]
    token = base64.b64encode(f"\0{local_name(dovecot_user)}\0{PASSWORD}".encode()).decode()
    reply: bytes = pop._shortcmd(f"AUTH PLAIN {token}")  # type: ignore[attr-defined]
    assert reply.startswith(b"+OK"), reply
    assert pop.stat() == direct(dovecot, dovecot_user).stat()
    assert pop.quit().startswith(b"+OK")
