"""What a session reports to popproxy.metrics, over in-memory streams.

The sessions are those of test_session.py (a real Maildir, the real authenticator),
with a real ``Metrics`` on a fresh registry in their context; values are read back
as Prometheus samples. Timeouts run on ``autojump_clock``.
"""

from __future__ import annotations

import base64
import dataclasses
import sys
from pathlib import Path

import pytest
import test_session
import trio
import trio.testing
from prometheus_client import REGISTRY, CollectorRegistry
from test_session import LIMITS, Starter, login, make_context

from popproxy.auth.authenticator import Authenticator
from popproxy.config import UserConfig
from popproxy.maildrop.base import Maildrop, MaildropError
from popproxy.metrics import Metrics
from popproxy.outcomes import SessionResult
from popproxy.peer import PeerAddress
from popproxy.pop3.replies import ResponseCode
from popproxy.session import Session
from popproxy.session_context import SessionContext

# The fixtures of test_session.py, used here by name.
maildir = test_session.maildir
start = test_session.start

LISTENER = "none"
TEST_DEADLINE_SECONDS = 30


def new_metrics() -> Metrics:
    metrics = Metrics(CollectorRegistry())
    metrics.declare(listeners=[LISTENER])
    return metrics


def counted(context: SessionContext) -> tuple[SessionContext, Metrics]:
    metrics = new_metrics()
    return dataclasses.replace(context, metrics=metrics), metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value("popproxy_" + name, labels)
    assert found is not None, (name, labels)
    return found


def commands(metrics: Metrics) -> dict[tuple[str, str], float]:
    """The non-zero popproxy_commands_total series, as {(verb, result): count}."""
    out = {}
    for family in metrics.registry.collect():
        if family.name == "popproxy_commands":
            for s in family.samples:
                if s.name.endswith("_total") and s.value:
                    out[(s.labels["verb"], s.labels["result"])] = s.value
    return out


def logins(metrics: Metrics) -> dict[tuple[str, str], float]:
    """The non-zero popproxy_logins_total series, as {(mechanism, result): count}."""
    out = {}
    for family in metrics.registry.collect():
        if family.name == "popproxy_logins":
            for s in family.samples:
                if s.name.endswith("_total") and s.value:
                    out[(s.labels["mechanism"], s.labels["result"])] = s.value
    return out


def ended(metrics: Metrics) -> dict[str, float]:
    out = {}
    for result in SessionResult:
        value = sample(metrics, "sessions_ended_total", listener=LISTENER, result=result.value)
        if value:
            out[result.value] = value
    return out


async def test_commands_count_by_verb_and_status_line(start: Starter, maildir: Path) -> None:
    context, metrics = counted(make_context(maildir))
    running = await start(context)
    c = running.client
    await login(c)
    assert (await c.cmd("STAT")).startswith(b"+OK")
    await c.multi("LIST")  # a multi-line reply counts once, by its status line
    await c.multi("RETR 1")
    assert (await c.cmd("RETR 9")).startswith(b"-ERR")
    assert (await c.cmd("DELE 1")).startswith(b"+OK")
    assert (await c.cmd("RETR 1")).startswith(b"-ERR")  # deleted
    assert (await c.cmd("BOGUS")).startswith(b"-ERR")  # not a command: verb "unknown"
    assert (await c.cmd("RETR x")).startswith(b"-ERR")  # does not parse either
    assert (await c.cmd("USER demo")).startswith(b"-ERR")  # parsed, wrong phase: USER
    assert (await c.cmd("QUIT")).startswith(b"+OK")
    await running.done.wait()
    assert commands(metrics) == {
        ("USER", "ok"): 1,
        ("PASS", "ok"): 1,
        ("STAT", "ok"): 1,
        ("LIST", "ok"): 1,
        ("RETR", "ok"): 1,
        ("RETR", "err"): 2,
        ("DELE", "ok"): 1,
        ("unknown", "err"): 2,
        ("USER", "err"): 1,
        ("QUIT", "ok"): 1,
    }
    # Rejected lines are answered too, but never reach the session's dispatch.
    assert sum(commands(metrics).values()) == running.summary().commands + 3


async def test_pipelined_commands_each_count(start: Starter, maildir: Path) -> None:
    context, metrics = counted(make_context(maildir))
    running = await start(context)
    c = running.client
    await c.send(b"USER demo\r\nPASS secret\r\nNOOP\r\nNOOP\r\nUIDL 1\r\nQUIT\r\n")
    await c.rest_until_closed()
    await running.done.wait()
    assert commands(metrics) == {
        ("USER", "ok"): 1,
        ("PASS", "ok"): 1,
        ("NOOP", "ok"): 2,
        ("UIDL", "ok"): 1,
        ("QUIT", "ok"): 1,
    }


async def test_an_auth_exchange_counts_once_by_its_final_answer(
    start: Starter, maildir: Path
) -> None:
    token = base64.b64encode(b"\0demo\0secret").decode()
    context, metrics = counted(make_context(maildir))
    c = (await start(context)).client
    assert await c.cmd("AUTH PLAIN") == b"+ "
    assert await c.cmd("*") == b"-ERR Authentication cancelled."  # not a login attempt
    assert await c.cmd("AUTH PLAIN") == b"+ "
    assert (await c.cmd(base64.b64encode(b"\0demo\0wrong").decode())).startswith(b"-ERR")
    assert (await c.cmd(f"AUTH PLAIN {base64.b64encode(b'no-nuls').decode()}")).startswith(b"-ERR")
    assert (await c.cmd(f"AUTH PLAIN {token}")).startswith(b"+OK Logged in")
    assert commands(metrics) == {("AUTH", "err"): 3, ("AUTH", "ok"): 1}
    assert logins(metrics) == {("plain", "failed"): 2, ("plain", "ok"): 1}


async def test_an_auth_login_exchange_counts_once_as_login(start: Starter, maildir: Path) -> None:
    context, metrics = counted(make_context(maildir))
    c = (await start(context)).client
    user, right, wrong = (base64.b64encode(raw).decode() for raw in (b"demo", b"secret", b"x"))
    assert await c.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6"
    assert await c.cmd("*") == b"-ERR Authentication cancelled."  # not a login attempt
    assert await c.cmd(f"AUTH LOGIN {user}") == b"+ UGFzc3dvcmQ6"
    assert (await c.cmd(wrong)).startswith(b"-ERR [AUTH]")
    assert await c.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6"
    assert await c.cmd(user) == b"+ UGFzc3dvcmQ6"
    assert (await c.cmd(right)).startswith(b"+OK Logged in")
    assert commands(metrics) == {("AUTH", "err"): 2, ("AUTH", "ok"): 1}
    assert logins(metrics) == {("login", "failed"): 1, ("login", "ok"): 1}


async def test_logins_by_mechanism_and_result(start: Starter, maildir: Path) -> None:
    context, metrics = counted(make_context(maildir))
    c = (await start(context)).client
    assert await c.cmd("USER demo") == b"+OK"
    assert (await c.cmd("PASS wrong")).startswith(b"-ERR [AUTH]")
    assert await c.cmd("USER nobody") == b"+OK"
    assert (await c.cmd("PASS secret")).startswith(b"-ERR [AUTH]")
    await login(c)
    assert logins(metrics) == {("user", "failed"): 2, ("user", "ok"): 1}


async def test_a_right_password_without_a_maildrop_is_a_login_error(
    start: Starter, maildir: Path
) -> None:
    async def unavailable(user: UserConfig, session_id: str) -> Maildrop:
        raise MaildropError(ResponseCode.SYS_TEMP, "The mail provider is unavailable.")

    context, metrics = counted(
        dataclasses.replace(make_context(maildir), open_maildrop=unavailable)
    )
    c = (await start(context)).client
    assert await c.cmd("USER demo") == b"+OK"
    assert (await c.cmd("PASS secret")).startswith(b"-ERR [SYS/TEMP]")
    assert logins(metrics) == {("user", "error"): 1}
    assert commands(metrics) == {("USER", "ok"): 1, ("PASS", "err"): 1}


async def test_an_unusable_stored_hash_is_a_login_error(
    start: Starter, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argon2 = UserConfig(
        "demo", "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43, maildir=maildir
    )
    monkeypatch.setitem(sys.modules, "argon2", None)  # the optional library is gone
    context, metrics = counted(
        dataclasses.replace(make_context(maildir), authenticator=Authenticator({"demo": argon2}))
    )
    c = (await start(context)).client
    assert await c.cmd("USER demo") == b"+OK"
    assert (await c.cmd("PASS secret")).startswith(b"-ERR [AUTH]")  # the client sees a failure
    assert logins(metrics) == {("user", "error"): 1}


async def test_sessions_started_active_and_ended_by_result(
    start: Starter, maildir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    metrics = new_metrics()
    context = dataclasses.replace(make_context(maildir), metrics=metrics)

    quitting = await start(context)
    eof = await start(context)
    silent = await start(context)
    bad = await start(context)
    assert sample(metrics, "sessions_active", listener=LISTENER) == 4
    assert sample(metrics, "sessions_started_total", listener=LISTENER) == 4

    assert (await quitting.client.cmd("QUIT")).startswith(b"+OK")
    await eof.client.stream.aclose()
    await bad.client.send(b"BAD\r\n" * LIMITS.max_bad_commands)
    for running in (quitting, eof, silent, bad):  # the silent one hits the login timeout
        with trio.fail_after(LIMITS.login_timeout_seconds * 2):
            await running.done.wait()
    assert ended(metrics) == {"quit": 1, "eof": 1, "timeout": 1, "protocol_error": 1}
    assert sample(metrics, "sessions_active", listener=LISTENER) == 0


async def test_client_octets_are_those_on_the_wire(maildir: Path) -> None:
    """What the counters say is exactly what the client sent and received."""
    metrics = new_metrics()
    context = dataclasses.replace(make_context(maildir), metrics=metrics)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    sent = b"USER demo\r\nPASS secret\r\nRETR 1\r\nTOP 3 1\r\nNOPE\r\nQUIT\r\n"
    received = bytearray()
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Session(server_stream, PeerAddress("192.0.2.1", 1), context).run)
            await client_stream.send_all(sent)
            while data := await client_stream.receive_some(65536):
                received += data
    assert received.endswith(b"+OK Logging out, 0 messages deleted.\r\n")
    assert sample(metrics, "client_received_bytes_total", listener=LISTENER) == len(sent)
    assert sample(metrics, "client_sent_bytes_total", listener=LISTENER) == len(received)


async def test_a_session_given_no_metrics_works_and_counts_where_nobody_reads(
    start: Starter, maildir: Path
) -> None:
    """Without a Metrics the context holds an unexported one (Metrics.unexported): the
    session takes the same paths, and nothing reaches prometheus_client's global registry."""
    context = make_context(maildir)
    running = await start(context)
    await login(running.client)
    assert (await running.client.cmd("QUIT")).startswith(b"+OK")
    await running.done.wait()
    assert running.summary().result is SessionResult.QUIT
    registry = context.metrics.registry
    assert registry is not REGISTRY
    ok_logins = {"mechanism": "user", "result": "ok"}
    assert registry.get_sample_value("popproxy_logins_total", ok_logins) == 1
    assert not any(family.name.startswith("popproxy_") for family in REGISTRY.collect())
