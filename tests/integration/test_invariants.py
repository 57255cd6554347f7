"""DESIGN.md "Invariants", each tried against the real running server over real sockets.

Every test is named after the invariant it tries to break (DESIGN.md, Testing habit 10).
The foundation serves local Maildirs only (no upstream yet), so invariant 1 is the
"only the client's QUIT deletes" half, and a "lost" message is a Maildir file that is
gone or changed: each test compares the set of files under new/ and cur/ and the sha256
of every file before and after.

The client here is raw: bytes out, lines in, so bad input goes to the server exactly as
written and every reply line is seen (poplib would refuse or rewrite much of this).
"""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pop3client import SocketPop3

from .conftest import StartServer
from .harness import (
    PASSWORD,
    READ_CHUNK_BYTES,
    SOCKET_TIMEOUT_SECONDS,
    USER,
    Corpus,
    CorpusMessage,
    RssSampler,
    ServerProcess,
    TlsFiles,
    User,
)

# A reply or message line longer than this is a broken server (the corpus's longest line
# is ~12 KB); it also bounds what the test process reads per line.
MAX_LINE_BYTES = 1 << 20
# How long a session's end may take to show up as `msg=session_end` in the log.
SESSION_END_TIMEOUT_SECONDS = 10.0
# The idle timeout written into the config for the idle-timeout case (RFC 1939 §3's ten
# minutes is the default; the config accepts any positive number).
IDLE_TIMEOUT_SECONDS = 2.0
# How late the server's goodbye may arrive after the idle timeout: its timer firing and
# one short write, on a loaded 2-vCPU machine. Half the timeout: a server that waited
# twice as long, or for the login deadline, fails.
IDLE_TIMEOUT_SLACK_SECONDS = 1.0
# The shutdown grace for the SIGTERM case: shorter than the test's own patience, so the
# session is cancelled rather than left to end by itself.
SHUTDOWN_GRACE_SECONDS = 0.5
# The server's consecutive bad-command budget (config `limits.max_bad_commands`, default).
MAX_BAD_COMMANDS = 10
# "A few MB": how much the server's RSS may grow over a flood of bad input.
MAX_FLOOD_RSS_GROWTH_KIB = 5 * 1024


# ---------------------------------------------------------------------------------------------
# A raw POP3 client


class Wire(SocketPop3):
    """A raw client (tests/pop3client.py) that records every status line it reads, for
    the secret checks, and hashes multi-line bodies as they stream."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(
            port,
            tls=tls,
            greet=False,
            timeout=SOCKET_TIMEOUT_SECONDS,
            max_line_bytes=MAX_LINE_BYTES,
        )
        self.replies: list[bytes] = []  # every status line received, for secret checks
        self.greeting = self.status()
        assert self.greeting.startswith(b"+OK"), self.greeting

    def status(self) -> bytes:
        """The next status line (+OK, -ERR or a SASL "+ " challenge), recorded."""
        line = self.line()
        self.replies.append(line)
        return line

    def cmd(self, line: bytes | str) -> bytes:
        """Send one command line (CRLF added) and return its status line, recorded."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.status()

    def ok(self, line: bytes | str) -> bytes:
        """A command that must get +OK."""
        reply = self.cmd(line)
        assert reply.startswith(b"+OK"), (line, reply)
        return reply

    def err(self, line: bytes | str) -> bytes:
        """A command that must get -ERR."""
        reply = self.cmd(line)
        assert reply.startswith(b"-ERR"), (line, reply)
        return reply

    def body_digest(self, keep: int = 0) -> tuple[int, str, bytes, int]:
        """A multi-line body read as it streams: (octets, sha256, first `keep` octets,
        number of stuffed lines), all of the un-stuffed CRLF form."""
        h = hashlib.sha256()
        size = stuffed = 0
        prefix = bytearray()
        while (raw := self.line()) != b".":  # `Closed` if the body ends without it
            if raw.startswith(b"."):
                # RFC 1939 §3: a stuffed line is "." + a line that itself starts with ".".
                assert raw.startswith(b".."), f"an unstuffed line starting with '.': {raw[:80]!r}"
                raw = raw[1:]
                stuffed += 1
            raw += b"\r\n"
            h.update(raw)
            size += len(raw)
            if len(prefix) < keep:
                prefix += raw[: keep - len(prefix)]
        return size, h.hexdigest(), bytes(prefix), stuffed

    def login(self, user: str = USER, password: str = PASSWORD) -> bytes:
        """USER/PASS (RFC 1939 §7), each of which must get +OK; the reply to PASS."""
        self.ok(f"USER {user}")
        return self.ok(f"PASS {password}")

    def uidls(self) -> dict[int, str]:
        """UIDL (all): message number -> unique id."""
        self.ok("UIDL")
        pairs = (line.split(b" ") for line in self.body())
        return {int(n): uid.decode("ascii") for n, uid in pairs}


# ---------------------------------------------------------------------------------------------
# Maildir snapshots and fixtures


def file_sha256(path: Path) -> str:
    """sha256 of a file's octets, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def snapshot(maildir: Path) -> dict[str, str]:
    """Every message file of a Maildir ("new/NAME", "cur/NAME:2,FLAGS") -> sha256."""
    return {
        f"{sub}/{p.name}": file_sha256(p)
        for sub in ("new", "cur")
        for p in sorted((maildir / sub).iterdir())
    }


def deliver(maildir: Path, unique: str, data: bytes, *, subdir: str = "new") -> Path:
    """Deliver as maildir(5) says: write under tmp/, then rename into new/ (or cur/)."""
    tmp = maildir / "tmp" / unique
    tmp.write_bytes(data)
    name = unique if subdir == "new" else unique + ":2,"
    dest = maildir / subdir / name
    tmp.rename(dest)
    return dest


def session_ends(server: ServerProcess, count: int) -> list[dict[str, str]]:
    """The `msg=session_end` records once there are `count` of them."""
    return server.wait_sessions_ended(count, timeout=SESSION_END_TIMEOUT_SECONDS)


def by_uid(corpus: Corpus) -> dict[str, CorpusMessage]:
    """Corpus messages by the UIDL the Maildir gives them: the unique name (valid as is)."""
    return {m.key: m for m in corpus.messages}


# ---------------------------------------------------------------------------------------------
# Invariants 1 and 2: only QUIT deletes; a session ended otherwise records no deletion

# Each way a logged-in session can end other than QUIT, and the result it must log.
ENDINGS = {
    "fin": "eof",
    "rst": "eof",
    "quit-without-line-end": "eof",
    "fin-mid-pipeline": "eof",
    "sigterm": "shutdown",
    "idle-timeout": "timeout",
    "bad-commands": "protocol_error",
}
DELETED_NUMBERS = (1, 3, 4, 6)


def end_session_without_quit(
    start: StartServer, maildir: Path, ending: str, tls_files: TlsFiles
) -> tuple[ServerProcess, dict[str, str]]:
    """Log in (on TLS for half the cases), DELE several messages, end the session the
    `ending` way; return the server and the session's `session_end` record."""
    limits: dict[str, float | int] = {"shutdown_grace_seconds": SHUTDOWN_GRACE_SECONDS}
    if ending == "idle-timeout":
        limits["idle_timeout_seconds"] = IDLE_TIMEOUT_SECONDS
    server = start(users=[User(USER, PASSWORD, maildir)], limits=limits)
    tls = ending in ("rst", "sigterm", "bad-commands")
    pop = Wire(
        server.port("implicit" if tls else "none"),
        tls=tls_files.client_context() if tls else None,
    )
    with pop:
        pop.login()
        count = int(pop.ok("STAT").split()[1])
        for n in DELETED_NUMBERS:
            pop.ok(f"DELE {n}")
        assert int(pop.ok("STAT").split()[1]) == count - len(DELETED_NUMBERS)
        pop.err(f"RETR {DELETED_NUMBERS[0]}")
        match ending:
            case "fin":
                pop.close()
            case "rst":
                pop.reset()
            case "quit-without-line-end":
                pop.send(b"QUIT")  # no CRLF: not a command yet (RFC 1939 §3)
                pop.sock.shutdown(socket.SHUT_WR)
                assert pop.at_eof()
            case "fin-mid-pipeline":
                pop.send(b"RSET\r\nDELE 2\r\nRETR 5\r\nNOOP\r\nQU")
                pop.close()
            case "sigterm":
                assert server.stop() == 0
                assert pop.at_eof()
            case "idle-timeout":
                # Half the timeout passes, then a command: the timeout counts from the
                # last command (sent after `started`), not from the login.
                time.sleep(IDLE_TIMEOUT_SECONDS / 2)
                started = time.monotonic()
                pop.ok("NOOP")
                reply = pop.status()  # the server speaks first, then closes
                waited = time.monotonic() - started
                assert reply == b"-ERR Disconnected for inactivity.", reply
                assert waited >= IDLE_TIMEOUT_SECONDS, waited
                assert waited < IDLE_TIMEOUT_SECONDS + IDLE_TIMEOUT_SLACK_SECONDS, waited
                assert pop.at_eof()
            case "bad-commands":
                for _ in range(MAX_BAD_COMMANDS - 1):
                    pop.err("XYZZY")
                assert pop.err("XYZZY") == b"-ERR Too many bad commands, closing"
                assert pop.at_eof()
            case _:
                raise AssertionError(ending)
    ends = session_ends(server, 1)
    assert len(ends) == 1, ends
    return server, ends[0]


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_invariant_1_no_message_is_lost_when_a_session_ends_without_quit(
    start: StartServer, small_maildir: Path, tls_files: TlsFiles, ending: str
) -> None:
    before = snapshot(small_maildir)
    server, _ = end_session_without_quit(start, small_maildir, ending, tls_files)
    assert snapshot(small_maildir) == before
    if ending != "sigterm":
        # The marks died with the session: a new one sees every message.
        with Wire(server.port("none")) as pop:
            pop.login()
            assert int(pop.ok("STAT").split()[1]) == len(before)
            pop.ok("QUIT")
        assert snapshot(small_maildir) == before


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_invariant_2_a_session_without_quit_records_nothing_deleted(
    start: StartServer, small_maildir: Path, tls_files: TlsFiles, ending: str
) -> None:
    server, end = end_session_without_quit(start, small_maildir, ending, tls_files)
    assert end.get("result") == ENDINGS[ending], end
    assert (end.get("deleted_local"), end.get("deleted_upstream"), end.get("hidden")) == (
        "0",
        "0",
        "0",
    ), end
    assert end.get("user") == USER, end
    if ending == "sigterm":
        assert server.records("stopped"), server.log_text()


# Command sequences (command, +OK expected) before QUIT, and the numbers QUIT must delete.
QUIT_SEQUENCES: dict[str, tuple[list[tuple[str, bool]], set[int]]] = {
    "dele-rset-dele": ([("DELE 1", True), ("DELE 2", True), ("RSET", True), ("DELE 3", True)], {3}),
    "repeats-and-misses": (
        [
            ("DELE 2", True),
            ("DELE 2", False),  # already marked (RFC 1939 §5)
            ("DELE 4", True),
            ("RSET", True),
            ("DELE 4", True),
            ("DELE 6", True),
            ("DELE 7", False),  # no such message
            ("DELE 0", False),
            ("RETR 6", False),
            ("LIST 4", False),
        ],
        {4, 6},
    ),
    "all-then-rset": ([*((f"DELE {n}", True) for n in range(1, 7)), ("RSET", True)], set()),
    "rset-then-all": (
        [("RSET", True), *((f"DELE {n}", True) for n in range(1, 7))],
        set(range(1, 7)),
    ),
    "nothing": ([("NOOP", True)], set()),
}


@pytest.mark.parametrize("pipelined", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("sequence", list(QUIT_SEQUENCES))
def test_invariant_1_dele_then_quit_deletes_exactly_the_marked_messages(
    start: StartServer,
    small_maildir: Path,
    corpus: Corpus,
    sequence: str,
    pipelined: bool,
) -> None:
    commands, marked = QUIT_SEQUENCES[sequence]
    before = snapshot(small_maildir)
    server = start(users=[User(USER, PASSWORD, small_maildir)], listeners=["none"])
    messages = by_uid(corpus)
    with Wire(server.port("none")) as pop:
        pop.login()
        uids = pop.uidls()
        assert len(uids) == len(before)
        if pipelined:
            pop.send(b"".join(c.encode() + b"\r\n" for c, _ in [*commands, ("QUIT", True)]))
            replies = []
            for command, _ in [*commands, ("QUIT", True)]:
                replies.append(pop.status())
                if command.startswith(("RETR", "LIST ")) and replies[-1].startswith(b"+OK"):
                    pop.body()
        else:
            replies = [pop.cmd(c) for c, _ in commands]
            replies.append(pop.cmd("QUIT"))
        for (command, ok), reply in zip([*commands, ("QUIT", True)], replies, strict=True):
            assert reply.startswith(b"+OK" if ok else b"-ERR"), (command, reply)
        assert pop.at_eof()
    gone = {messages[uids[n]].relpath for n in marked}
    # Deleted before +OK to QUIT (RFC 1939 §6): no waiting.
    assert snapshot(small_maildir) == {k: v for k, v in before.items() if k not in gone}
    (end,) = session_ends(server, 1)
    assert (end.get("result"), end.get("marked"), end.get("deleted_local")) == (
        "quit",
        str(len(marked)),
        str(len(marked)),
    ), end


def test_invariant_1_a_second_session_cannot_delete_behind_the_first(
    start: StartServer, small_maildir: Path, corpus: Corpus
) -> None:
    """While one session holds the maildrop, a second login gets [IN-USE] (RFC 2449 §8.1.1)
    or, if let in, its QUIT deletes only its own marks: never the first session's."""
    before = snapshot(small_maildir)
    server = start(users=[User(USER, PASSWORD, small_maildir)], listeners=["none"])
    messages = by_uid(corpus)
    with Wire(server.port("none")) as first, Wire(server.port("none")) as second:
        first.login()
        uids = first.uidls()
        first.ok("DELE 1")
        second.ok(f"USER {USER}")
        reply = second.cmd(f"PASS {PASSWORD}")
        marked = {2} if reply.startswith(b"+OK") else set()
        if marked:
            second.ok("DELE 2")
            second.ok("QUIT")
        else:
            assert reply.startswith(b"-ERR [IN-USE]"), reply
            second.close()
        first.close()  # no QUIT: message 1 stays
    session_ends(server, 2)
    gone = {messages[uids[n]].relpath for n in marked}
    assert snapshot(small_maildir) == {k: v for k, v in before.items() if k not in gone}


# ---------------------------------------------------------------------------------------------
# Invariant 3: a UIDL never names different content


def uid_contents(pop: Wire) -> dict[str, str]:
    """UIDL -> sha256 of what RETR sends, for every message of the session."""
    result = {}
    for n, uid in pop.uidls().items():
        pop.ok(f"RETR {n}")
        _, sha, _, _ = pop.body_digest()
        assert uid not in result, f"UIDL {uid} twice in one listing"
        result[uid] = sha
    return result


def test_invariant_3_a_uidl_never_names_different_content_across_sessions(
    start: StartServer, small_maildir: Path, corpus: Corpus
) -> None:
    server = start(users=[User(USER, PASSWORD, small_maildir)], listeners=["none"])
    history: dict[str, str] = {}  # every UIDL the client was ever shown -> content

    def session(dele: Sequence[int] = ()) -> dict[str, str]:
        with Wire(server.port("none")) as pop:
            pop.login()
            seen = uid_contents(pop)
            numbers = pop.uidls()
            for n in dele:
                pop.ok(f"DELE {n}")
            pop.ok("QUIT")
        for uid, sha in seen.items():
            assert history.get(uid, sha) == sha, f"UIDL {uid} now names other content"
        history.update(seen)
        return {numbers[n]: seen[numbers[n]] for n in dele}

    first = session(dele=[1, 2])
    assert len(first) == 2
    # Deliveries after the deletions: one new message has the content of a deleted one
    # (it must get a new UIDL, not the old one back), one has no trailing newline.
    deleted_bytes = by_uid(corpus)[next(iter(first))].crlf  # the first deleted message's octets
    assert deleted_bytes is not None
    stamp = 1_764_190_000
    deliver(small_maildir, f"{stamp}.M1P99.delivered", deleted_bytes)
    deliver(small_maildir, f"{stamp + 1}.M2P99.delivered", b"Subject: x\n\nno newline")
    deliver(small_maildir, f"{stamp + 2}.M3P99.delivered", b"Subject: y\n\ncur\n", subdir="cur")
    # Another program reads mail: new/ -> cur/ with flags, and a flag change in cur/.
    moved = next((small_maildir / "new").iterdir())
    moved.rename(small_maildir / "cur" / (moved.name + ":2,S"))
    flagged = next(p for p in (small_maildir / "cur").iterdir() if p.name.endswith(":2,S"))
    flagged.rename(flagged.with_name(flagged.name.replace(":2,S", ":2,FRS")))
    before_second = set(history)
    second = session(dele=[1])
    new_uids = set(history) - before_second
    assert len(new_uids) == 3, new_uids
    # A second delivery of the first deleted message's content, and another round.
    deliver(small_maildir, f"{stamp + 3}.M4P99.delivered", deleted_bytes)
    session()
    # Deleted UIDLs never come back in a later listing, whatever was delivered since.
    with Wire(server.port("none")) as pop:
        pop.login()
        final = set(pop.uidls().values())
        pop.ok("QUIT")
    assert not final & (set(first) | set(second))


def test_invariant_3_duplicate_unique_names_do_not_swap_uidls(
    start: StartServer, small_maildir: Path
) -> None:
    """Two files with one unique name (a restored backup, a copy between Maildirs).
    Whatever happens to the pair afterwards (another program moves the new/ one to cur/,
    as every reader does; the first copy is deleted), a UIDL must keep naming the content
    it named, and a deleted message's UIDL never comes back."""
    unique = "1764195000.M1P77.dup"
    a = deliver(small_maildir, unique, b"Subject: A\n\nfirst copy\n", subdir="cur")
    a = a.rename(a.with_name(unique + ":2,S"))
    deliver(small_maildir, unique, b"Subject: B\n\nsecond, different\n")
    server = start(users=[User(USER, PASSWORD, small_maildir)], listeners=["none"])
    with Wire(server.port("none")) as pop:
        pop.login()
        first = uid_contents(pop)
        pop.ok("QUIT")
    # The server renamed the later copy, as Dovecot does: the names are unique on disk.
    names = [
        p.name.split(":")[0] for sub in ("new", "cur") for p in (small_maildir / sub).iterdir()
    ]
    assert len(names) == len(set(names))
    # Another program reads new/ and moves what it found to cur/, whatever the name.
    for path in list((small_maildir / "new").iterdir()):
        if path.read_bytes() == b"Subject: B\n\nsecond, different\n":
            path.rename(small_maildir / "cur" / (path.name + ":2,"))
    with Wire(server.port("none")) as pop:
        pop.login()
        second = uid_contents(pop)
        # and the first copy goes away: its UIDL must not pass to the second one
        number = next(n for n, uid in pop.uidls().items() if uid == unique)
        pop.ok(f"DELE {number}")
        pop.ok("QUIT")
    with Wire(server.port("none")) as pop:
        pop.login()
        third = uid_contents(pop)
        pop.ok("QUIT")
    assert unique not in third
    for later in (second, third):
        changed = {uid for uid in first.keys() & later.keys() if first[uid] != later[uid]}
        assert not changed, f"UIDLs that now name other content: {sorted(changed)}"
    assert first.keys() - {unique} == third.keys()


# ---------------------------------------------------------------------------------------------
# Invariant 4: every byte reaches the client exactly


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "implicit"])
def test_invariant_4_every_byte_reaches_the_client_exactly(
    server: ServerProcess, corpus: Corpus, tls_files: TlsFiles, kind: str
) -> None:
    tls = tls_files.client_context() if kind == "implicit" else None
    messages = by_uid(corpus)
    with Wire(server.port(kind), tls=tls) as pop:
        pop.login()
        stat = pop.ok("STAT").split()
        pop.ok("LIST")
        listing = {int(n): int(size) for n, size in (line.split() for line in pop.body())}
        assert (int(stat[1]), int(stat[2])) == (len(listing), sum(listing.values()))
        uids = pop.uidls()
        assert sorted(uids) == sorted(listing) == list(range(1, len(corpus.messages) + 1))
        stuffed_total = 0
        for n, uid in uids.items():
            message = messages[uid]
            assert pop.ok(f"LIST {n}") == b"+OK %d %d" % (n, message.size)
            assert listing[n] == message.size, message.kind
            reply = pop.ok(f"RETR {n}")
            assert reply == b"+OK %d octets" % message.size, (message.kind, reply)
            size, sha, prefix, stuffed = pop.body_digest(keep=len(message.head))
            assert (size, sha) == (message.size, message.sha256), message.kind
            stuffed_total += stuffed
            if message.crlf is not None:
                expected = sum(line.startswith(b".") for line in message.crlf.split(b"\r\n"))
                assert stuffed == expected, message.kind
            pop.ok(f"TOP {n} 0")
            top = b"".join(line + b"\r\n" for line in pop.body())
            assert top == message.head == prefix, message.kind
        assert stuffed_total > 1000  # the 50 MB message is full of dot lines
        pop.ok("QUIT")


# ---------------------------------------------------------------------------------------------
# Invariant 5: bad input gets -ERR, the server goes on, memory stays bounded

# Bad command lines in TRANSACTION (each must get -ERR; NOOP after each shows the session
# goes on and resets the bad-command budget). Messages 1..6 exist.
BAD_IN_TRANSACTION: list[bytes] = [
    b"NO\0OP",
    b"NOOP\0",
    b"STAT\xff",
    b"\xc3\xa9TAT",
    b"LIST 1\0",
    b"NOOP\rQUIT",  # a CR inside the line is not a line end
    b"DELE 1\rQUIT",
    b"",
    b" ",
    b"XYZZY",
    b"LIST 1 2",
    b"STAT 1",
    *(
        verb + b" " + number
        for verb in (b"RETR", b"DELE", b"LIST", b"UIDL", b"TOP")
        for number in (
            b"0",
            b"-1",
            b"+1",
            b"01",
            b"1x",
            b"0x1",
            b"1.0",
            b"\xd9\xa1",  # ARABIC-INDIC DIGIT ONE: not an ASCII digit
            b"%d" % (2**31),
            b"%d" % (2**32 + 1),
            b"%d" % (2**64 + 1),
            b"9" * 300,
            b"7",  # no such message
        )
    ),
    b"RETR",
    b"DELE",
    b"TOP 1",
    b"TOP 1 -1",
    b"TOP 1 x",
    b"TOP 1 %d" % (2**64 + 1),
    b"RETR  1",
    # Wrong phase: AUTHORIZATION commands after login.
    b"USER " + USER.encode(),
    b"PASS " + PASSWORD.encode(),
    b"APOP " + USER.encode() + b" 0123456789abcdef0123456789abcdef",
    b"AUTH PLAIN",
    b"STLS",
]
# Bad command lines in AUTHORIZATION (CAPA after each).
BAD_IN_AUTHORIZATION: list[bytes] = [
    b"STAT",
    b"LIST",
    b"RETR 1",
    b"DELE 1",
    b"TOP 1 0",
    b"UIDL",
    b"RSET",
    b"NOOP",
    b"PASS " + PASSWORD.encode(),  # no USER first
    b"USER",
    b"AUTH NOSUCHMECH",
    b"AUTH PLAIN !!!notbase64",
    b"US\0ER " + USER.encode(),
    b"USER \xff\xfe",
]


@pytest.fixture
def flood_server(start: StartServer, small_maildir: Path) -> ServerProcess:
    """A server on the small Maildir, plain listener only."""
    return start(users=[User(USER, PASSWORD, small_maildir)], listeners=["none"])


def fresh_session_retrieves(server: ServerProcess, corpus: Corpus) -> None:
    """A new session logs in and RETRs every message byte-exact: the server went on."""
    messages = by_uid(corpus)
    with Wire(server.port("none")) as pop:
        pop.login()
        for n, uid in pop.uidls().items():
            pop.ok(f"RETR {n}")
            size, sha, _, _ = pop.body_digest()
            assert (size, sha) == (messages[uid].size, messages[uid].sha256)
        pop.ok("QUIT")


@pytest.fixture
def rss_guard(flood_server: ServerProcess) -> Iterator[None]:
    """Fails the test if the server's RSS peaks more than a few MB above its warm level."""
    with Wire(flood_server.port("none")) as pop:  # warm up: code paths and buffers exist
        pop.login()
        pop.uidls()
        pop.ok("QUIT")
    before = flood_server.rss_kib()
    with RssSampler(flood_server.pid) as sampler:
        yield
    growth = sampler.peak_kib - before
    assert growth < MAX_FLOOD_RSS_GROWTH_KIB, f"RSS {before} KiB, peak +{growth} KiB"


def test_invariant_5_malformed_commands_get_err_and_the_session_goes_on(
    flood_server: ServerProcess, corpus: Corpus, rss_guard: None
) -> None:
    with Wire(flood_server.port("none")) as pop:
        for line in BAD_IN_AUTHORIZATION:
            assert pop.cmd(line).startswith(b"-ERR"), line
            assert pop.cmd("CAPA").startswith(b"+OK"), line
            pop.body()
        pop.login()
        for line in BAD_IN_TRANSACTION:
            assert pop.cmd(line).startswith(b"-ERR"), line
            assert pop.cmd("NOOP").startswith(b"+OK"), line
        assert int(pop.ok("STAT").split()[1]) == len(corpus.small)  # no DELE got through
        pop.ok("QUIT")
    fresh_session_retrieves(flood_server, corpus)


@pytest.mark.parametrize("phase", ["authorization", "transaction"])
def test_invariant_5_overlong_input_gets_one_err_and_memory_stays_bounded(
    flood_server: ServerProcess, corpus: Corpus, rss_guard: None, phase: str
) -> None:
    with Wire(flood_server.port("none")) as pop:
        if phase == "transaction":
            pop.login()
        # 10 MB without a line end: one -ERR for the line, the rest discarded (RFC 2449 §4).
        flood = b"A" * READ_CHUNK_BYTES
        for _ in range(10):
            pop.send(flood)
        pop.send(b"\r\n")
        assert pop.status() == b"-ERR Line too long"
        # 100 KB lines, each its own -ERR; a good command between keeps the budget.
        for _ in range(20):
            reply = pop.cmd(b"NOOP " + b"x" * 100_000)
            assert reply == b"-ERR Line too long", reply
            good = "NOOP" if phase == "transaction" else "CAPA"
            assert pop.cmd(good).startswith(b"+OK")
            if good == "CAPA":
                pop.body()
        # A too-long line that ends in a valid command must not run that command.
        pop.send(b"x" * 300 + b"DELE 1\r\n")
        assert pop.status() == b"-ERR Line too long"
        if phase == "transaction":
            assert int(pop.ok("STAT").split()[1]) == len(corpus.small)
        pop.ok("QUIT")
    fresh_session_retrieves(flood_server, corpus)


def test_invariant_5_pipelined_bad_commands_spend_the_budget_then_the_session_closes(
    flood_server: ServerProcess, small_maildir: Path, corpus: Corpus, rss_guard: None
) -> None:
    before = snapshot(small_maildir)
    with Wire(flood_server.port("none")) as pop:
        pop.login()
        pop.ok("DELE 1")
        pop.send(b"XYZZY\r\n" * 500)
        replies = [pop.status() for _ in range(MAX_BAD_COMMANDS)]
        assert all(r.startswith(b"-ERR") for r in replies), replies
        assert replies[-1] == b"-ERR Too many bad commands, closing"
        assert pop.at_eof()
    (end,) = session_ends(flood_server, 2)[1:]
    assert (end.get("result"), end.get("deleted_local")) == ("protocol_error", "0"), end
    assert snapshot(small_maildir) == before
    fresh_session_retrieves(flood_server, corpus)


def test_invariant_5_500_pipelined_commands_are_answered_in_order(
    flood_server: ServerProcess, corpus: Corpus, rss_guard: None
) -> None:
    count = len(corpus.small)
    commands: list[tuple[bytes, str]] = []  # (line, expected: "ok", "multi" or "err")
    for i in range(500):
        n = i % count + 1
        match i % 7:
            case 0:
                commands.append((b"STAT", "ok"))
            case 1:
                commands.append((b"LIST %d" % n, "ok"))
            case 2:
                commands.append((b"UIDL", "multi"))
            case 3:
                commands.append((b"TOP %d 0" % n, "multi"))
            case 4:
                commands.append((b"RETR %d" % (count + 1), "err"))
            case 5:
                commands.append((b"BOGUS", "err"))
            case _:
                commands.append((b"NOOP", "ok"))
    with Wire(flood_server.port("none")) as pop:
        pop.login()
        pop.send(b"".join(line + b"\r\n" for line, _ in commands))
        for line, expected in commands:
            reply = pop.status()
            assert reply.startswith(b"-ERR" if expected == "err" else b"+OK"), (line, reply)
            if expected == "multi":
                pop.body()
            if line.startswith(b"LIST"):
                assert reply.split()[1] == line.split()[1]
        pop.ok("QUIT")
    fresh_session_retrieves(flood_server, corpus)


# ---------------------------------------------------------------------------------------------
# Invariant 6: secrets never reach logs or error replies

# Distinctive, so any appearance is a leak: a space (PASS takes the rest of the line,
# RFC 1939 §7) and characters base64 and logfmt treat specially.
GOOD_PASSWORD = "Qz7 corr3ct=horse+Staple/9"
WRONG_PASSWORD = "Wr0ng guess=Kx4+Vv/7"


def plain_token(authzid: str, user: str, password: str) -> str:
    """The base64 AUTH PLAIN response (RFC 4616 §2)."""
    raw = f"{authzid}\0{user}\0{password}".encode()
    return base64.b64encode(raw).decode("ascii")


def secret_forms(password: str) -> list[bytes]:
    """The forms a leak could take: as is, base64 (with and without padding), quoted."""
    raw = password.encode()
    b64 = base64.b64encode(raw)
    return [raw, b64, b64.rstrip(b"="), raw.replace(b" ", b"\\x20"), repr(password).encode()]


def test_invariant_6_secrets_never_reach_logs_or_error_replies(
    start: StartServer, small_maildir: Path, tls_files: TlsFiles
) -> None:
    server = start(
        users=[User(USER, GOOD_PASSWORD, small_maildir)],
        listeners=["none", "implicit"],
        log_level="debug",
    )
    tokens = [
        plain_token("", USER, GOOD_PASSWORD),
        plain_token(USER, USER, GOOD_PASSWORD),
        plain_token("", USER, WRONG_PASSWORD),
        plain_token("", "nobody", WRONG_PASSWORD),
        plain_token("someone-else", USER, GOOD_PASSWORD),  # authzid != authcid: refused
        base64.b64encode(f"{USER}\0{WRONG_PASSWORD}".encode()).decode(),  # malformed
        base64.b64encode(f"\0{USER}\0{WRONG_PASSWORD}\0extra".encode()).decode(),
    ]
    wires: list[Wire] = []

    def connect(kind: str) -> Wire:
        tls = tls_files.client_context() if kind == "implicit" else None
        wire = Wire(server.port(kind), tls=tls)
        wires.append(wire)
        return wire

    sessions = 0
    for kind in ("none", "implicit"):
        # USER/PASS: wrong, then right, on one connection; PASS without USER; the password
        # typed as a command; PASS again once logged in.
        pop = connect(kind)
        pop.err(f"PASS {WRONG_PASSWORD}")
        pop.ok(f"USER {USER}")
        pop.err(f"PASS {WRONG_PASSWORD}")
        pop.err(WRONG_PASSWORD)
        pop.err(GOOD_PASSWORD)
        pop.login(USER, GOOD_PASSWORD)
        pop.err(f"PASS {GOOD_PASSWORD}")
        pop.err(f"AUTH PLAIN {tokens[0]}")
        pop.ok("QUIT")
        sessions += 1
        # AUTH PLAIN with an initial response and with a continuation, every token.
        for token in tokens:
            for continuation in (False, True):
                pop = connect(kind)
                if continuation:
                    assert pop.cmd("AUTH PLAIN").startswith(b"+ ")
                    reply = pop.cmd(token)
                else:
                    reply = pop.cmd(f"AUTH PLAIN {token}")
                good = token in tokens[:2]
                assert reply.startswith(b"+OK" if good else b"-ERR"), (token, reply)
                pop.ok("QUIT")
                sessions += 1
        # A continuation that is not base64 but the password itself, and a cancelled one.
        pop = connect(kind)
        assert pop.cmd("AUTH PLAIN").startswith(b"+ ")
        pop.err(WRONG_PASSWORD)
        assert pop.cmd("AUTH PLAIN").startswith(b"+ ")
        pop.err("*")
        pop.login(USER, GOOD_PASSWORD)
        pop.close()  # no QUIT: the log line of an abnormal end must be clean too
        sessions += 1
    session_ends(server, sessions)
    assert server.stop() == 0
    for wire in wires:
        wire.close()

    forbidden = [
        *secret_forms(GOOD_PASSWORD),
        *secret_forms(WRONG_PASSWORD),
        *(t.encode() for t in tokens),
    ]
    log = server.log_text().encode()
    # The most talkative level (the server has no debug lines yet; any it gains are checked).
    assert "'--log-level', 'debug'" in str(server.proc.args), server.proc.args
    leaks = [f for f in forbidden if f in log]
    assert not leaks, f"secrets in the log: {leaks}\n--- log ---\n{server.log_text()}"
    # Whatever else the server wrote: stdout, the state database, any file it made.
    for path in server.config.parent.rglob("*"):
        if path.is_file() and path != server.config:
            data = path.read_bytes()
            assert not [f for f in forbidden if f in data], path
    replies = [r for wire in wires for r in wire.replies]
    assert any(r.startswith(b"-ERR") for r in replies)
    leaked_replies = [r for r in replies if any(f in r for f in forbidden)]
    assert not leaked_replies, leaked_replies
