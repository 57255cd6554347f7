"""LeasedPoller (popproxy/gateway/leases.py): a poll holds its source's upstream mailbox
through the mailbox-lock interface, skips a round it cannot have, and stops when its
lease is lost. Leases here are SharedLocks over the in-memory table of
tests/test_shared_locks.py (trio's clock); tests/integration/test_gateway_scale_out.py
runs two real instances on PostgreSQL in front of Dovecot."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing
from test_shared_locks import LEASE, TableBackend

from popproxy.auth.passwords import hash_password
from popproxy.config import Config, FetchSource, UserConfig, load_config
from popproxy.gateway.fetcher import PollReport
from popproxy.gateway.leases import LeasedPoller, source_mailbox
from popproxy.locks import Hold, InProcessLocks, MailboxLost, UpstreamMailbox
from popproxy.logfmt import SESSION_ID
from popproxy.outcomes import PollResult
from popproxy.secret import Secret
from popproxy.shared_locks import SharedLocks, lease_name
from popproxy.state.base import SourceKey

HASH = hash_password(Secret.from_str("pw"), ln=4)
Setup = tuple[Config, UserConfig, FetchSource]

MAILBOX = UpstreamMailbox("pop.example.net", 995, "carol@example.net")


def load(directory: Path) -> tuple[Config, UserConfig, FetchSource]:
    """A config with one gateway source, carol's on provider (host in mixed case)."""
    path = directory / "popproxy.yaml"
    (directory / "pw").write_text("x")
    (directory / "pw").chmod(0o600)
    path.write_text(
        textwrap.dedent(f"""\
        listen: [{{address: 127.0.0.1, port: 0, tls: none}}]
        state: {{url: "sqlite:///{directory}/state.db"}}
        upstreams:
          provider: {{host: POP.Example.net, port: 995, tls: implicit}}
        users:
          carol:
            password_hash: "{HASH}"
            maildir: {directory}/mail
            fetch: [{{upstream: provider, upstream_user: carol@example.net,
                      upstream_password_file: {directory}/pw}}]
        """)
    )
    config = load_config(path)
    user = config.users["carol"]
    return config, user, user.fetch[0]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Config, UserConfig, FetchSource]:
    return load(tmp_path)


class ScriptedPoller:
    """Stands in for the Fetcher: records each poll's hold and id and the log context,
    confirms the hold as a poll with deletions does, or never ends (``forever``)."""

    def __init__(self, *, forever: bool = False, deletes: bool = False) -> None:
        self.forever = forever
        self.deletes = deletes
        self.calls: list[tuple[Hold, str, str | None]] = []
        self.started = trio.Event()

    async def poll(
        self, config: Config, user: UserConfig, source: FetchSource, *, hold: Hold, poll_id: str
    ) -> PollReport:
        self.calls.append((hold, poll_id, SESSION_ID.get()))
        self.started.set()
        key = SourceKey(user.name, source.upstream, source.upstream_user)
        if self.forever:
            await trio.sleep_forever()
        if self.deletes:
            try:
                await hold.confirm()
            except MailboxLost as exc:
                return PollReport(key, poll_id, PollResult.LEASE_LOST, reason=exc.text)
        return PollReport(key, poll_id, PollResult.OK)


def test_a_source_is_locked_as_its_upstream_account(setup: Setup) -> None:
    """The key a proxy session on the account takes too (host in lower case)."""
    assert source_mailbox(setup[0], setup[2]) == MAILBOX


async def test_a_free_mailbox_is_polled_under_its_hold_and_the_poll_id_is_the_log_session(
    setup: Setup,
) -> None:
    locks = InProcessLocks()
    fetcher = ScriptedPoller()
    report = await LeasedPoller(fetcher, locks).poll(*setup)
    assert report.result is PollResult.OK
    [(_hold, poll_id, logged_as)] = fetcher.calls
    assert report.poll_id == poll_id == logged_as
    assert SESSION_ID.get() is None  # reset after the poll
    assert not locks.held(MAILBOX)  # given back


async def test_a_held_mailbox_skips_the_round_quietly(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy session (or another poll) holds the account: no poll, result busy, one
    debug gateway_poll line, no warning."""
    caplog.set_level(logging.DEBUG, logger="popproxy")
    locks = InProcessLocks()
    fetcher = ScriptedPoller()
    async with locks.hold(MAILBOX, wait_seconds=0):
        report = await LeasedPoller(fetcher, locks).poll(*setup)
    assert report.result is PollResult.BUSY
    assert not fetcher.calls
    [line] = [r for r in caplog.records if r.getMessage() == "gateway_poll"]
    assert line.levelno == logging.DEBUG
    assert line.fields["result"] == "busy"  # type: ignore[attr-defined]
    assert line.fields["session"] == report.poll_id  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_two_instances_never_poll_one_source_at_once(
    setup: Setup,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Instance one polls (a long poll); instance two's poll of the same source is busy
    until one has finished, then polls."""
    backend = TableBackend()
    one = SharedLocks(backend, lease_seconds=LEASE, holder="one")
    two = SharedLocks(backend, lease_seconds=LEASE, holder="two")
    slow = ScriptedPoller(forever=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(LeasedPoller(slow, one).poll, *setup)
        await slow.started.wait()
        assert backend.holder_of(lease_name(MAILBOX)) == "one"
        other = ScriptedPoller()
        busy = await LeasedPoller(other, two).poll(*setup)
        assert busy.result is PollResult.BUSY
        assert not other.calls
        nursery.cancel_scope.cancel()  # one's poll ends (as at a shutdown)
    assert lease_name(MAILBOX) not in backend.rows
    done = await LeasedPoller(other, two).poll(*setup)
    assert done.result is PollResult.OK


async def test_a_lease_taken_over_mid_poll_stops_the_poll(
    setup: Setup,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The renewal finds the lease another holder's: the poll is cancelled at once
    (result lease_lost, a warning), and the thief's lease is left alone."""
    backend = TableBackend()
    locks = SharedLocks(backend, lease_seconds=LEASE, holder="one")
    fetcher = ScriptedPoller(forever=True)
    result: list[PollReport] = []

    async def poll() -> None:
        result.append(await LeasedPoller(fetcher, locks).poll(*setup))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await fetcher.started.wait()
        backend.rows[lease_name(MAILBOX)] = ("thief", "t", trio.current_time() + LEASE)
        await locks.renew()
    [report] = result
    assert report.result is PollResult.LEASE_LOST
    assert backend.holder_of(lease_name(MAILBOX)) == "thief"
    lines = {r.getMessage(): r for r in caplog.records}
    assert lines["gateway_poll"].levelno == logging.WARNING
    assert lines["lease_lost"].fields["session"] == report.poll_id  # type: ignore[attr-defined]


async def test_a_lease_that_cannot_be_renewed_stops_the_poll_before_the_database_frees_it(
    setup: Setup,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The database goes away mid-poll: the poll stops (lease_lost) before the
    database's expiry, so no other instance can have started on the source yet."""
    backend = TableBackend()
    locks = SharedLocks(backend, lease_seconds=LEASE, holder="one")
    fetcher = ScriptedPoller(forever=True)
    result: list[tuple[PollReport, float]] = []

    async def poll() -> None:
        report = await LeasedPoller(fetcher, locks).poll(*setup)
        result.append((report, trio.current_time()))

    async with trio.open_nursery() as nursery:
        await nursery.start(locks.run)
        with trio.fail_after(2 * LEASE):
            async with trio.open_nursery() as polls:
                polls.start_soon(poll)
                await fetcher.started.wait()
                expiry = backend.rows[lease_name(MAILBOX)][2]
                backend.down = True
        nursery.cancel_scope.cancel()
    [(report, ended)] = result
    assert report.result is PollResult.LEASE_LOST
    assert ended < expiry


async def test_a_lease_lost_before_the_deletions_refuses_them(
    setup: Setup,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Confirm before the DELEs: the lease lapsed unrenewed and another took it."""
    backend = TableBackend()
    locks = SharedLocks(backend, lease_seconds=LEASE, holder="one")

    class LapsingPoller(ScriptedPoller):
        async def poll(
            self,
            config: Config,
            user: UserConfig,
            source: FetchSource,
            *,
            hold: Hold,
            poll_id: str,
        ) -> PollReport:
            name = lease_name(MAILBOX)
            backend.rows[name] = ("thief", "t", trio.current_time() + LEASE)
            return await super().poll(config, user, source, hold=hold, poll_id=poll_id)

    report = await LeasedPoller(LapsingPoller(deletes=True), locks).poll(*setup)
    assert report.result is PollResult.LEASE_LOST


async def test_a_database_that_cannot_be_asked_is_a_state_error(
    setup: Setup,
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = TableBackend()
    backend.down = True
    fetcher = ScriptedPoller()
    locks = SharedLocks(backend, lease_seconds=LEASE, holder="one")
    report = await LeasedPoller(fetcher, locks).poll(*setup)
    assert report.result is PollResult.STATE_ERROR
    assert not fetcher.calls


async def test_a_poll_cut_short_by_a_shutdown_logs_its_end_and_gives_the_mailbox_back(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="popproxy")
    locks = InProcessLocks()
    fetcher = ScriptedPoller(forever=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(LeasedPoller(fetcher, locks).poll, *setup)
        await fetcher.started.wait()
        nursery.cancel_scope.cancel()
    assert not locks.held(MAILBOX)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gateway")]
    assert lines == ["gateway_poll_started", "gateway_poll_cancelled"]
