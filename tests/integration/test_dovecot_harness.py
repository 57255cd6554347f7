"""The Dovecot upstream harness itself, with no popproxy in between.

Python's poplib and the harness's streaming client talk to Dovecot directly, on each of its
three listeners, and the tests check what the proxy tests will rely on: logins on every
transport, the corpus arriving byte for byte (sha256 of every message, the 50 MB one
included), DELE + QUIT really removing files, users kept apart, and mail running as the
unprivileged account. Also what Dovecot does that a proxy must cope with: LIST sizes of
messages without a final newline, and concurrent sessions of one user.
"""

from __future__ import annotations

import os
import poplib
import re
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .dovecot import (
    MAIL_ACCOUNT,
    DovecotFailed,
    DovecotServer,
    DovecotUser,
    Ports,
    expected_digests,
    pick_free_ports,
    process_name,
    process_uid,
    session_pids,
)
from .harness import (
    LISTENER_KINDS,
    LOOPBACK,
    Corpus,
    CorpusMessage,
    StreamingPop3,
    TlsFiles,
    poplib_connection,
)

# With Dovecot's per-IP auth penalty on, the second failed login from 127.0.0.1 would wait
# at least 4 s; with it off, failures are answered on Dovecot's 0.5 s flush tick.
FAILED_LOGIN_REPLY_BOUND_SECONDS = 2.0

Connect = Callable[..., poplib.POP3]


@pytest.fixture
def connect(dovecot: DovecotServer) -> Connect:
    """Open poplib connections to a listener kind (TLS set up as it has it); closed after."""

    def _connect(kind: str, *, server: DovecotServer = dovecot) -> poplib.POP3:
        host, port = server.endpoint(kind)
        tls = server.ssl_context() if kind == "implicit" else None
        return poplib_connection(port, host=host, tls=tls)

    return _connect


@pytest.fixture
def small_user(dovecot: DovecotServer, corpus: Corpus) -> Iterator[DovecotUser]:
    """A fresh user with every corpus message but the 50 MB one."""
    user = dovecot.add_user(corpus=corpus, messages=corpus.small)
    yield user
    dovecot.remove_user(user)


def dovecot_list_size(corpus: Corpus, m: CorpusMessage) -> int:
    """What Dovecot's LIST says: the CRLF form, minus the CRLF it adds to a file without a
    final newline (RETR does send that CRLF: LIST is 2 octets short for such a message)."""
    with (corpus.root / m.relpath).open("rb") as f:
        f.seek(-1, os.SEEK_END)
        ends_with_newline = f.read(1) == b"\n"
    return m.size if ends_with_newline else m.size - 2


def uidl_map(pop: poplib.POP3) -> dict[int, str]:
    """UIDL as {message number: unique id}."""
    _, lines, _ = pop.uidl()
    return {int(n): uid.decode() for n, uid in (line.split() for line in lines)}


# ---------------------------------------------------------------------------------------------
# Transports


@pytest.mark.parametrize("kind", LISTENER_KINDS)
def test_every_listener_logs_in_with_its_transport_and_serves_the_messages(
    dovecot: DovecotServer,
    connect: Connect,
    small_user: DovecotUser,
    corpus: Corpus,
    kind: str,
) -> None:
    pop = connect(kind)
    assert pop.getwelcome().startswith(b"+OK")
    capa = pop.capa()
    # STLS only on the STLS listener (not on 127.0.0.2, not inside implicit TLS).
    assert ("STLS" in capa) == (kind == "starttls"), capa
    assert {"USER", "UIDL", "TOP", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"} <= set(capa)
    assert capa["SASL"] == ["PLAIN", "LOGIN"]
    if kind == "starttls":
        pop.stls(dovecot.ssl_context())
        assert "STLS" not in pop.capa()
    assert isinstance(pop.sock, ssl.SSLSocket) == (kind != "none")
    if isinstance(pop.sock, ssl.SSLSocket):
        assert pop.sock.version() in {"TLSv1.2", "TLSv1.3"}
    pop.user(small_user.name)
    assert pop.pass_(small_user.password).startswith(b"+OK")

    assert pop.stat() == (
        len(corpus.small),
        sum(dovecot_list_size(corpus, m) for m in corpus.small),
    )
    assert list(uidl_map(pop).values()) == [m.key for m in corpus.small]  # pop3_uidl_format %g
    for n, m in enumerate(corpus.small, start=1):
        _, lines, _ = pop.retr(n)
        assert b"".join(line + b"\r\n" for line in lines) == m.crlf, m.kind
    assert pop.quit().startswith(b"+OK")


@pytest.mark.slow
def test_uidl_list_top_and_retr_of_every_message_match_the_corpus(
    dovecot: DovecotServer, dovecot_user: DovecotUser, corpus: Corpus
) -> None:
    with StreamingPop3(dovecot.port_implicit, tls=dovecot.ssl_context(), host=dovecot.host) as c:
        c.login(dovecot_user.name, dovecot_user.password)
        listed = [line.split() for line in c.multiline("LIST")]
        uidls = [line.split() for line in c.multiline("UIDL")]
        assert [int(n) for n, _ in listed] == list(range(1, len(corpus.messages) + 1))
        # Messages are numbered in Maildir unique-name (delivery time) order, and with
        # pop3_uidl_format = %g the UIDL is that unique name.
        assert [uid.decode() for _, uid in uidls] == [m.key for m in corpus.messages]
        sizes = [int(size) for _, size in listed]
        assert sizes == [dovecot_list_size(corpus, m) for m in corpus.messages]
        # Two corpus files lack a final newline: the small one, and the big one (cut
        # mid-line at 50 MiB). For both Dovecot's LIST is 2 short of what RETR sends.
        short = {m.kind for m in corpus.messages if dovecot_list_size(corpus, m) != m.size}
        assert short == {"no-final-newline", "big"}
        for n, m in enumerate(corpus.messages, start=1):
            assert c.multiline_digest(f"RETR {n}") == (m.size, m.sha256), m.kind
            top = b"".join(line + b"\r\n" for line in c.multiline(f"TOP {n} 0"))
            assert top == m.head, m.kind
        c.command("QUIT")
    assert dovecot_user.digests() == expected_digests(corpus.messages)


# ---------------------------------------------------------------------------------------------
# Deletion


def test_dele_and_quit_remove_exactly_those_files(
    connect: Connect, small_user: DovecotUser, corpus: Corpus
) -> None:
    doomed = {corpus.small[1].key, corpus.small[4].key}
    pop = connect("starttls")
    pop.user(small_user.name)
    pop.pass_(small_user.password)
    pop.dele(2)
    pop.dele(5)
    assert small_user.keys() == {m.key for m in corpus.small}, "nothing goes before QUIT"
    assert pop.quit() == b"+OK Logging out, messages deleted."
    # QUIT answers after the expunge: the files are gone already.
    assert small_user.keys() == {m.key for m in corpus.small} - doomed
    kept = [m for m in corpus.small if m.key not in doomed]
    assert small_user.digests() == expected_digests(kept)


def test_dele_then_rset_or_a_disconnect_removes_nothing(
    dovecot: DovecotServer, connect: Connect, small_user: DovecotUser, corpus: Corpus
) -> None:
    pop = connect("none")
    pop.user(small_user.name)
    pop.pass_(small_user.password)
    pop.dele(1)
    pop.rset()
    assert pop.quit().startswith(b"+OK")

    pop = connect("none")
    pop.user(small_user.name)
    pop.pass_(small_user.password)
    pop.dele(1)
    pop.dele(2)
    pop.close()  # no QUIT
    dovecot.wait_sessions_ended(small_user, 2)
    assert small_user.digests() == expected_digests(corpus.small)


# ---------------------------------------------------------------------------------------------
# Users


def test_two_users_see_only_their_own_mail_and_passwords_do_not_cross(
    dovecot: DovecotServer, connect: Connect, small_user: DovecotUser, corpus: Corpus
) -> None:
    other = dovecot.add_user(corpus=corpus, messages=[corpus.by_kind("plain")])
    try:
        own = other.deliver(b"Subject: only for the other user\n\nhello\n")
        for user, keys in (
            (small_user, [m.key for m in corpus.small]),
            (other, [corpus.by_kind("plain").key, own]),
        ):
            pop = connect("starttls")
            pop.stls(dovecot.ssl_context())
            pop.user(user.name)
            pop.pass_(user.password)
            assert list(uidl_map(pop).values()) == keys
            pop.quit()
        # One user's password for the other: refused, and quickly every time (no penalty).
        for user, password in ((small_user, other.password), (other, small_user.password)):
            pop = connect("implicit")
            pop.user(user.name)
            started = time.monotonic()
            with pytest.raises(poplib.error_proto, match=re.escape("-ERR [AUTH]")):
                pop.pass_(password)
            assert time.monotonic() - started < FAILED_LOGIN_REPLY_BOUND_SECONDS
    finally:
        dovecot.remove_user(other)


def test_mail_runs_as_the_unprivileged_account_and_owns_every_file(
    dovecot: DovecotServer, connect: Connect, small_user: DovecotUser
) -> None:
    account = dovecot.account
    assert account.name == MAIL_ACCOUNT
    assert account.uid != 0 and account.gid != 0
    pop = connect("implicit")
    pop.user(small_user.name)
    pop.pass_(small_user.password)
    pop.retr(1)
    # The session's mail process: named pop3, running as the account, not root.
    mail_processes = [pid for pid in dovecot.pids() if process_name(pid) == "pop3"]
    assert mail_processes, [process_name(pid) for pid in dovecot.pids()]
    assert {process_uid(pid) for pid in mail_processes} == {account.uid}
    pop.quit()
    # QUIT is answered before the mail process has finished writing its index files.
    dovecot.wait_sessions_ended(small_user)

    paths = [small_user.home, *small_user.home.rglob("*")]
    # Dovecot wrote its own files (uidlist, index) as the account.
    assert (small_user.maildir / "dovecot-uidlist").is_file()
    assert any(p.name.startswith("dovecot.index") for p in paths)
    assert {(p.stat().st_uid, p.stat().st_gid) for p in paths} == {(account.uid, account.gid)}


def test_concurrent_sessions_of_one_user_are_not_locked_out(
    connect: Connect, small_user: DovecotUser, corpus: Corpus
) -> None:
    # Dovecot's default pop3_lock_session = no: a second session of one user logs in (no
    # [IN-USE]). Its listing is taken just after its "+OK Logged in." (so certainly by its
    # first reply) and kept; a message another session expunged can no longer be read.
    first, second = connect("none"), connect("starttls")
    for pop in (first, second):
        pop.user(small_user.name)
        assert pop.pass_(small_user.password) == b"+OK Logged in."
    assert second.stat()[0] == len(corpus.small)
    first.dele(1)
    assert first.quit() == b"+OK Logging out, messages deleted."
    assert second.stat()[0] == len(corpus.small)
    assert uidl_map(second)[1] == corpus.small[0].key
    with pytest.raises(poplib.error_proto, match=re.escape("-ERR Message 1 expunged.")):
        second.retr(1)
    _, lines, _ = second.retr(2)
    assert b"".join(line + b"\r\n" for line in lines) == corpus.small[1].crlf
    assert second.quit().startswith(b"+OK")
    assert small_user.keys() == {m.key for m in corpus.small[1:]}


def test_retr_marks_seen_unless_a_per_user_setting_says_otherwise(
    dovecot: DovecotServer, connect: Connect, corpus: Corpus
) -> None:
    # By default a session moves new/ files to cur/ and RETR adds the Seen flag (":2,S").
    # Per-user settings (userdb fields) reach the mail process: pop3_no_flag_updates
    # leaves the files alone.
    fresh = [m for m in corpus.small if m.subdir == "new"]
    assert fresh
    default = dovecot.add_user(corpus=corpus, messages=fresh)
    untouched = dovecot.add_user(
        corpus=corpus, messages=fresh, settings={"pop3_no_flag_updates": "yes"}
    )
    try:
        for user in (default, untouched):
            pop = connect("none")
            pop.user(user.name)
            pop.pass_(user.password)
            for n in range(1, len(fresh) + 1):
                pop.retr(n)
            pop.quit()
            dovecot.wait_sessions_ended(user)
        seen = {key: path.relative_to(default.maildir) for key, path in default.files().items()}
        assert seen == {m.key: Path("cur", m.key + ":2,S") for m in fresh}
        same = {key: path.relative_to(untouched.maildir) for key, path in untouched.files().items()}
        assert same == {m.key: Path(m.relpath) for m in fresh}
    finally:
        dovecot.remove_user(default)
        dovecot.remove_user(untouched)


# ---------------------------------------------------------------------------------------------
# Start and stop


def test_start_retries_on_a_taken_port_and_stop_leaves_no_process(tls_files: TlsFiles) -> None:
    with socket.create_server((LOOPBACK, 0)) as taken:
        taken_port = taken.getsockname()[1]
        free = pick_free_ports()
        picks = [Ports(taken_port, free.implicit, free.plain)]
        calls: list[Ports] = []

        def pick() -> Ports:
            calls.append(picks.pop(0) if picks else pick_free_ports())
            return calls[-1]

        server = DovecotServer.start(tls_files, pick_ports=pick)
    try:
        assert len(calls) == 2 and server.ports == calls[1]
        assert "Address already in use" in server.log_text()
        assert server.probe("starttls").startswith(b"+OK")
        sid = server.pid
        assert sid in session_pids(sid) and len(session_pids(sid)) > 1
        root = server.root
    finally:
        server.stop()
    assert session_pids(sid) == []
    assert not root.exists()


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_a_dovecot_that_cannot_start_fails_with_its_log_and_leaves_nothing(
    dovecot: DovecotServer, tls_files: TlsFiles
) -> None:
    assert processes_mentioning(str(dovecot.root)) == [dovecot.pid]  # the check sees one
    with pytest.raises(DovecotFailed, match="Unknown setting: no_such_setting") as failed:
        DovecotServer.start(tls_files, extra_config="no_such_setting = 1\n")
    found = re.search(r"--- dovecot log \((/\S+)\) ---", str(failed.value))
    assert found, str(failed.value)
    root = found[1]
    assert root.startswith(tempfile.gettempdir()) and root != str(dovecot.root)
    assert processes_mentioning(root) == []
    assert not Path(root).exists()
