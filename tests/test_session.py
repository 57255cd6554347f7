"""Session tests over in-memory streams: every command in every phase, deletion rules.

The maildrop is a real Maildir in a temporary directory and the authenticator
is the real one (with cheap hash parameters); the client side is raw bytes
(tests/pop3client.py).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
import trio
import trio.testing
import trustme
from maildirs import make_maildir
from pop3client import Pop3Client

from popproxy.auth.authenticator import Authenticator, Verification
from popproxy.auth.passwords import hash_password
from popproxy.config import LimitsConfig, UserConfig
from popproxy.maildrop.base import Committed, Maildrop
from popproxy.maildrop.maildir import open_maildir
from popproxy.outcomes import SessionResult
from popproxy.peer import PeerAddress
from popproxy.secret import Secret
from popproxy.session import FLUSH_THRESHOLD_BYTES, Session
from popproxy.session_context import SessionContext
from popproxy.session_summary import SessionSummary

MESSAGES = {
    "1700000001.M1P1.test": b"Subject: one\n\nfirst body\n",
    "1700000002.M2P1.test": b"Subject: two\n\n.starts with a dot\nsecond\n",
    "1700000003.M3P1.test": b"Subject: three\nX-Long: yes\n\nline 1\nline 2\nline 3\n",
}
LIMITS = LimitsConfig(auth_failure_delay_seconds=0.0)


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    return make_maildir(tmp_path / "Maildir", MESSAGES)


def remaining(maildir: Path) -> set[str]:
    return {p.name.split(":")[0] for sub in ("new", "cur") for p in (maildir / sub).iterdir()}


# Each receive of a session test's client waits at most this long (virtual seconds under
# autojump_clock): a session that neither answers nor closes fails the test.
RECEIVE_TIMEOUT_SECONDS = 30


def session_client(stream: trio.abc.Stream) -> Pop3Client:
    """The raw client a session test talks through (tests/pop3client.py)."""
    return Pop3Client(stream, receive_timeout=RECEIVE_TIMEOUT_SECONDS)


@dataclass
class Running:
    client: Pop3Client
    summary: Callable[[], SessionSummary]
    done: trio.Event


def make_context(
    maildir: Path, limits: LimitsConfig = LIMITS, *, plaintext: bool = True
) -> SessionContext:
    user = UserConfig(
        name="demo",
        password_hash=hash_password(Secret.from_str("secret"), ln=4),
        maildir=maildir,
    )
    return SessionContext(
        listener="none",
        limits=limits,
        authenticator=Authenticator({"demo": user}),
        open_maildrop=open_local_maildrop,
        allow_plaintext_auth=plaintext,
    )


async def open_local_maildrop(user: UserConfig, session_id: str) -> Maildrop:
    assert user.maildir is not None
    return await open_maildir(user.maildir)


class Starter(Protocol):
    async def __call__(self, context: SessionContext | None = None) -> Running: ...


@pytest.fixture
async def start(maildir: Path, nursery: trio.Nursery) -> AsyncIterator[Starter]:
    async def _start(context: SessionContext | None = None) -> Running:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        session = Session(
            server_stream, PeerAddress("192.0.2.1", 1), context or make_context(maildir)
        )
        done = trio.Event()

        async def run() -> None:
            await session.run()
            done.set()

        nursery.start_soon(run)
        client = session_client(client_stream)
        assert (await client.line()).startswith(b"+OK")
        return Running(client, lambda: session.summary, done)

    yield _start


async def login(client: Pop3Client) -> None:
    assert await client.cmd("USER demo") == b"+OK"
    assert (await client.cmd("PASS secret")).startswith(b"+OK Logged in, 3 messages")


async def test_a_listing_past_the_flush_threshold_has_every_line_in_order(
    start: Starter, tmp_path: Path
) -> None:
    """LIST and UIDL go to the core in blocks (session.py, _queue_multiline): the lines
    of a listing longer than a block arrive whole, each once, in order."""
    many = {
        f"17{n:08d}.M{n}P1.test": b"Subject: %d\n\n%s\n" % (n, b"x" * (n % 7))
        for n in range(1, 3001)
    }
    running = await start(make_context(make_maildir(tmp_path / "Big", many)))
    c = running.client
    assert await c.cmd("USER demo") == b"+OK"
    assert (await c.cmd("PASS secret")).startswith(b"+OK Logged in, 3000 messages")
    _, uidls = await c.multi("UIDL")
    assert len(uidls) > FLUSH_THRESHOLD_BYTES
    _, listing = await c.multi("LIST")
    uid_rows = [line.split(b" ") for line in uidls.split(b"\r\n")[:-1]]
    size_rows = [line.split(b" ") for line in listing.split(b"\r\n")[:-1]]
    numbers = [str(n).encode() for n in range(1, 3001)]
    assert [n for n, _ in uid_rows] == [n for n, _ in size_rows] == numbers
    sizes = {
        uid.decode(): int(size) for (_, uid), (_, size) in zip(uid_rows, size_rows, strict=True)
    }
    assert sizes == {name: len(crlf(body)) for name, body in many.items()}


async def test_every_transaction_command(start: Starter, maildir: Path) -> None:
    running: Running = await start()
    c = running.client
    await login(c)
    sizes = {i + 1: len(crlf(body)) for i, body in enumerate(MESSAGES.values())}
    assert await c.cmd("STAT") == f"+OK 3 {sum(sizes.values())}".encode()
    _, listing = await c.multi("LIST")
    assert listing == b"".join(f"{n} {s}\r\n".encode() for n, s in sizes.items())
    assert await c.cmd("LIST 2") == f"+OK 2 {sizes[2]}".encode()
    _, uidls = await c.multi("UIDL")
    rows = [line.split(b" ") for line in uidls.splitlines()]
    assert [n for n, _ in rows] == [b"1", b"2", b"3"]
    assert len({uid for _, uid in rows}) == 3
    assert await c.cmd("UIDL 3") == b"+OK 3 " + rows[2][1]
    for n, body in enumerate(MESSAGES.values(), start=1):
        _, got = await c.multi(f"RETR {n}")
        assert got == crlf(body)
    _, top = await c.multi("TOP 3 1")
    assert top == b"Subject: three\r\nX-Long: yes\r\n\r\nline 1\r\n"
    _, top0 = await c.multi("TOP 3 0")
    assert top0 == b"Subject: three\r\nX-Long: yes\r\n\r\n"
    assert await c.cmd("NOOP") == b"+OK"
    _, capa = await c.multi("CAPA")
    assert b"UIDL\r\n" in capa and b"PIPELINING\r\n" in capa
    assert b"EXPIRE NEVER\r\n" in capa
    assert (await c.cmd("QUIT")).startswith(b"+OK")
    await running.done.wait()
    assert running.summary().result is SessionResult.QUIT
    assert remaining(maildir) == set(MESSAGES)


async def test_bad_message_numbers_get_err_and_the_session_goes_on(
    start: Starter,
) -> None:
    running: Running = await start()
    c = running.client
    await login(c)
    for bad in ("RETR 0", "RETR 4", "LIST -1", "DELE 99999999999", "TOP 1", "RETR 1x", "UIDL +1"):
        assert (await c.cmd(bad)).startswith(b"-ERR"), bad
    assert (await c.cmd("STAT")).startswith(b"+OK 3 ")


async def test_authorization_phase_refuses_transaction_commands(
    start: Starter,
) -> None:
    running: Running = await start()
    c = running.client
    for command in ("STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 1", "UIDL"):
        assert (await c.cmd(command)).startswith(b"-ERR"), command
        # bad-command budget: reset it with a good command now and then
        assert (await c.cmd("USER demo")) == b"+OK"
    assert (await c.cmd("PASS secret")).startswith(b"+OK")


async def test_transaction_phase_refuses_authorization_commands(
    start: Starter,
) -> None:
    running: Running = await start()
    c = running.client
    await login(c)
    for command in ("USER demo", "PASS secret", "AUTH PLAIN", "APOP demo " + "0" * 32):
        assert (await c.cmd(command)).startswith(b"-ERR"), command
    assert (await c.cmd("NOOP")) == b"+OK"


async def test_wrong_password_and_unknown_user_get_the_same_reply(
    start: Starter,
) -> None:
    running: Running = await start()
    c = running.client
    assert await c.cmd("USER demo") == b"+OK"
    wrong = await c.cmd("PASS nope")
    assert await c.cmd("USER nobody") == b"+OK"
    unknown = await c.cmd("PASS secret")
    assert wrong == unknown == b"-ERR [AUTH] Authentication failed."
    await login(c)


class RecordingAuthenticator(Authenticator):
    """Records the names it is asked about and finds every password wrong, at once
    (no hashing thread, so the autojump clock measures only the session's delay)."""

    def __init__(self) -> None:
        super().__init__({})
        self.asked: list[str] = []

    async def check(self, username: str, password: Secret) -> Verification:
        self.asked.append(username)
        return Verification(None)


HOSTILE_NAMES = ["evil\u202egnp", "ali\u200bce", "al\u00a0ice", "x\u2028y", "c1\u0085"]


async def test_a_name_outside_the_safe_set_fails_as_a_wrong_password_does(
    start: Starter, maildir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Same reply after the same delay, and the name reaches no authenticator (pop3/names.py)."""
    delay = 2.0
    authenticator = RecordingAuthenticator()
    context = dataclasses.replace(
        make_context(maildir, LimitsConfig(auth_failure_delay_seconds=delay)),
        authenticator=authenticator,
    )
    c = (await start(context)).client
    attempts = [("USER demo", "PASS wrong")]
    attempts += [(f"USER {name}", "PASS secret") for name in HOSTILE_NAMES]
    token = base64.b64encode(f"\0{HOSTILE_NAMES[0]}\0secret".encode()).decode()
    replies = []
    for user, password in attempts:
        assert await c.cmd(user) == b"+OK"
        sent = trio.current_time()
        replies.append(await c.cmd(password))
        assert trio.current_time() - sent == pytest.approx(delay)
    sent = trio.current_time()
    replies.append(await c.cmd(f"AUTH PLAIN {token}"))
    assert trio.current_time() - sent == pytest.approx(delay)
    assert set(replies) == {b"-ERR [AUTH] Authentication failed."}
    # The wrong password was checked for its user; every hostile name as the empty
    # name, which is never configured (the same work as an unknown user).
    assert authenticator.asked == ["demo"] + [""] * (len(HOSTILE_NAMES) + 1)


async def test_auth_plain_initial_response_and_continuation(
    start: Starter,
) -> None:
    token = base64.b64encode(b"\0demo\0secret").decode()
    running: Running = await start()
    c = running.client
    assert (await c.cmd(f"AUTH PLAIN {token}")).startswith(b"+OK Logged in")
    second: Running = await start()
    c2 = second.client
    assert await c2.cmd("AUTH PLAIN") == b"+ "
    assert await c2.cmd("*") == b"-ERR Authentication cancelled."
    assert await c2.cmd("AUTH PLAIN") == b"+ "
    assert (await c2.cmd(token)).startswith(b"-ERR [IN-USE]")  # first session holds the lock


async def test_auth_plain_rejects_other_authzid_and_malformed_responses(start: Starter) -> None:
    running: Running = await start()
    for raw in (b"root\0demo\0secret", b"", b"demo\0secret", b"\0\xff\0secret"):
        token = base64.b64encode(raw).decode() or "="
        reply = await running.client.cmd(f"AUTH PLAIN {token}")
        assert reply == b"-ERR [AUTH] Authentication failed.", raw


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode() or "="


async def test_auth_login_prompts_for_the_name_then_the_password(start: Starter) -> None:
    """draft-murchison-sasl-login: "Username:" and "Password:" as base64 challenges."""
    running: Running = await start()
    c = running.client
    assert await c.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6"
    assert await c.cmd(b64(b"demo")) == b"+ UGFzc3dvcmQ6"
    assert (await c.cmd(b64(b"secret"))).startswith(b"+OK Logged in, 3 messages")
    _, capa = await c.multi("CAPA")
    # Once logged in, CAPA lists what TRANSACTION allows: no USER, SASL or STLS.
    assert b"USER" not in capa and b"SASL" not in capa and b"STLS" not in capa
    assert b"UIDL\r\n" in capa


async def test_auth_login_with_the_name_as_initial_response(start: Starter) -> None:
    running: Running = await start()
    c = running.client
    assert await c.cmd(f"AUTH LOGIN {b64(b'demo')}") == b"+ UGFzc3dvcmQ6"
    assert (await c.cmd(b64(b"secret"))).startswith(b"+OK Logged in")


async def test_auth_login_fails_as_every_login_fails_and_can_be_cancelled(
    start: Starter,
) -> None:
    running: Running = await start()
    c = running.client
    for name, password in (
        (b"demo", b"wrong"),
        (b"nobody", b"secret"),
        (b"\xffdemo", b"secret"),
        (b"", b"secret"),
        (b"demo", b""),
    ):
        assert await c.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6"
        assert await c.cmd(b64(name)) == b"+ UGFzc3dvcmQ6"
        assert await c.cmd(b64(password)) == b"-ERR [AUTH] Authentication failed.", name
    assert await c.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6"
    assert await c.cmd("*") == b"-ERR Authentication cancelled."
    assert await c.cmd(f"AUTH LOGIN {b64(b'demo')}") == b"+ UGFzc3dvcmQ6"
    assert await c.cmd("*") == b"-ERR Authentication cancelled."
    assert (await c.cmd("STAT")).startswith(b"-ERR")  # still not logged in


async def test_dele_then_retr_of_the_same_message_is_an_error(
    start: Starter,
) -> None:
    running: Running = await start()
    c = running.client
    await login(c)
    assert (await c.cmd("DELE 2")).startswith(b"+OK")
    assert (await c.cmd("RETR 2")).startswith(b"-ERR")
    assert (await c.cmd("DELE 2")).startswith(b"-ERR")
    assert (await c.cmd("LIST 2")).startswith(b"-ERR")
    assert (await c.cmd("STAT")).startswith(b"+OK 2 ")
    _, listing = await c.multi("LIST")
    assert [ln.split()[0] for ln in listing.splitlines()] == [b"1", b"3"]


async def test_rset_unmarks_every_deletion(start: Starter, maildir: Path) -> None:
    running: Running = await start()
    c = running.client
    await login(c)
    assert (await c.cmd("DELE 1")).startswith(b"+OK")
    assert (await c.cmd("DELE 3")).startswith(b"+OK")
    assert (await c.cmd("RSET")).startswith(b"+OK Maildrop has 3 messages")
    assert (await c.cmd("RETR 1")).startswith(b"+OK")
    await c.body()
    assert (await c.cmd("QUIT")).startswith(b"+OK")
    await running.done.wait()
    assert remaining(maildir) == set(MESSAGES)


async def test_quit_commits_the_deletions(start: Starter, maildir: Path) -> None:
    running: Running = await start()
    c = running.client
    await login(c)
    assert (await c.cmd("DELE 1")).startswith(b"+OK")
    assert (await c.cmd("DELE 3")).startswith(b"+OK")
    assert await c.cmd("QUIT") == b"+OK Logging out, 2 messages deleted."
    await running.done.wait()
    assert remaining(maildir) == {"1700000002.M2P1.test"}
    assert running.summary().marked == 2
    assert running.summary().committed == Committed(deleted_local=2)


async def test_session_ending_without_quit_deletes_nothing(start: Starter, maildir: Path) -> None:
    running: Running = await start()
    c = running.client
    await login(c)
    assert (await c.cmd("DELE 1")).startswith(b"+OK")
    await c.stream.aclose()  # EOF without QUIT
    await running.done.wait()
    assert running.summary().result is SessionResult.EOF
    assert remaining(maildir) == set(MESSAGES)
    # and the lock is released: a new session sees all three
    again: Running = await start()
    await login(again.client)


async def test_quit_in_authorization_logs_out(start: Starter) -> None:
    running: Running = await start()
    assert (await running.client.cmd("QUIT")).startswith(b"+OK")
    assert await running.client.at_eof()


async def test_pipelined_commands_are_answered_in_order(start: Starter) -> None:
    running: Running = await start()
    c = running.client
    await login(c)
    await c.send(b"NOOP\r\n" * 200 + b"STAT\r\nBOGUS\r\nNOOP\r\n")
    for _ in range(200):
        assert await c.line() == b"+OK"
    assert (await c.line()).startswith(b"+OK 3 ")
    assert (await c.line()).startswith(b"-ERR")
    assert await c.line() == b"+OK"


async def test_too_many_bad_commands_close_the_session(start: Starter) -> None:
    running: Running = await start()
    c = running.client
    for _ in range(LIMITS.max_bad_commands - 1):
        assert (await c.cmd("FOO")).startswith(b"-ERR")
    assert (await c.cmd("FOO")).startswith(b"-ERR Too many bad commands")
    assert await c.at_eof()
    await running.done.wait()
    assert running.summary().result is SessionResult.PROTOCOL_ERROR


async def test_plaintext_auth_refused_without_tls_when_not_allowed(
    start: Starter, maildir: Path
) -> None:
    running: Running = await start(make_context(maildir, plaintext=False))
    c = running.client
    _, capa = await c.multi("CAPA")
    assert b"USER" not in capa and b"SASL" not in capa
    reply = await c.cmd("USER demo")
    assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    reply = await c.cmd("AUTH LOGIN")
    assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    assert (await c.cmd("STLS")).startswith(b"-ERR")  # this listener has no STLS


async def test_overlong_line_gets_one_error_and_the_session_goes_on(
    start: Starter,
) -> None:
    running: Running = await start()
    c = running.client
    await c.send(b"X" * 100_000 + b"\r\nUSER demo\r\n")
    assert (await c.line()) == b"-ERR Line too long"
    assert (await c.line()) == b"+OK"


async def test_login_timeout_closes_a_silent_client(
    start: Starter, maildir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    before = trio.current_time()
    running: Running = await start(make_context(maildir))
    await running.client.send(b"US")  # a drip that never completes a line
    await running.done.wait()
    elapsed = trio.current_time() - before
    assert LIMITS.login_timeout_seconds <= elapsed < LIMITS.login_timeout_seconds + 1
    assert running.summary().result is SessionResult.TIMEOUT
    assert (await running.client.line()).startswith(b"-ERR [SYS/TEMP] Disconnected")


async def test_idle_timeout_ends_a_logged_in_session_without_deleting(
    start: Starter, maildir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    running: Running = await start(make_context(maildir))
    c = running.client
    # The hash and the Maildir listing run in worker threads: keep the clock still
    # until they are done, or it would jump to the client's own read deadline.
    autojump_clock.autojump_threshold = math.inf
    await login(c)
    assert (await c.cmd("DELE 1")).startswith(b"+OK")
    autojump_clock.autojump_threshold = 0
    before = trio.current_time()
    await running.done.wait()
    elapsed = trio.current_time() - before
    assert LIMITS.idle_timeout_seconds <= elapsed < LIMITS.idle_timeout_seconds + 1
    assert LIMITS.idle_timeout_seconds >= 600  # RFC 1939 §3
    assert running.summary().result is SessionResult.TIMEOUT
    assert await c.line() == b"-ERR Disconnected for inactivity."
    assert remaining(maildir) == set(MESSAGES)


async def test_bare_auth_lists_mechanisms_only_where_credentials_may_be_sent(
    start: Starter, maildir: Path
) -> None:
    allowed = await start()
    assert await allowed.client.multi("AUTH") == (
        b"+OK Supported SASL mechanisms follow",
        b"PLAIN\r\nLOGIN\r\n",
    )
    assert (await allowed.client.cmd("STAT")).startswith(b"-ERR")  # still not logged in
    await allowed.client.stream.aclose()
    refused = await start(make_context(maildir, plaintext=False))
    assert (await refused.client.multi("AUTH"))[1] == b""


async def test_retr_of_a_message_gone_since_login_gets_err_and_the_session_goes_on(
    start: Starter, maildir: Path
) -> None:
    running: Running = await start()
    c = running.client
    await login(c)
    for path in (maildir / "new").iterdir():
        if path.name.startswith("1700000001."):
            path.unlink()  # another program removed message 1
    assert await c.cmd("RETR 1") == b"-ERR [SYS/TEMP] message 1 is no longer in the maildrop"
    assert await c.cmd("TOP 1 0") == b"-ERR [SYS/TEMP] message 1 is no longer in the maildrop"
    _, got = await c.multi("RETR 2")
    assert got == crlf(MESSAGES["1700000002.M2P1.test"])
    assert (await c.cmd("QUIT")).startswith(b"+OK")
    await running.done.wait()
    assert running.summary().result is SessionResult.QUIT


async def test_quit_that_cannot_delete_says_so_once(
    start: Starter, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: object) -> None:
        raise PermissionError(13, "refused")

    running: Running = await start()
    c = running.client
    await login(c)
    assert (await c.cmd("DELE 1")).startswith(b"+OK")
    monkeypatch.setattr("os.unlink", refuse)
    assert await c.cmd("QUIT") == b"-ERR [SYS/TEMP] some deleted messages were not removed"
    await running.done.wait()
    assert running.summary().marked == 1  # marked, and nothing deleted
    assert running.summary().committed == Committed()


async def test_login_timeout_during_a_tls_handshake_sends_nothing_in_clear(
    maildir: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(server_tls)
    context = dataclasses.replace(make_context(maildir), tls_context=server_tls, implicit_tls=True)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    session = Session(server_stream, PeerAddress("192.0.2.1", 1), context)
    nursery.start_soon(session.run)
    with trio.fail_after(LIMITS.login_timeout_seconds + 10):
        received = b""
        while chunk := await client_stream.receive_some(4096):
            received += chunk
    assert received == b""  # no "-ERR" written into what should be a TLS handshake
    assert session.summary.result is SessionResult.TIMEOUT


class UnusableHashAuthenticator(Authenticator):
    """A stored hash that cannot be checked (an optional library gone after load)."""

    def __init__(self) -> None:
        super().__init__({})

    async def check(self, username: str, password: Secret) -> Verification:
        await trio.lowlevel.checkpoint()
        return Verification(None, hash_unusable=True)


@dataclass(frozen=True)
class FailedLogin:
    authenticator: Callable[[], Authenticator] | None
    commands: tuple[str, ...]
    reason: str
    mechanism: str


@pytest.mark.parametrize(
    "case",
    [
        FailedLogin(None, ("USER demo", "PASS wrong"), "bad_credentials", "user"),
        FailedLogin(None, ("USER nobody", "PASS secret"), "bad_credentials", "user"),
        FailedLogin(
            None,
            ("AUTH PLAIN " + base64.b64encode(b"no separators").decode(),),
            "malformed",
            "plain",
        ),
        FailedLogin(
            UnusableHashAuthenticator, ("USER demo", "PASS secret"), "hash_unusable", "user"
        ),
    ],
)
async def test_each_failed_login_logs_one_login_failed_line_without_the_name(
    start: Starter, maildir: Path, caplog: pytest.LogCaptureFixture, case: FailedLogin
) -> None:
    """Issue 16, item 3: the line fail2ban reads (docs/operations.md); the tests of
    tests/integration/test_fail2ban.py cover lockouts and a busy hash queue."""
    caplog.set_level(logging.INFO, "popproxy")
    context = make_context(maildir)
    if case.authenticator is not None:
        context = dataclasses.replace(context, authenticator=case.authenticator())
    running = await start(context)
    for command in case.commands:
        reply = await running.client.cmd(command)
    assert reply.startswith(b"-ERR [AUTH]")
    [line] = [r for r in caplog.records if r.getMessage() == "login_failed"]
    assert line.fields == {  # type: ignore[attr-defined]
        "session": running.summary().session_id,
        "peer": "192.0.2.1:1",
        "mechanism": case.mechanism,
        "reason": case.reason,
    }
