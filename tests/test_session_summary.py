"""What a QUIT did, truthfully: the session_end fields and the QUIT reply under retention
policy (issue 16, item 1), and the session a line is about (item 2).

The session is the real one over in-memory streams; its maildrop is the real retention
layer over a real Maildir (standing in for the upstream, as in
tests/maildrop/test_retention.py) with the real sqlite store, so what is deleted, hidden
and recorded is what production does. tests/integration/test_operator_logs.py does the
same against Dovecot.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from clocks import MovableClock
from maildirs import make_maildir
from pop3client import Pop3Client

from popproxy.auth.authenticator import Authenticator
from popproxy.auth.passwords import hash_password
from popproxy.config import LimitsConfig, StateConfig, UserConfig
from popproxy.logfmt import JsonFormatter, LogfmtFormatter, SessionFilter
from popproxy.maildrop.base import Committed, Maildrop, MaildropError
from popproxy.maildrop.maildir import open_maildir
from popproxy.maildrop.retention import RetentionContext, open_retained
from popproxy.outcomes import SessionResult
from popproxy.peer import PeerAddress
from popproxy.policy import Action, Policy, Rule
from popproxy.pop3.replies import ResponseCode
from popproxy.secret import Secret
from popproxy.session import Session
from popproxy.session_context import SessionContext
from popproxy.session_summary import SessionSummary, quit_text
from popproxy.state import open_store
from popproxy.state.base import AccountKey, StateError, StateStore

ACCOUNT = AccountKey("provider", "erp@example.net")
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MESSAGES = {
    f"17000000{n:02d}.M{n}P1.test": f"Subject: {n}\n\nbody {n}\n".encode() for n in range(5)
}
LIMITS = LimitsConfig(auth_failure_delay_seconds=0.0)
RECEIVE_TIMEOUT_SECONDS = 30
SESSION_END_FIELDS = (
    "session",
    "listener",
    "peer",
    "user",
    "upstream",
    "result",
    "commands",
    "bytes_in",
    "bytes_out",
    "marked",
    "deleted_upstream",
    "deleted_local",
    "hidden",
    "expired",
    "duration_seconds",
)


def policy(action: Action, expire_after_days: int | None = None) -> Policy:
    rule = Rule("the-rule", action=action, expire_after_days=expire_after_days)
    return Policy(rules=(rule,), accounts={"erp": "provider"})


@dataclass
class Fixture:
    maildir: Path
    store: StateStore
    clock: MovableClock

    def files(self) -> int:
        return sum(1 for sub in ("new", "cur") for _ in (self.maildir / sub).iterdir())


@pytest.fixture
async def fx(tmp_path: Path) -> AsyncIterator[Fixture]:
    store = await open_store(StateConfig("sqlite:///" + str(tmp_path / "state.db")))
    yield Fixture(make_maildir(tmp_path / "Maildir", MESSAGES), store, MovableClock(NOW))
    await store.aclose()


def context(fx: Fixture, rules: Policy) -> SessionContext:
    user = UserConfig(
        name="erp",
        password_hash=hash_password(Secret.from_str("secret"), ln=4),
        upstream="provider",
    )

    async def open_maildrop(account: UserConfig, session_id: str) -> Maildrop:
        retention = RetentionContext(
            account=ACCOUNT,
            user=account.name,
            session_id=session_id,
            policy=rules.for_user(account.name, ACCOUNT.upstream),
            store=fx.store,
            clock=fx.clock,
        )
        inner = await open_maildir(fx.maildir)
        return await open_retained(inner, retention, on_close=trio.lowlevel.checkpoint)

    return SessionContext(
        listener="none",
        limits=LIMITS,
        authenticator=Authenticator({"erp": user}),
        open_maildrop=open_maildrop,
        allow_plaintext_auth=True,
    )


async def run_session(
    ctx: SessionContext, commands: list[str], caplog: pytest.LogCaptureFixture
) -> tuple[list[bytes], Mapping[str, object]]:
    """Log in as erp, send ``commands``, then QUIT; the replies and the session_end fields."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    session = Session(server_stream, PeerAddress("192.0.2.1", 1), ctx)
    replies: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        client = Pop3Client(client_stream, receive_timeout=RECEIVE_TIMEOUT_SECONDS)
        assert (await client.line()).startswith(b"+OK")
        assert await client.cmd("USER erp") == b"+OK"
        assert (await client.cmd("PASS secret")).startswith(b"+OK Logged in")
        for command in commands:
            replies.append(await client.cmd(command))
            if command.startswith("RETR"):
                await client.body()
        replies.append(await client.cmd("QUIT"))
    [end] = [r for r in caplog.records if r.getMessage() == "session_end"]
    fields: Mapping[str, object] = end.fields  # type: ignore[attr-defined]
    assert tuple(fields) == SESSION_END_FIELDS
    return replies, fields


async def test_keep_marked_five_deleted_none_hid_five(
    fx: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "popproxy")
    dele = [f"DELE {n}" for n in range(1, 6)]
    replies, end = await run_session(context(fx, policy(action=Action.KEEP)), dele, caplog)
    assert replies[-1] == (
        b"+OK Logging out, 0 messages deleted, 5 kept on the server and hidden from this mailbox."
    )
    assert fx.files() == 5
    assert (end["marked"], end["deleted_upstream"], end["hidden"], end["expired"]) == (5, 0, 5, 0)
    assert (end["user"], end["upstream"], end["result"]) == (
        "erp",
        "provider",
        SessionResult.QUIT.value,
    )


async def test_delete_after_retrieve_marked_none_deleted_the_two_retrieved(
    fx: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "popproxy")
    rules = policy(action=Action.DELETE_AFTER_RETRIEVE)
    replies, end = await run_session(context(fx, rules), ["RETR 1", "RETR 2"], caplog)
    assert replies[-1] == b"+OK Logging out, 2 messages deleted."
    assert fx.files() == 3
    assert (end["marked"], end["deleted_upstream"], end["hidden"], end["expired"]) == (0, 2, 0, 0)


async def test_expiry_deletes_what_nobody_marked(
    fx: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "popproxy")
    rules = policy(action=Action.KEEP, expire_after_days=3)
    await run_session(context(fx, rules), [], caplog)  # first seen now
    caplog.clear()
    fx.clock.now = NOW + timedelta(days=4)
    replies, end = await run_session(context(fx, rules), ["DELE 1"], caplog)
    assert replies[-1] == b"+OK Logging out, 5 messages deleted."
    assert fx.files() == 0
    assert (end["marked"], end["deleted_upstream"], end["hidden"], end["expired"]) == (1, 5, 0, 5)


async def test_a_failed_store_write_after_the_deletions_still_logs_them(
    fx: Fixture, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "popproxy")

    async def full_disk(record: object) -> None:
        await trio.lowlevel.checkpoint()
        raise StateError("disk full")

    monkeypatch.setattr(fx.store, "record", full_disk)
    replies, end = await run_session(context(fx, policy(action=Action.DELETE)), ["DELE 2"], caplog)
    assert replies[-1].startswith(b"-ERR [SYS/TEMP] Deletions done")
    assert fx.files() == 4
    assert (end["marked"], end["deleted_upstream"], end["hidden"]) == (1, 1, 0)


async def test_an_upstream_failure_after_the_local_login_is_the_sessions_end_and_traced(
    fx: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 2: session_end names the user and upstream, result=upstream_error, and a line
    a lower layer logged while the session ran carries its session= (SessionFilter)."""
    caplog.set_level(logging.INFO, "popproxy")
    caplog.handler.addFilter(SessionFilter())
    lower = logging.getLogger("popproxy.upstream")

    async def failing(account: UserConfig, session_id: str) -> Maildrop:
        await trio.lowlevel.checkpoint()
        lower.warning("upstream_tls_failed", extra={"fields": {"upstream": "provider"}})
        raise MaildropError(ResponseCode.SYS_TEMP, "The mail provider is unavailable.")

    ctx = dataclasses.replace(context(fx, Policy.empty()), open_maildrop=failing)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    session = Session(server_stream, PeerAddress("192.0.2.1", 1), ctx)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        client = Pop3Client(client_stream, receive_timeout=RECEIVE_TIMEOUT_SECONDS)
        await client.line()
        await client.cmd("USER erp")
        assert (
            await client.cmd("PASS secret") == b"-ERR [SYS/TEMP] The mail provider is unavailable."
        )
        await client_stream.aclose()  # the client gives up
    sid = session.summary.session_id
    [tls] = [r for r in caplog.records if r.getMessage() == "upstream_tls_failed"]
    assert tls.fields["session"] == sid  # type: ignore[attr-defined]
    [end] = [r for r in caplog.records if r.getMessage() == "session_end"]
    fields = end.fields  # type: ignore[attr-defined]
    assert (fields["session"], fields["user"], fields["upstream"]) == (sid, "erp", "provider")
    assert fields["result"] == "upstream_error"


def test_the_quit_text_counts_what_was_done_not_what_was_marked() -> None:
    """RFC 1939 §6 leaves the text free; it says deletions and hides, never marks."""
    assert quit_text(Committed()) == "Logging out, 0 messages deleted."
    assert quit_text(Committed(deleted_local=1, deleted_upstream=2)) == (
        "Logging out, 3 messages deleted."
    )
    assert quit_text(Committed(deleted_upstream=1, hidden=4)) == (
        "Logging out, 1 messages deleted, 4 kept on the server and hidden from this mailbox."
    )


@pytest.mark.parametrize(
    ("result", "upstream_failed", "settled"),
    [
        (SessionResult.EOF, True, SessionResult.UPSTREAM_ERROR),
        (SessionResult.QUIT, True, SessionResult.UPSTREAM_ERROR),
        (SessionResult.TIMEOUT, True, SessionResult.TIMEOUT),
        (SessionResult.SHUTDOWN, True, SessionResult.SHUTDOWN),
        (SessionResult.EOF, False, SessionResult.EOF),
        (SessionResult.QUIT, False, SessionResult.QUIT),
    ],
)
async def test_settle_takes_the_marks_and_blames_the_upstream_only_when_the_client_gave_up(
    result: SessionResult, upstream_failed: bool, settled: SessionResult
) -> None:
    """After an upstream failure the client closes or QUITs: the end is upstream_error;
    a timeout or a shutdown stays what it was."""
    summary = SessionSummary("ab12cd34", "plain", "192.0.2.1:1", result=result)
    summary.settle(3, upstream_failed=upstream_failed)
    assert (summary.marked, summary.result) == (3, settled)


async def test_session_end_is_the_line_log_info_would_write(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``log_end`` hands its record to the handlers itself (no caller look-up): both
    formatters write what ``log.info`` with the same fields writes, but the time."""
    summary = SessionSummary(
        "ab12cd34",
        "pop3",
        "[2001:db8::1]:110",
        user="user1",
        upstream="provider",
        result=SessionResult.QUIT,
        commands=8,
        bytes_in=80,
        bytes_out=900,
        committed=Committed(deleted_upstream=2, hidden=1, expired=1),
    )
    session_log = logging.getLogger("popproxy.session")
    with caplog.at_level(logging.INFO, logger="popproxy.session"):
        summary.log_end()
        (fast,) = caplog.records
        session_log.info("session_end", extra={"fields": getattr(fast, "fields")})  # noqa: B009
    general = caplog.records[1]
    general.created, general.msecs = fast.created, fast.msecs  # the one difference: time
    for formatter in (LogfmtFormatter(), JsonFormatter()):
        assert formatter.format(fast) == formatter.format(general)
    assert "msg=session_end" in LogfmtFormatter().format(fast)
    with caplog.at_level(logging.WARNING, logger="popproxy.session"):
        caplog.clear()
        summary.log_end()
        assert not caplog.records  # below the level: not even made
