"""expire_after_days with an injected clock (issue 4): popproxy runs in this process
(``serve`` with a ``clock``) in front of the real Dovecot, poplib drives it from a
worker thread, and the test moves the clock by days between sessions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from popproxy.config import load_config
from popproxy.serve import serve

from .dovecot import DovecotServer, DovecotUser
from .harness import (
    PASSWORD,
    Corpus,
    TlsFiles,
    poplib_connection,
    write_config,
)
from .test_proxy import UPSTREAM, upstream_for
from .test_retention import MESSAGES, local_user

EXPIRE_DAYS = 3
EXPIRE = {
    "50-expire.yaml": (
        f"rules:\n  - name: expire-old\n    action: keep\n    expire_after_days: {EXPIRE_DAYS}\n"
    )
}
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
# The whole in-process test: three sessions against Dovecot and a clean shutdown.
TEST_DEADLINE_SECONDS = 60


class MovableClock:
    """What popproxy reads as now; the test moves it forward by days."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def account(dovecot: DovecotServer, corpus: Corpus) -> Iterator[DovecotUser]:
    user = dovecot.add_user(corpus=corpus, messages=corpus.small[:MESSAGES])
    yield user
    dovecot.remove_user(user)


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
    config = load_config(
        write_config(
            tmp_path / "popproxy.yaml",
            users=[user],
            tls=tls_files,
            listeners=["none"],
            upstreams={UPSTREAM: upstream_for(dovecot, "none")},
            rules=EXPIRE,
        )
    )
    clock = MovableClock(START)
    shutdown = trio.Event()
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(
                lambda task_status: serve(
                    config, shutdown=shutdown, clock=clock, task_status=task_status
                )
            )
            port = ports[0][1]
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
            shutdown.set()
