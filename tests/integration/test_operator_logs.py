"""What an operator reads, against the suite's Dovecot (issue 16, items 1, 2 and 4).

- ``session_end`` says what the client marked and what was really deleted upstream or
  hidden, and the QUIT reply says the same, under keep, delete_after_retrieve and expiry;
- a failed upstream leg is traced to its session and user (``session=`` on the
  ``upstream_*`` line, ``user=``, ``upstream=`` and ``result=upstream_error`` on
  ``session_end``);
- ``popproxy explain`` prints the real cause, CERTIFICATE_VERIFY_FAILED, for an upstream
  whose certificate does not chain to the configured CA.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trustme
from clocks import MovableClock

from .clocked import EXPIRE_DAYS, START, expiring_proxy
from .conftest import StartServer
from .dovecot import DovecotServer, DovecotUser
from .harness import (
    MESSAGES,
    PASSWORD,
    SOCKET_TIMEOUT_SECONDS,
    TlsFiles,
    Upstream,
    parse_logfmt,
    poplib_connection,
)
from .test_proxy import UPSTREAM, local_name, local_user
from .test_retention import DELETE_AFTER_RETRIEVE, KEEP, login, proxy


def counts(end: dict[str, str]) -> tuple[int, ...]:
    return tuple(int(end[key]) for key in ("marked", "deleted_upstream", "hidden", "expired"))


def test_keep_session_end_and_quit_reply_say_hidden_not_deleted(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser
) -> None:
    server = proxy(start, dovecot, KEEP, [local_user(account)])
    keys = account.keys()
    pop = login(server, local_name(account))
    for n in range(1, MESSAGES + 1):
        pop.dele(n)
    assert pop.quit() == (
        b"+OK Logging out, 0 messages deleted, 5 kept on the server and hidden from this mailbox."
    )
    [end] = server.wait_sessions_ended(1)
    dovecot.wait_sessions_ended(account, 1)
    assert account.keys() == keys
    assert counts(end) == (MESSAGES, 0, MESSAGES, 0)
    assert (end["user"], end["upstream"], end["result"]) == (local_name(account), UPSTREAM, "quit")


def test_delete_after_retrieve_session_end_and_quit_reply_count_the_deletions(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser
) -> None:
    server = proxy(start, dovecot, DELETE_AFTER_RETRIEVE, [local_user(account)])
    pop = login(server, local_name(account))
    pop.retr(1)
    pop.retr(3)
    assert pop.quit() == b"+OK Logging out, 2 messages deleted."
    [end] = server.wait_sessions_ended(1)
    dovecot.wait_sessions_ended(account, 1)
    assert len(account.keys()) == MESSAGES - 2
    assert counts(end) == (0, 2, 0, 0)


def quit_reply(port: int, user: str, marks: int) -> bytes:
    pop = poplib_connection(port)
    pop.user(user)
    pop.pass_(PASSWORD)
    for n in range(1, marks + 1):
        pop.dele(n)
    return pop.quit()


async def test_expiry_session_end_and_quit_reply_count_what_nobody_marked(
    dovecot: DovecotServer,
    account: DovecotUser,
    tls_files: TlsFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "popproxy.session")
    user = local_user(account)
    clock = MovableClock(START)
    async with expiring_proxy(tmp_path, tls_files, dovecot, user, clock) as port:
        first = await trio.to_thread.run_sync(quit_reply, port, user.name, 1)
        assert first == (
            b"+OK Logging out, 0 messages deleted, 1 kept on the server and hidden"
            b" from this mailbox."
        )
        clock.now = START + timedelta(days=EXPIRE_DAYS, hours=1)
        second = await trio.to_thread.run_sync(quit_reply, port, user.name, 0)
        assert second == b"+OK Logging out, 5 messages deleted."
        await trio.to_thread.run_sync(dovecot.wait_sessions_ended, account, 2)
        assert account.keys() == set()
    ends = [r.fields for r in caplog.records if r.getMessage() == "session_end"]  # type: ignore[attr-defined]
    assert [
        tuple(end[key] for key in ("marked", "deleted_upstream", "hidden", "expired"))
        for end in ends
    ] == [(1, 0, 1, 0), (0, 5, 0, 5)]


def test_an_untrusted_upstream_certificate_is_traced_to_the_session_and_explained(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))  # Dovecot's certificate is not from it
    host, port = dovecot.endpoint("implicit")
    upstream = Upstream(host, port, "implicit", ca_file=other_ca)
    server = proxy(start, dovecot, None, [local_user(account)], upstream=upstream)

    pop = poplib_connection(server.port("none"))
    pop.user(local_name(account))
    with pytest.raises(Exception, match=r"\[SYS/TEMP\]"):
        pop.pass_(PASSWORD)
    pop.quit()
    [end] = server.wait_sessions_ended(1)
    [tls] = server.records("upstream_tls_failed")
    assert tls["reason"] == "CERTIFICATE_VERIFY_FAILED"
    assert tls["session"] == end["session"]
    assert (end["user"], end["upstream"]) == (local_name(account), UPSTREAM)
    assert end["result"] == "upstream_error"
    # Every line about an upstream names the session it was for.
    upstream_lines = [r for r in server.records() if r.get("msg", "").startswith("upstream_")]
    assert upstream_lines
    assert all(r.get("session") == end["session"] for r in upstream_lines), upstream_lines

    explained = subprocess.run(
        [
            *(sys.executable, "-m", "popproxy", "explain"),
            *("-c", str(server.config), "--user", local_name(account)),
        ],
        capture_output=True,
        text=True,
        timeout=SOCKET_TIMEOUT_SECONDS,
        check=False,
    )
    assert explained.returncode == 1, explained
    assert explained.stdout == ""
    *logged, said = explained.stderr.splitlines()
    # The lower layer's own line, in the log format, then the explanation.
    assert [parse_logfmt(line)["msg"] for line in logged] == ["upstream_tls_failed"], logged
    assert said == (
        f"popproxy explain: upstream {UPSTREAM}: TLS handshake with {host}:{port} failed:"
        " CERTIFICATE_VERIFY_FAILED (unable to get local issuer certificate) (a client is told:"
        " -ERR [SYS/TEMP] The mail provider is unavailable, try again later.)"
    )
