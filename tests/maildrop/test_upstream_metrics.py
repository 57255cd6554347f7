"""What the live upstream maildrop reports to popproxy.metrics, against scripted peers.

The peers, accounts and TLS material are those of test_upstream.py; the metrics
are a real ``Metrics`` on a fresh registry, read back as Prometheus samples.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

import prometheus_client
import pytest
import test_upstream
import trio
import trio.testing
import trustme
from prometheus_client import CollectorRegistry
from test_upstream import (
    CAPA_PIPELINING,
    CAPA_PLAIN,
    COMMAND_TIMEOUT,
    MESSAGES,
    PASSWORD,
    Mailbox,
    Upstream,
    account,
    collect,
    scripted_upstream,
    server_tls,
    stuff,
)

from popproxy.config import TlsMode, UpstreamConfig
from popproxy.maildrop.upstream import (
    UpstreamError,
    UpstreamMaildrop,
    open_upstream,
)
from popproxy.metrics import Metrics
from popproxy.outcomes import UpstreamFailure
from popproxy.tls import client_context

# The fixtures of test_upstream.py, used here by name.
ca = test_upstream.ca
ca_file = test_upstream.ca_file

NAME = "provider"  # the upstream name account() configures; no user name or host
UP = "popproxy_upstream_"


def new_metrics() -> Metrics:
    metrics = Metrics(CollectorRegistry())
    metrics.declare(upstreams=[NAME])
    return metrics


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(UP + name, {"upstream": NAME, **labels})
    assert found is not None, (name, labels)
    return found


def commands(metrics: Metrics, verb: str) -> float:
    found = metrics.registry.get_sample_value(
        UP + "command_duration_seconds_count", {"upstream": NAME, "verb": verb}
    )
    return 0.0 if found is None else found


def errors(metrics: Metrics) -> dict[str, float]:
    """The non-zero error counts, by kind."""
    out = {}
    for failure in UpstreamFailure:
        count = value(metrics, "errors_total", kind=failure.value)
        if count:
            out[failure.value] = count
    return out


async def open_with(
    upstream: Upstream,
    metrics: Metrics,
    *,
    tls: TlsMode = TlsMode.NONE,
    tls_context: ssl.SSLContext | None = None,
) -> UpstreamMaildrop:
    return await open_upstream(
        account(upstream.port, tls=tls), tls_context=tls_context, metrics=metrics.upstream(NAME)
    )


@pytest.mark.parametrize("capa", [CAPA_PLAIN, CAPA_PIPELINING], ids=["serial", "pipelined"])
async def test_a_whole_session_is_counted(capa: Sequence[bytes]) -> None:
    metrics = new_metrics()
    async with scripted_upstream(Mailbox(dict(MESSAGES), capa=capa)) as upstream:
        drop = await open_with(upstream, metrics)
        assert value(metrics, "logins_total", result="ok") == 1
        assert value(metrics, "sessions_active") == 1
        assert value(metrics, "connect_duration_seconds_count") == 1
        assert value(metrics, "login_duration_seconds_count") == 1
        await collect(drop, 0)
        await collect(drop, 1, body_lines=0)
        await drop.keep_alive()
        await drop.commit({0, 2})
        received = drop.bytes_received
    assert (commands(metrics, "RETR"), commands(metrics, "TOP")) == (1, 1)
    assert (commands(metrics, "NOOP"), commands(metrics, "DELE"), commands(metrics, "QUIT")) == (
        1,
        2,
        1,
    )
    assert commands(metrics, "LIST") == 0  # the listing at login is part of the login
    assert value(metrics, "messages_deleted_total") == 2
    assert value(metrics, "sessions_active") == 0
    assert value(metrics, "received_bytes_total") == received > 0
    assert value(metrics, "logins_total", result="failed") == 0
    assert errors(metrics) == {}


async def test_closing_without_quit_deletes_nothing_and_closes_the_session() -> None:
    metrics = new_metrics()
    async with scripted_upstream(Mailbox(dict(MESSAGES))) as upstream:
        drop = await open_with(upstream, metrics)
        await drop.aclose()
        await drop.aclose()  # closed once, counted once
    assert value(metrics, "sessions_active") == 0
    assert value(metrics, "messages_deleted_total") == 0
    assert commands(metrics, "QUIT") == 0


async def test_a_refused_login_is_one_failed_attempt_of_its_kind() -> None:
    mailbox = Mailbox(
        dict(MESSAGES), replies={b"PASS " + PASSWORD.encode(): b"-ERR [IN-USE] locked\r\n"}
    )
    metrics = new_metrics()
    async with scripted_upstream(mailbox) as upstream:
        with pytest.raises(UpstreamError):
            await open_with(upstream, metrics)
    assert value(metrics, "logins_total", result="failed") == 1
    assert value(metrics, "logins_total", result="ok") == 0
    assert errors(metrics) == {"in_use": 1}
    assert value(metrics, "login_duration_seconds_count") == 0  # successful logins only
    assert value(metrics, "sessions_active") == 0


async def test_a_refused_connection_is_a_connect_error() -> None:
    metrics = new_metrics()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        with pytest.raises(UpstreamError):
            await open_upstream(
                account(closed.getsockname()[1]), tls_context=None, metrics=metrics.upstream(NAME)
            )
    assert errors(metrics) == {"connect": 1}
    assert value(metrics, "logins_total", result="failed") == 1
    assert value(metrics, "connect_duration_seconds_count") == 0


async def test_an_untrusted_certificate_is_a_tls_error(
    ca: trustme.CA,
    ca_file: Path,
) -> None:
    metrics = new_metrics()
    untrusted = server_tls(trustme.CA(), "127.0.0.1")
    context = client_context(account(1, tls=TlsMode.IMPLICIT, ca_file=ca_file).upstream)
    async with scripted_upstream(Mailbox(), implicit_tls=untrusted) as upstream:
        with pytest.raises(UpstreamError):
            await open_with(upstream, metrics, tls=TlsMode.IMPLICIT, tls_context=context)
    assert errors(metrics) == {"tls": 1}
    assert value(metrics, "connect_duration_seconds_count") == 0


async def test_an_implicit_tls_connection_is_timed_once_with_its_handshake(
    ca: trustme.CA,
    ca_file: Path,
) -> None:
    metrics = new_metrics()
    good = server_tls(ca, "127.0.0.1")
    config: UpstreamConfig = account(1, tls=TlsMode.IMPLICIT, ca_file=ca_file).upstream
    async with scripted_upstream(Mailbox(dict(MESSAGES)), implicit_tls=good) as upstream:
        drop = await open_with(
            upstream, metrics, tls=TlsMode.IMPLICIT, tls_context=client_context(config)
        )
        await drop.commit(set())
    assert value(metrics, "connect_duration_seconds_count") == 1
    assert value(metrics, "connect_duration_seconds_sum") > 0
    assert value(metrics, "logins_total", result="ok") == 1


async def test_a_retr_that_times_out_is_one_timeout_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stalled = b"+OK\r\nSubject: one\r\n"  # then nothing: the terminator never comes
    metrics = new_metrics()
    async with scripted_upstream(Mailbox(dict(MESSAGES), replies={b"RETR 1": stalled})) as upstream:
        drop = await open_with(upstream, metrics)
        start = trio.current_time()
        with pytest.raises(UpstreamError) as info:
            await collect(drop, 0)
        assert trio.current_time() - start == pytest.approx(COMMAND_TIMEOUT)
        assert info.value.failure is UpstreamFailure.TIMEOUT
        # The connection is broken now; its later uses fail without counting again.
        with pytest.raises(UpstreamError):
            await collect(drop, 1)
        with pytest.raises(UpstreamError):
            await drop.commit(set())
        await drop.aclose()
    assert errors(metrics) == {"timeout": 1}
    assert commands(metrics, "RETR") == 1  # its status line came at once
    assert value(metrics, "sessions_active") == 0
    assert value(metrics, "logins_total", result="ok") == 1


@pytest.mark.parametrize(
    ("replies", "kind"),
    [
        ({b"QUIT": b"-ERR could not delete\r\n"}, "rejected"),
        ({b"DELE 1": b"-ERR no\r\n"}, "rejected"),
    ],
    ids=["quit-err", "dele-err"],
)
async def test_a_commit_the_upstream_refuses_deletes_nothing_and_counts_one_error(
    replies: dict[bytes, bytes], kind: str
) -> None:
    metrics = new_metrics()
    async with scripted_upstream(Mailbox(dict(MESSAGES), replies=replies)) as upstream:
        drop = await open_with(upstream, metrics)
        with pytest.raises(UpstreamError):
            await drop.commit({0})
        await drop.aclose()
    assert errors(metrics) == {kind: 1}
    assert value(metrics, "messages_deleted_total") == 0
    assert value(metrics, "sessions_active") == 0


async def test_a_keep_alive_refused_is_one_rejected_error() -> None:
    metrics = new_metrics()
    mailbox = Mailbox(dict(MESSAGES), replies={b"NOOP": b"-ERR go away\r\n"})
    async with scripted_upstream(mailbox) as upstream:
        drop = await open_with(upstream, metrics)
        await drop.keep_alive()
        await drop.keep_alive()  # broken now: not sent again, not counted again
        await drop.aclose()
    assert errors(metrics) == {"rejected": 1}
    assert commands(metrics, "NOOP") == 1


async def test_a_cancelled_login_is_not_counted() -> None:
    metrics = new_metrics()

    async with scripted_upstream(Mailbox(dict(MESSAGES))) as upstream:
        with trio.move_on_after(0):
            await open_with(upstream, metrics)
    assert value(metrics, "logins_total", result="failed") == 0
    assert value(metrics, "logins_total", result="ok") == 0
    assert errors(metrics) == {}


def global_popproxy_samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every popproxy sample in prometheus_client's global registry, where a metric made
    without an explicit registry would report."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in prometheus_client.REGISTRY.collect()
        for sample in family.samples
        if sample.name.startswith("popproxy_")
    }


async def test_without_metrics_nothing_is_reported_and_all_works() -> None:
    """``metrics=None``: the counts go to an unexported Metrics nobody reads, nothing
    reaches the global registry, and the session still retrieves, keeps alive, deletes
    and quits."""
    before = global_popproxy_samples()
    async with scripted_upstream(Mailbox(dict(MESSAGES))) as upstream:
        drop = await open_upstream(account(upstream.port), tls_context=None)
        assert await collect(drop, 1) == stuff(MESSAGES[2][1])
        await drop.keep_alive()
        await drop.commit({1})
    assert [line for line in upstream.lines if line.split()[0] in (b"NOOP", b"DELE", b"QUIT")] == [
        b"NOOP",
        b"DELE 2",
        b"QUIT",
    ]
    assert global_popproxy_samples() == before


# A message as an upstream that does not dot-stuff sends it: two lines of a single dot
# ended by a bare LF (RFC 1939 §3 has none; pop3/dotstuff.py).
POISONED = b"Subject: poisoned\r\n\r\n.\nafter\r\n.\n"


async def test_a_poisoned_dot_line_is_relayed_stuffed_counted_and_logged_once_per_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    metrics = new_metrics()
    mailbox = Mailbox(
        {1: (b"uid-poisoned", POISONED), 2: MESSAGES[2]},
        replies={b"RETR 1": b"+OK\r\n" + POISONED + b".\r\n"},
    )
    async with scripted_upstream(mailbox) as upstream:
        drop = await open_upstream(
            account(upstream.port),
            tls_context=None,
            metrics=metrics.upstream(NAME),
            session_id="s1",
        )
        for _ in range(2):  # the message stays retrievable on the same connection
            assert await collect(drop, 0) == b"Subject: poisoned\r\n\r\n..\nafter\r\n..\n"
        assert await collect(drop, 1) == stuff(MESSAGES[2][1])
        await drop.commit(set())
    assert len(upstream.peers) == 1
    assert value(metrics, "poisoned_dot_lines_total") == 4
    assert errors(metrics) == {}
    logged = [r for r in caplog.records if r.getMessage() == "upstream_poisoned_dot_line"]
    assert [getattr(r, "fields", None) for r in logged] == [
        {"session": "s1", "upstream": NAME, "uid": "uid-poisoned", "lines": 2}
    ] * 2


async def test_a_poisoned_dot_line_in_a_header_is_content_for_the_rules(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """TOP n 0 for header rules: a header with such a line is read whole (stuffed, as
    relayed), counted and logged once, and the next header follows on the same
    connection."""
    caplog.set_level(logging.INFO)
    metrics = new_metrics()
    header = b"Subject: poisoned\r\n.\nX-After: yes\r\n\r\n"
    mailbox = Mailbox(
        {1: (b"uid-poisoned", header + b"body\r\n"), 2: MESSAGES[2]},
        replies={b"TOP 1 0": b"+OK\r\n" + header + b".\r\n"},
    )
    async with scripted_upstream(mailbox) as upstream:
        drop = await open_upstream(
            account(upstream.port),
            tls_context=None,
            metrics=metrics.upstream(NAME),
            session_id="s2",
        )
        async with contextlib.aclosing(drop.headers([0, 1], 1000)) as replies:
            got = [wire async for _, wire in replies]
        await drop.commit(set())
    assert got[0] == b"Subject: poisoned\r\n..\nX-After: yes\r\n\r\n"
    assert got[1] is not None and got[1].startswith(b"Subject: two")
    assert value(metrics, "poisoned_dot_lines_total") == 1
    logged = [r for r in caplog.records if r.getMessage() == "upstream_poisoned_dot_line"]
    assert [getattr(r, "fields", None) for r in logged] == [
        {"session": "s2", "upstream": NAME, "uid": "uid-poisoned", "lines": 1}
    ]
