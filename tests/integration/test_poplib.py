"""Python's poplib against the running server: every RFC 1939 command, on every listener.

The plain listener is used with allow_plaintext_auth; the STLS listener through
`POP3.stls()`; the implicit-TLS listener through `POP3_SSL`. Clients trust only the test CA.
"""

from __future__ import annotations

import base64
import hashlib
import poplib
import re
from pathlib import Path
from typing import cast

import pytest

from .conftest import StartServer
from .harness import (
    LISTENER_KINDS,
    PASSWORD,
    USER,
    Corpus,
    CorpusMessage,
    ServerProcess,
    TlsFiles,
    User,
    maildir_keys,
    poplib_connection,
)

# RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
UIDL_RE = re.compile(rb"[\x21-\x7e]{1,70}")


def connect(server: ServerProcess, kind: str, tls: TlsFiles) -> poplib.POP3:
    """A poplib connection to one listener, TLS set up (STLS or implicit) where it has it."""
    port = server.port(kind)
    match kind:
        case "none":
            return poplib_connection(port)
        case "starttls":
            pop = poplib_connection(port)
            pop.stls(tls.client_context())
            return pop
        case "implicit":
            return poplib_connection(port, tls=tls.client_context())
    raise AssertionError(kind)


def login(server: ServerProcess, kind: str, tls: TlsFiles) -> poplib.POP3:
    """Connect and log in with USER/PASS (RFC 1939 §7)."""
    pop = connect(server, kind, tls)
    assert pop.user(USER).startswith(b"+OK")
    assert pop.pass_(PASSWORD).startswith(b"+OK")
    return pop


def short(pop: poplib.POP3, command: str) -> bytes:
    """Send a command poplib has no method for (AUTH, or one out of phase); the +OK/+ line."""
    reply: bytes = pop._shortcmd(command)  # type: ignore[attr-defined]  # poplib's own helper
    return reply


def list_one(pop: poplib.POP3, n: int) -> bytes:
    """LIST n through poplib (typeshed types list() as the multi-line form only)."""
    return cast(bytes, pop.list(n))


def retr_bytes(pop: poplib.POP3, n: int) -> tuple[bytes, int]:
    """RETR n: the un-stuffed message with CRLF line ends, and poplib's octet count."""
    resp, lines, octets = pop.retr(n)
    assert resp.startswith(b"+OK"), resp
    return b"".join(line + b"\r\n" for line in lines), octets


def numbering(pop: poplib.POP3, corpus: Corpus) -> dict[int, CorpusMessage]:
    """Which corpus message each message number is, found by RETR and sha256 (all distinct)."""
    by_sha = corpus.by_sha256()
    count, _ = pop.stat()
    found: dict[int, CorpusMessage] = {}
    for n in range(1, count + 1):
        data, _ = retr_bytes(pop, n)
        sha = hashlib.sha256(data).hexdigest()
        assert sha in by_sha, f"RETR {n}: {len(data)} octets that match no corpus message"
        found[n] = by_sha[sha]
    return found


def uidl_map(pop: poplib.POP3) -> dict[int, bytes]:
    """UIDL (all): message number -> unique id."""
    resp, lines, _ = pop.uidl()
    assert resp.startswith(b"+OK"), resp
    result = {}
    for line in lines:
        num, uid = line.split(b" ")
        result[int(num)] = uid
    return result


@pytest.fixture(params=LISTENER_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Each listener kind in turn."""
    return str(request.param)


@pytest.fixture
def small_server(start: StartServer, small_maildir: Path) -> ServerProcess:
    """A server with all three listeners serving USER the `small_maildir`."""
    return start(users=[User(USER, PASSWORD, small_maildir)])


def test_capa_lists_rfc2449_capabilities_and_stls_only_before_tls(
    server: ServerProcess, tls_files: TlsFiles, kind: str
) -> None:
    pop = connect(server, kind, tls_files)
    caps = pop.capa()
    for name in ("USER", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"):
        assert name in caps, caps
    assert "PLAIN" in caps.get("SASL", []), caps
    assert "IMPLEMENTATION" in caps, caps
    # STLS is offered only where the listener can do it and TLS is not up yet (RFC 2595 §4:
    # a second STLS cannot work); connect() has already done STLS on the starttls listener.
    assert "STLS" not in caps, caps
    pop.quit()
    if kind == "starttls":
        plain = poplib_connection(server.port(kind))
        assert "STLS" in plain.capa()
        plain.quit()


@pytest.mark.slow
def test_retr_of_every_message_equals_maildir_file_with_crlf(
    server: ServerProcess, corpus: Corpus, tls_files: TlsFiles, kind: str
) -> None:
    """STAT, LIST, LIST n, UIDL, UIDL n and RETR n agree, and RETR is byte-exact (50 MB too)."""
    pop = login(server, kind, tls_files)
    count, total = pop.stat()
    assert count == len(corpus.messages)
    assert total == sum(m.size for m in corpus.messages)

    resp, lines, _ = pop.list()
    assert resp.startswith(b"+OK"), resp
    sizes = {int(n): int(size) for n, size in (line.split(b" ") for line in lines)}
    assert sorted(sizes) == list(range(1, count + 1))
    uids = uidl_map(pop)
    assert sorted(uids) == list(range(1, count + 1))
    assert len(set(uids.values())) == count, "UIDLs must be unique (RFC 1939 §7)"

    by_sha = corpus.by_sha256()
    seen = set()
    for n in range(1, count + 1):
        assert list_one(pop, n) == b"+OK %d %d" % (n, sizes[n])
        assert pop.uidl(n) == b"+OK %d %s" % (n, uids[n])
        assert UIDL_RE.fullmatch(uids[n]), uids[n]
        data, octets = retr_bytes(pop, n)
        message = by_sha.get(hashlib.sha256(data).hexdigest())
        assert message is not None, f"RETR {n} matches no message ({len(data)} octets)"
        assert octets == len(data) == sizes[n] == message.size, (message.kind, sizes[n])
        seen.add(message.key)
    assert seen == {m.key for m in corpus.messages}
    assert pop.quit().startswith(b"+OK")


def test_top_sends_header_blank_line_and_n_body_lines(
    small_server: ServerProcess, corpus: Corpus, tls_files: TlsFiles
) -> None:
    pop = login(small_server, "none", tls_files)
    for n, message in numbering(pop, corpus).items():
        for body_lines in (0, 1, 3, 10_000):
            resp, lines, _ = pop.top(n, body_lines)
            assert resp.startswith(b"+OK"), resp
            got = b"".join(line + b"\r\n" for line in lines)
            assert got == message.top(body_lines), (message.kind, body_lines)
    pop.quit()


def test_uidls_are_stable_across_sessions_and_listeners(
    small_server: ServerProcess, small_maildir: Path, tls_files: TlsFiles
) -> None:
    listings = []
    for kind in LISTENER_KINDS:
        pop = login(small_server, kind, tls_files)
        listings.append(uidl_map(pop))
        pop.quit()
    assert len(listings[0]) == len(maildir_keys(small_maildir))
    assert listings[0] == listings[1] == listings[2]


def test_noop_dele_rset_then_quit_deletes_nothing(
    small_server: ServerProcess, small_maildir: Path, tls_files: TlsFiles
) -> None:
    before = maildir_keys(small_maildir)
    pop = login(small_server, "starttls", tls_files)
    count, total = pop.stat()
    size1 = int(list_one(pop, 1).split()[2])
    assert pop.noop().startswith(b"+OK")
    assert pop.dele(1).startswith(b"+OK")
    # RFC 1939 §5: deleted messages are not counted by STAT, not listed, not retrievable.
    assert pop.stat() == (count - 1, total - size1)
    for command in (pop.retr, pop.list, pop.dele):
        with pytest.raises(poplib.error_proto, match="-ERR"):
            command(1)
    with pytest.raises(poplib.error_proto, match=r"-ERR"):
        pop.top(1, 0)
    _, lines, _ = pop.list()
    assert [int(line.split()[0]) for line in lines] == list(range(2, count + 1))
    assert pop.rset().startswith(b"+OK")
    assert pop.stat() == (count, total)
    assert pop.quit().startswith(b"+OK")
    assert maildir_keys(small_maildir) == before


def test_dele_then_quit_removes_exactly_that_file_from_the_maildir(
    small_server: ServerProcess, small_maildir: Path, corpus: Corpus, tls_files: TlsFiles
) -> None:
    before = maildir_keys(small_maildir)
    pop = login(small_server, "implicit", tls_files)
    numbers = numbering(pop, corpus)
    uids = uidl_map(pop)
    victim = 2
    assert pop.dele(victim).startswith(b"+OK")
    assert pop.quit().startswith(b"+OK")
    # The deletion is committed before QUIT is answered (RFC 1939 §6): no waiting here.
    assert maildir_keys(small_maildir) == before - {numbers[victim].key}

    pop = login(small_server, "implicit", tls_files)
    assert pop.stat()[0] == len(before) - 1
    left = set(uidl_map(pop).values())
    assert left == set(uids.values()) - {uids[victim]}
    pop.quit()


def test_dele_then_disconnect_without_quit_deletes_nothing(
    small_server: ServerProcess, small_maildir: Path, tls_files: TlsFiles
) -> None:
    before = maildir_keys(small_maildir)
    pop = login(small_server, "none", tls_files)
    count, _ = pop.stat()
    for n in range(1, count + 1):
        assert pop.dele(n).startswith(b"+OK")
    pop.close()  # no QUIT: the session ends in AUTHORIZATION/TRANSACTION, never UPDATE
    ends = small_server.wait_sessions_ended(1)
    assert ends[-1].get("result") == "eof", ends[-1]
    assert (ends[-1].get("marked"), ends[-1].get("deleted_local")) == (str(count), "0"), ends[-1]
    assert maildir_keys(small_maildir) == before
    pop = login(small_server, "none", tls_files)
    assert pop.stat()[0] == count
    pop.quit()


def test_wrong_password_gets_auth_response_code_and_session_goes_on(
    small_server: ServerProcess, tls_files: TlsFiles
) -> None:
    pop = connect(small_server, "starttls", tls_files)
    assert pop.user(USER).startswith(b"+OK")
    with pytest.raises(poplib.error_proto) as failed:
        pop.pass_("not the password")
    reply = failed.value.args[0]
    assert reply.startswith(b"-ERR [AUTH]"), reply  # RFC 3206 §4
    assert PASSWORD.encode() not in reply
    # The same connection may try again (RFC 1939 §7 leaves the session in AUTHORIZATION).
    assert pop.user(USER).startswith(b"+OK")
    assert pop.pass_(PASSWORD).startswith(b"+OK")
    assert pop.stat()[0] > 0
    pop.quit()


def test_unknown_user_gets_the_same_auth_reply_as_a_wrong_password(
    small_server: ServerProcess, tls_files: TlsFiles
) -> None:
    replies = []
    for user, password in ((USER, "wrong"), ("nobody-here", PASSWORD)):
        pop = connect(small_server, "none", tls_files)
        assert pop.user(user).startswith(b"+OK")  # USER does not tell who exists
        with pytest.raises(poplib.error_proto) as failed:
            pop.pass_(password)
        replies.append(failed.value.args[0])
        pop.quit()
    assert replies[0] == replies[1]
    assert replies[0].startswith(b"-ERR [AUTH]")


@pytest.mark.parametrize("initial_response", [True, False], ids=["initial", "continuation"])
def test_auth_plain_logs_in(
    small_server: ServerProcess, tls_files: TlsFiles, initial_response: bool
) -> None:
    """AUTH PLAIN (RFC 5034 §4, RFC 4616) with an initial response and with a continuation."""
    pop = connect(small_server, "implicit", tls_files)
    token = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode()).decode()
    if initial_response:
        assert short(pop, f"AUTH PLAIN {token}").startswith(b"+OK")
    else:
        assert short(pop, "AUTH PLAIN").startswith(b"+ ")
        assert short(pop, token).startswith(b"+OK")
    assert pop.stat()[0] == len(uidl_map(pop))
    pop.quit()


def test_auth_plain_with_a_wrong_password_gets_auth_response_code(
    small_server: ServerProcess, tls_files: TlsFiles
) -> None:
    pop = connect(small_server, "implicit", tls_files)
    token = base64.b64encode(b"\0" + USER.encode() + b"\0wrong").decode()
    with pytest.raises(poplib.error_proto) as failed:
        short(pop, f"AUTH PLAIN {token}")
    assert failed.value.args[0].startswith(b"-ERR [AUTH]")
    pop.quit()


def test_plaintext_login_needs_stls_when_plaintext_auth_is_off(
    start: StartServer, maildir: Path, tls_files: TlsFiles
) -> None:
    server = start(
        users=[User(USER, PASSWORD, maildir)],
        listeners=["starttls"],
        allow_plaintext_auth=False,
    )
    pop = poplib_connection(server.port("starttls"))
    with pytest.raises(poplib.error_proto, match="-ERR"):
        pop.user(USER)
        pop.pass_(PASSWORD)
    pop.close()
    pop = poplib_connection(server.port("starttls"))
    pop.stls(tls_files.client_context())
    assert pop.user(USER).startswith(b"+OK")
    assert pop.pass_(PASSWORD).startswith(b"+OK")
    pop.quit()


def test_transaction_commands_before_login_get_err_and_session_goes_on(
    small_server: ServerProcess, tls_files: TlsFiles
) -> None:
    """RFC 1939 §5: these are TRANSACTION-state commands; before login they get -ERR."""
    for command in ("STAT", "LIST", "UIDL", "RETR 1", "DELE 1", "RSET", "TOP 1 0", "NOOP"):
        pop = connect(small_server, "none", tls_files)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            short(pop, command)
        assert pop.user(USER).startswith(b"+OK"), command
        assert pop.pass_(PASSWORD).startswith(b"+OK"), command
        assert pop.quit().startswith(b"+OK"), command
