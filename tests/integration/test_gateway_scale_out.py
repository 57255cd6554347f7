"""Gateway polls across instances (issue 13; docs/scaling.md, docs/gateway.md): two
``popproxy run`` processes share one PostgreSQL store (a schema of its own per test)
and poll the same sources on the suite's Dovecot; each source's upstream mailbox is
held as a lease while it is polled.

What shows that a source is polled by one instance at a time is the instances' own
log lines, not timing: a poll's ``gateway_poll_started`` line (logged once the lease
is taken) and its ``gateway_poll`` line (or ``gateway_poll_cancelled`` at a shutdown;
both logged before the lease is given back) bracket its upstream session, and a
lease passes from one holder to the next only through the database, so on one host
the brackets of one source never overlap. Dovecot's log then shows no upstream
login that no bracket accounts for.

Polls are every ``INTERVAL_SECONDS`` with no jitter, so the two instances keep
asking for the same sources; ``state.lease_seconds`` is the shortest allowed, so a
killed instance's lease lapses within ``LEASE_SECONDS``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import trio
import yaml
from state.state_backends import PostgresBackend, new_postgres_backend

from popproxy.config import load_config
from popproxy.gateway.durable import Step
from popproxy.gateway.fetcher import Fetcher
from popproxy.gateway.leases import LeasedPoller, source_mailbox
from popproxy.maildrop.retention import utc_now
from popproxy.outcomes import PollResult
from popproxy.shared_locks import SharedLocks
from popproxy.state import open_store
from popproxy.state.base import GatewayStore
from popproxy.state.opener import SharedOpener

from .dovecot import DovecotServer, DovecotUser
from .harness import (
    LOOPBACK,
    PASSWORD,
    SERVER_STOP_DEADLINE_SECONDS,
    GatewayUser,
    ServerProcess,
    Source,
    TlsFiles,
    Upstream,
    write_config,
)
from .relay import Hold, HoldingRelay
from .test_proxy import UPSTREAM, upstream_for

# state.lease_seconds: the shortest allowed (renewed every second).
LEASE_SECONDS = 3
INTERVAL_SECONDS = 0.2
GATEWAY = {
    "interval_seconds": INTERVAL_SECONDS,
    "jitter_seconds": 0,
    "backoff_initial_seconds": 0.5,
    "backoff_max_seconds": 1,
}
# Sources, and messages delivered to each per round while the instances run.
SOURCES = 3
MESSAGES_PER_ROUND = 4
ROUNDS = 3
# How long a condition may take to come true (polls, Dovecot, a loaded 2-core machine).
WAIT_SECONDS = 60
CONDITION_POLL_SECONDS = 0.05
# Beyond LEASE_SECONDS and one interval, what a takeover may take: the survivor's poll
# start after the lapse, and this machine's scheduling.
TAKEOVER_SLACK_SECONDS = 2


def message(account: DovecotUser, round_: int, number: int) -> bytes:
    """A message no other delivery of the test has (so a duplicate cannot hide)."""
    return (
        f"Subject: {account.name} round {round_} message {number}\r\n\r\n"
        f"body of {account.name}/{round_}/{number}\r\n"
    ).encode()


def deliver(accounts: Sequence[DovecotUser], round_: int, expected: Counter[str]) -> None:
    for account in accounts:
        for number in range(MESSAGES_PER_ROUND):
            data = message(account, round_, number)
            account.deliver(data)
            expected[hashlib.sha256(data).hexdigest()] += 1


def local_digests(maildir: Path) -> Counter[str]:
    """sha256 of every message in new/ and cur/ of the gateway's Maildir."""
    return Counter(
        hashlib.sha256(path.read_bytes()).hexdigest()
        for sub in ("new", "cur")
        if (maildir / sub).is_dir()
        for path in (maildir / sub).iterdir()
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(CONDITION_POLL_SECONDS)


def start_instance(
    workdir: Path, tls: TlsFiles, upstream: Upstream, user: GatewayUser, state_url: str
) -> ServerProcess:
    """One instance (not yet waited for): the gateway user, the shared store, short
    leases, debug lines (gateway_poll_started, busy polls)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir / "popproxy.yaml",
        users=[user],
        tls=tls,
        listeners=["none"],
        upstreams={UPSTREAM: upstream},
        state=state_url,
        gateway=GATEWAY,
    )
    data: dict[str, Any] = yaml.safe_load(config.read_text())
    data["state"]["lease_seconds"] = LEASE_SECONDS
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return ServerProcess(config, listeners=["none"], cwd=workdir, log_level="debug")


@contextlib.contextmanager
def two_instances(
    workdir: Path, tls: TlsFiles, upstream: Upstream, user: GatewayUser, state_url: str
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Instances a and b, started together (so their first polls meet); each stopped
    with SIGTERM at the end and must exit 0 unless a test killed it."""
    servers = [start_instance(workdir / n, tls, upstream, user, state_url) for n in "ab"]
    try:
        for server in servers:
            server.wait_ready()
        yield servers[0], servers[1]
    finally:
        failures = []
        for server in servers:
            code = server.stop(SERVER_STOP_DEADLINE_SECONDS)
            if code != 0 and not server.crashed:
                failures.append(f"exit {code}\n{server.log_text()}")
        assert not failures, failures


def gateway_user(tmp_path: Path, accounts: Sequence[DovecotUser]) -> GatewayUser:
    sources = tuple(Source(UPSTREAM, a.name, a.password) for a in accounts)
    return GatewayUser("carol", PASSWORD, tmp_path / "carol-mail", sources)


def gateway_config(
    workdir: Path,
    tls: TlsFiles,
    dovecot: DovecotServer,
    user: GatewayUser,
    state_url: str,
    *,
    limits: Mapping[str, float] | None = None,
) -> Path:
    """The config of a gateway run in this process (the plain listener only):
    ``user``'s sources on the suite's Dovecot, the shared store."""
    return write_config(
        workdir / "popproxy.yaml",
        users=[user],
        tls=tls,
        listeners=["none"],
        upstreams={UPSTREAM: upstream_for(dovecot, "none")},
        state=state_url,
        limits=limits,
    )


def timestamp(record: dict[str, str]) -> float:
    """The wall-clock time of a log line (ts=2026-12-07T13:07:24.123Z)."""
    return datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


@dataclass(frozen=True, slots=True)
class Poll:
    """One poll that held its source's lease: from its gateway_poll_started line to its
    gateway_poll line (``end`` None: it had not ended when the log was read)."""

    instance: str
    session: str
    source: str
    start: float
    end: float | None
    result: str | None


def polls_of(
    instance: str, server: ServerProcess, *, killed: float | None = None
) -> tuple[list[Poll], int]:
    """The polls of ``server`` that held a lease, and how many were busy (skipped). A
    poll still open when the instance was ``killed`` ends there (it did nothing after)."""
    records = server.records()
    ended = {
        r["session"]: r
        for r in records
        if r.get("msg") in {"gateway_poll", "gateway_poll_cancelled"}
    }
    polls = []
    for r in records:
        if r.get("msg") != "gateway_poll_started":
            continue
        end = ended.get(r["session"])
        polls.append(
            Poll(
                instance,
                r["session"],
                r["source"],
                timestamp(r),
                timestamp(end) if end is not None else killed,
                end.get("result", "cancelled") if end is not None else None,
            )
        )
    busy = sum(r.get("result") == "busy" for r in ended.values())
    return polls, busy


def met_and_both_polled(a: ServerProcess, b: ServerProcess) -> bool:
    """Both instances held a lease at least once, and one was turned away (busy)."""
    (polls_a, busy_a), (polls_b, busy_b) = polls_of("a", a), polls_of("b", b)
    return bool(polls_a) and bool(polls_b) and busy_a + busy_b > 0


def assert_one_at_a_time(polls: Sequence[Poll]) -> None:
    """Per source, each poll starts no earlier than the one before it ended."""
    by_source: dict[str, list[Poll]] = {}
    for poll in polls:
        by_source.setdefault(poll.source, []).append(poll)
    for source, held in by_source.items():
        held.sort(key=lambda p: p.start)
        for before, after in itertools.pairwise(held):
            assert before.end is not None, f"{source}: {before} had not ended when {after} began"
            assert before.end <= after.start, f"{source}: {before} overlaps {after}"


def test_each_source_is_polled_by_one_instance_at_a_time_and_all_mail_arrives_once(
    tmp_path: Path, tls_files: TlsFiles, dovecot: DovecotServer, pg_database: str
) -> None:
    """Three sources, two instances polling every 0.2 s, mail delivered in three rounds
    while they run: every message reaches the Maildir exactly once and leaves Dovecot;
    per source the lease-holding polls of both instances never overlap, both
    instances polled and were turned away (busy) meanwhile, and Dovecot saw one
    login per such poll."""
    accounts = [dovecot.add_user() for _ in range(SOURCES)]
    try:
        expected: Counter[str] = Counter()
        deliver(accounts, 0, expected)
        user = gateway_user(tmp_path, accounts)
        url = new_postgres_backend(pg_database).url
        with two_instances(tmp_path, tls_files, upstream_for(dovecot, "none"), user, url) as (
            a,
            b,
        ):
            for round_ in range(1, ROUNDS + 1):
                wait_for(
                    lambda: all(account.count() == 0 for account in accounts),
                    f"Dovecot emptied before round {round_}",
                )
                if round_ < ROUNDS:
                    deliver(accounts, round_, expected)
            wait_for(
                lambda: local_digests(user.maildir) == expected,
                "every message in the Maildir once",
            )
            # Polling every interval without jitter, the instances keep asking for the
            # same sources, so both poll and they meet on one sooner or later; how
            # soon depends on the machine's load, so the test waits for that rather
            # than expect it within the delivery rounds.
            wait_for(
                lambda: met_and_both_polled(a, b),
                "both instances polled and met on a source (one was kept out)",
            )
        polls_a, busy_a = polls_of("a", a)
        polls_b, busy_b = polls_of("b", b)
        polls = polls_a + polls_b
        assert_one_at_a_time(polls)
        assert {p.result for p in polls} <= {"ok", "cancelled"}, polls  # cancelled: the stop
        assert polls_a and polls_b, "both instances polled"
        assert busy_a + busy_b > 0, "the instances met on a source (and one was kept out)"
        assert local_digests(user.maildir) == expected  # nothing came twice meanwhile
        for account in accounts:
            label = f"{UPSTREAM}/{account.name}"
            held = [p for p in polls if p.source == label]
            done = sum(p.result == "ok" for p in held)
            logins = dovecot.wait_for_log(rf"Login: user=<{account.name}>,", count=done)
            assert done <= len(logins) <= len(held), (account.name, len(logins), held)
    finally:
        for account in accounts:
            dovecot.remove_user(account)


def lease_holders(backend: PostgresBackend) -> list[str]:
    """The holders of the live leases (host:pid:random)."""
    rows = backend.query("SELECT holder FROM leases WHERE expires_at > now()")
    return [str(row[0]) for row in rows]


def test_sigkill_of_the_polling_instance_hands_the_source_to_the_survivor_within_the_bound(
    tmp_path: Path, tls_files: TlsFiles, dovecot: DovecotServer, pg_database: str
) -> None:
    """The instance holding the source's lease has fetched everything and sent its
    DELEs, and its QUIT is held (a relay keeps it from Dovecot): the other instance is
    kept out (busy). It is killed (SIGKILL): Dovecot deleted nothing, and within
    lease_seconds of the kill the survivor polls the source, fetches nothing again
    (every message was durable and recorded) and deletes what the dead one could not."""
    account = dovecot.add_user()
    expected: Counter[str] = Counter()
    relay = HoldingRelay(dovecot.endpoint("none"), Hold.QUIT)
    try:
        deliver([account], 0, expected)
        backend = new_postgres_backend(pg_database)
        user = gateway_user(tmp_path, [account])
        upstream = Upstream(LOOPBACK, relay.port, "none")
        label = f"{UPSTREAM}/{account.name}"
        with two_instances(tmp_path, tls_files, upstream, user, backend.url) as (a, b):
            assert relay.holding.wait(WAIT_SECONDS), "no poll reached its QUIT"
            [holder] = lease_holders(backend)
            pid = int(holder.split(":")[1])
            assert pid in {a.pid, b.pid}
            dying, survivor = (a, b) if pid == a.pid else (b, a)
            assert local_digests(user.maildir) == expected  # durable before any DELE
            survivor.wait_for_log(
                lambda rs: any(
                    r.get("msg") == "gateway_poll" and r.get("result") == "busy" for r in rs
                ),
                timeout=WAIT_SECONDS,
                what="a busy poll on the survivor",
            )
            relay.pass_quits()
            dying.crash()
            killed = time.time()

            def done(record: dict[str, str]) -> bool:
                return record.get("msg") == "gateway_poll" and record.get("result") == "ok"

            assert account.count() == len(expected)  # no QUIT reached Dovecot: no deletion
            records = survivor.wait_for_log(
                lambda rs: any(map(done, rs)),
                timeout=WAIT_SECONDS,
                what="the survivor's poll after the kill",
            )
            took_over = next(r for r in records if done(r))
            started = [
                r
                for r in records
                if r.get("msg") == "gateway_poll_started"
                and r.get("session") == took_over["session"]
            ]
            assert timestamp(started[0]) - killed <= (
                LEASE_SECONDS + INTERVAL_SECONDS + TAKEOVER_SLACK_SECONDS
            )
            assert took_over["source"] == label
            assert (took_over["fetched"], took_over["deleted"]) == ("0", str(len(expected)))
            wait_for(lambda: account.count() == 0, "Dovecot emptied by the survivor")
        assert local_digests(user.maildir) == expected  # each message once
        polls, _ = polls_of("survivor", survivor)
        dead, _ = polls_of("dying", dying, killed=killed)
        assert_one_at_a_time(polls + dead)
    finally:
        relay.close()
        dovecot.remove_user(account)


async def test_a_lease_lost_before_the_deletions_deletes_nothing(
    tmp_path: Path, tls_files: TlsFiles, dovecot: DovecotServer, pg_database: str
) -> None:
    """In this process, on PostgreSQL: the poll has delivered everything when another
    holder takes its lease (as one would after the lease lapsed). Confirming the lease
    before the DELEs fails: result lease_lost, nothing deleted upstream. Once the
    other holder has left, the next poll deletes them and fetches nothing again."""
    account = dovecot.add_user()
    expected: Counter[str] = Counter()
    backend = new_postgres_backend(pg_database)
    try:
        deliver([account], 0, expected)
        user = gateway_user(tmp_path, [account])
        config = load_config(gateway_config(tmp_path, tls_files, dovecot, user, backend.url))
        local = config.users[user.name]
        source = local.fetch[0]
        store = await open_store(config.state)
        shared = SharedOpener(config.state)
        stolen = threading.Event()

        async def steal(step: Step) -> None:
            if step is Step.DELIVERED and not stolen.is_set():
                rows = await trio.to_thread.run_sync(
                    backend.query,
                    "UPDATE leases SET holder = 'thief', token = 'thief' RETURNING name",
                )
                assert len(rows) == 1
                stolen.set()

        async def get() -> GatewayStore:
            return store

        try:
            locks = SharedLocks(shared, lease_seconds=config.state.lease_seconds)
            poller = LeasedPoller(Fetcher(get, clock=utc_now, on_step=steal), locks)
            first = await poller.poll(config, local, source)
            assert first.result is PollResult.LEASE_LOST, first
            assert first.fetched == len(expected), (first, local_digests(user.maildir))
            assert local_digests(user.maildir) == expected
            assert account.count() == len(expected)  # no DELE was sent
            # The lease is the thief's: polls are busy until it leaves.
            assert (await poller.poll(config, local, source)).result is PollResult.BUSY
            await trio.to_thread.run_sync(backend.query, "DELETE FROM leases RETURNING name")
            second = await poller.poll(config, local, source)
            assert (second.result, second.fetched, second.deleted) == (
                PollResult.OK,
                0,
                len(expected),
            )
        finally:
            await shared.aclose()
            await store.aclose()
        await trio.to_thread.run_sync(dovecot.wait_sessions_ended, account, 2)
        assert account.count() == 0
        assert local_digests(user.maildir) == expected
    finally:
        dovecot.remove_user(account)


async def fetch_once(config: Path) -> tuple[int, str]:
    """``popproxy fetch --once`` as a process of its own (its exit code and log)."""
    proc = await trio.run_process(
        [
            *(sys.executable, "-m", "popproxy", "fetch", "--once", "-c", str(config)),
            *("--log-level", "debug"),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return proc.returncode, proc.stderr.decode()


async def test_fetch_once_waits_for_a_source_another_instance_holds_then_polls_it(
    tmp_path: Path, tls_files: TlsFiles, dovecot: DovecotServer, pg_database: str
) -> None:
    """While another instance holds the source's lease, ``popproxy fetch --once`` on the
    same PostgreSQL store waits account_wait_seconds, leaves the source alone (busy,
    exit 0); once the lease is given back it polls it."""
    account = dovecot.add_user()
    expected: Counter[str] = Counter()
    backend = new_postgres_backend(pg_database)
    try:
        deliver([account], 0, expected)
        user = gateway_user(tmp_path, [account])
        path = gateway_config(
            tmp_path, tls_files, dovecot, user, backend.url, limits={"account_wait_seconds": 0.5}
        )
        config = load_config(path)
        shared = SharedOpener(config.state)
        try:
            other = SharedLocks(shared, lease_seconds=config.state.lease_seconds)
            mailbox = source_mailbox(config, config.users[user.name].fetch[0])
            async with other.hold(mailbox, wait_seconds=0):
                code, log = await fetch_once(path)
                assert code == 0, log
                assert "result=busy" in log, log
                assert account.count() == len(expected)
                assert not local_digests(user.maildir)
        finally:
            await shared.aclose()
        code, log = await fetch_once(path)
        assert code == 0, log
        assert local_digests(user.maildir) == expected
        assert account.count() == 0
    finally:
        dovecot.remove_user(account)
