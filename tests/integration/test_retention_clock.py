"""expire_after_days with an injected clock (issue 4): popproxy runs in this process
(``serve`` with a ``clock``) in front of the real Dovecot, poplib drives it from a
worker thread, and the test moves the clock by days between sessions."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import trio
from clocks import MovableClock

from .clocked import EXPIRE_DAYS, START, expiring_proxy
from .dovecot import DovecotServer, DovecotUser
from .harness import MESSAGES, PASSWORD, TlsFiles, poplib_connection
from .test_proxy import local_user


def session(port: int, user: str) -> tuple[list[list[str]], list[str]]:
    """Log in, read CAPA's EXPIRE before and after login, the UIDLs, QUIT."""
    pop = poplib_connection(port)
    before = pop.capa()["EXPIRE"]
    pop.user(user)
    pop.pass_(PASSWORD)
    after = pop.capa()["EXPIRE"]
    uids = [line.split()[1].decode() for line in pop.uidl()[1]]
    assert pop.quit().startswith(b"+OK")
    return [before, after], uids


async def test_expire_after_days_deletes_exactly_the_old_messages_once_time_has_passed(
    dovecot: DovecotServer, account: DovecotUser, tls_files: TlsFiles, tmp_path: Path
) -> None:
    user = local_user(account)
    clock = MovableClock(START)
    async with expiring_proxy(tmp_path, tls_files, dovecot, user, clock) as port:
        old = set(account.keys())

        capa, first = await trio.to_thread.run_sync(session, port, user.name)
        assert capa == [[str(EXPIRE_DAYS)]] * 2
        assert len(first) == MESSAGES

        clock.now = START + timedelta(days=2)
        new = {account.deliver(f"Subject: day 2 #{i}\r\n\r\n.\r\n".encode()) for i in range(2)}
        _, second = await trio.to_thread.run_sync(session, port, user.name)
        assert len(second) == MESSAGES + 2
        await trio.to_thread.run_sync(dovecot.wait_sessions_ended, account, 2)
        assert set(account.keys()) == old | new, "nothing is old enough yet"

        clock.now = START + timedelta(days=EXPIRE_DAYS, hours=1)
        _, third = await trio.to_thread.run_sync(session, port, user.name)
        assert len(third) == MESSAGES + 2  # offered until this QUIT
        await trio.to_thread.run_sync(dovecot.wait_sessions_ended, account, 3)
        assert set(account.keys()) == new, "exactly the messages first seen at START expire"

        _, fourth = await trio.to_thread.run_sync(session, port, user.name)
        assert len(fourth) == 2
