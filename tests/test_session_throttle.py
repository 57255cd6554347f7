"""Throttling, lockout, the hash queue's bound and the credential cache, seen from a session.

The sessions are those of test_session.py (a real Maildir, the real authenticator with
cheap scrypt parameters) with a ThrottleTable in their context. Their hashes run inline
(``InlineHashQueue``: the real verify_password, on the trio thread) so that
``autojump_clock`` can jump over the delays without jumping over a hash running in a
worker thread. Times below are the mock clock's.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import pytest
import test_session
import trio
import trio.testing
from pop3client import Pop3Client
from prometheus_client import CollectorRegistry
from test_session import session_client

from popproxy.auth.authenticator import Authenticator, HashQueue
from popproxy.auth.passwords import hash_password, verify_password
from popproxy.auth.throttle import ThrottleTable
from popproxy.auth.throttling import LocalThrottle
from popproxy.config import LimitsConfig, UserConfig
from popproxy.maildrop.base import Maildrop
from popproxy.metrics import Metrics
from popproxy.peer import PeerAddress
from popproxy.secret import Secret
from popproxy.session import Session
from popproxy.session_context import OpenMaildrop, SessionContext

maildir = test_session.maildir

LISTENER = "none"
FAILURE_DELAY = 2.0
LIMITS = LimitsConfig(
    auth_failure_delay_seconds=FAILURE_DELAY,
    auth_penalty_initial_seconds=2.0,
    auth_penalty_max_seconds=15.0,
    auth_lockout_failures=5,
    auth_lockout_address_failures=8,
    auth_lockout_window_seconds=600,
    auth_lockout_seconds=900,
)
AUTH_FAILED = b"-ERR [AUTH] Authentication failed."


class InlineHashQueue(HashQueue):
    """The real verify_password, run on the trio thread after a checkpoint, counted."""

    def __init__(self) -> None:
        super().__init__(1)
        self.hashes = 0
        self.refuse = False  # act as a full queue

    async def verify(self, phc: str, password: Secret, *, max_waiting: int) -> bool | None:
        await trio.lowlevel.checkpoint()
        if self.refuse:
            return None
        self.hashes += 1
        return verify_password(phc, password)


@dataclasses.dataclass
class World:
    """One process's worth of shared state: throttle, hash queue, metrics."""

    context: SessionContext
    queue: InlineHashQueue
    metrics: Metrics


class Connect(Protocol):
    async def __call__(self, address: str = "192.0.2.1") -> Pop3Client: ...


def opener(clock: trio.testing.MockClock) -> OpenMaildrop:
    """Open the Maildir with the clock held still: its file work runs in worker threads,
    and a jump meanwhile would reach the test client's read deadline."""

    async def _open(user: UserConfig, session_id: str) -> Maildrop:
        clock.autojump_threshold = math.inf
        try:
            return await test_session.open_local_maildrop(user, session_id)
        finally:
            clock.autojump_threshold = 0

    return _open


def make_world(
    maildir: Path, clock: trio.testing.MockClock, limits: LimitsConfig = LIMITS
) -> World:
    user = UserConfig("demo", hash_password(Secret.from_str("secret"), ln=4), maildir=maildir)
    queue = InlineHashQueue()
    metrics = Metrics(CollectorRegistry())
    metrics.declare(listeners=[LISTENER])
    context = SessionContext(
        listener=LISTENER,
        limits=limits,
        authenticator=Authenticator({"demo": user}, limits, queue=queue),
        open_maildrop=opener(clock),
        allow_plaintext_auth=True,
        metrics=metrics,
        throttle=LocalThrottle(ThrottleTable()),
    )
    return World(context, queue, metrics)


@pytest.fixture
def world(maildir: Path, autojump_clock: trio.testing.MockClock) -> World:
    return make_world(maildir, autojump_clock)


@pytest.fixture
async def connect(world: World, nursery: trio.Nursery) -> AsyncIterator[Connect]:
    async def _connect(address: str = "192.0.2.1") -> Pop3Client:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        session = Session(server_stream, PeerAddress(address, 1), world.context)
        nursery.start_soon(session.run)
        client = session_client(client_stream)
        assert (await client.line()).startswith(b"+OK")
        return client

    yield _connect


async def attempt(client: Pop3Client, user: str, password: str) -> tuple[bytes, float]:
    """USER/PASS; the PASS reply and how long it took on the (mock) clock."""
    assert await client.cmd(f"USER {user}") == b"+OK"
    before = trio.current_time()
    reply = await client.cmd(f"PASS {password}")
    return reply, trio.current_time() - before


async def quit_holding_the_clock(client: Pop3Client, clock: trio.testing.MockClock) -> None:
    """QUIT, and wait for the session to close its Maildir (worker threads) and the stream."""
    clock.autojump_threshold = math.inf
    try:
        assert (await client.cmd("QUIT")).startswith(b"+OK")
        assert await client.at_eof()
    finally:
        clock.autojump_threshold = 0


def logins(metrics: Metrics) -> dict[str, float]:
    out = {}
    for family in metrics.registry.collect():
        if family.name == "popproxy_logins":
            for s in family.samples:
                if s.name.endswith("_total") and s.value:
                    out[s.labels["result"]] = s.value
    return out


async def test_failure_delays_grow_per_address_as_dovecots_penalty(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    client = await connect()
    times = []
    for n in range(4):
        reply, elapsed = await attempt(client, "demo", f"wrong-{n}")
        assert reply == AUTH_FAILED
        times.append(elapsed)
    # The failure delay each time, plus the penalty from the earlier failures: 2, 4, 8.
    assert times == pytest.approx([2.0, 2.0 + 2.0, 4.0 + 2.0, 8.0 + 2.0], abs=0.01)
    other = await connect("192.0.2.2")  # another address is not slowed down
    reply, elapsed = await attempt(other, "demo", "secret")
    assert reply.startswith(b"+OK Logged in")
    assert elapsed == pytest.approx(0.0, abs=0.01)


async def test_a_success_lifts_the_address_penalty(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    client = await connect()
    for n in range(3):
        await attempt(client, "nobody", f"wrong-{n}")
    reply, elapsed = await attempt(client, "demo", "secret")
    assert reply.startswith(b"+OK")
    assert elapsed == pytest.approx(8.0, abs=0.01)  # delayed before the hash, then let in
    second = await connect()
    assert (await attempt(second, "nobody", "x"))[1] == pytest.approx(FAILURE_DELAY, abs=0.01)


async def test_user_lockout_refuses_even_the_right_password_without_hashing(
    world: World,
    connect: Connect,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="popproxy")
    for n in range(LIMITS.auth_lockout_failures):  # one failure each from many addresses
        client = await connect(f"198.51.100.{n}")
        assert (await attempt(client, "demo", f"guess-{n}"))[0] == AUTH_FAILED
    hashes = world.queue.hashes
    fresh = await connect("203.0.113.7")
    reply, elapsed = await attempt(fresh, "demo", "secret")
    assert reply == AUTH_FAILED
    assert elapsed == pytest.approx(FAILURE_DELAY, abs=0.01)  # still delayed
    assert world.queue.hashes == hashes  # no hash ran
    assert logins(world.metrics) == {"failed": LIMITS.auth_lockout_failures, "locked_out": 1}
    (started,) = [r for r in caplog.records if r.getMessage() == "login_lockout"]
    (refused,) = [r for r in caplog.records if r.getMessage() == "login_refused"]
    assert getattr(started, "fields", {})["scope"] == "user"
    assert getattr(refused, "fields", {})["user"] == "demo"
    assert "secret" not in caplog.text
    assert "guess-" not in caplog.text
    await trio.sleep(LIMITS.auth_lockout_seconds)
    reply, _ = await attempt(await connect("203.0.113.7"), "demo", "secret")
    assert reply.startswith(b"+OK Logged in")


async def test_address_lockout_stops_password_spraying(
    world: World, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    for n in range(LIMITS.auth_lockout_address_failures):  # a connection each: the
        client = await connect()  # delays add up past one session's login deadline
        assert (await attempt(client, f"user{n}", "Password1"))[0] == AUTH_FAILED
    hashes = world.queue.hashes
    reply, elapsed = await attempt(client, "demo", "secret")
    assert reply == AUTH_FAILED
    assert elapsed == pytest.approx(15.0 + FAILURE_DELAY, abs=0.01)
    assert world.queue.hashes == hashes
    assert logins(world.metrics)["throttled"] == 1
    # The user itself is not locked: from elsewhere the right password works.
    assert (await attempt(await connect("192.0.2.77"), "demo", "secret"))[0].startswith(b"+OK")


async def test_unknown_user_and_wrong_password_are_alike_in_reply_and_time_into_lockout(
    maildir: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The same script for an existing and an unknown user: every reply and every
    delay the same, lockout included (the throttle never looks at the user list)."""
    seen = []
    for user in ("demo", "nobody"):
        world = make_world(maildir, autojump_clock)
        script = []
        for n in range(LIMITS.auth_lockout_failures + 2):
            client_stream, server_stream = trio.testing.memory_stream_pair()
            session = Session(server_stream, PeerAddress(f"10.0.0.{n % 2}", 1), world.context)
            nursery.start_soon(session.run)
            client = session_client(client_stream)
            await client.line()
            script.append(await attempt(client, user, f"wrong-{n}"))
        seen.append(script)
        hashed_logins = world.queue.hashes
        assert hashed_logins == LIMITS.auth_lockout_failures  # none once locked
    assert seen[0] == seen[1]
    assert {reply for reply, _ in seen[0]} == {AUTH_FAILED}


async def test_auth_plain_goes_through_the_same_throttle(
    world: World, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    client = await connect()
    for n in range(LIMITS.auth_lockout_failures):
        await attempt(client, "demo", f"guess-{n}")
    token = base64.b64encode(b"\0demo\0secret").decode()
    assert await (await connect("192.0.2.50")).cmd(f"AUTH PLAIN {token}") == AUTH_FAILED


async def test_auth_login_goes_through_the_same_throttle(
    world: World, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    """Wrong AUTH LOGIN passwords count as any failure: they lock the name out, and
    then the right password by AUTH LOGIN (or USER/PASS) is refused without a hash."""
    client = await connect()
    for n in range(LIMITS.auth_lockout_failures):
        assert await client.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6"
        assert await client.cmd(base64.b64encode(b"demo").decode()) == b"+ UGFzc3dvcmQ6"
        assert await client.cmd(base64.b64encode(f"guess-{n}".encode()).decode()) == AUTH_FAILED
    hashes = world.queue.hashes
    other = await connect("192.0.2.50")
    assert await other.cmd("AUTH LOGIN " + base64.b64encode(b"demo").decode()) == b"+ UGFzc3dvcmQ6"
    assert await other.cmd(base64.b64encode(b"secret").decode()) == AUTH_FAILED
    assert world.queue.hashes == hashes


async def test_a_cached_login_still_goes_through_the_throttle(
    world: World, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    first = await connect("192.0.2.9")
    assert (await attempt(first, "demo", "secret"))[0].startswith(b"+OK")
    await quit_holding_the_clock(first, autojump_clock)  # releases the Maildir's lock
    hashes = world.queue.hashes
    again = await connect("192.0.2.9")
    assert (await attempt(again, "demo", "secret"))[0].startswith(b"+OK")
    await quit_holding_the_clock(again, autojump_clock)
    assert world.queue.hashes == hashes  # the cache answered
    for n in range(LIMITS.auth_lockout_failures):
        await attempt(await connect(f"198.51.100.{n}"), "demo", f"guess-{n}")
    reply, _ = await attempt(await connect("192.0.2.9"), "demo", "secret")
    assert reply == AUTH_FAILED  # locked: the cache does not let it past


async def test_a_full_hash_queue_gets_sys_temp_and_counts_as_no_failure(
    world: World, connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    world.queue.refuse = True
    client = await connect()
    for _ in range(LIMITS.auth_lockout_failures + 1):
        reply, elapsed = await attempt(client, "demo", "wrong")
        assert reply == b"-ERR [SYS/TEMP] Too many logins at once, try again later."
        assert elapsed == pytest.approx(0.0, abs=0.01)  # no penalty accrued
    assert logins(world.metrics) == {"error": LIMITS.auth_lockout_failures + 1}
    world.queue.refuse = False
    assert (await attempt(client, "demo", "secret"))[0].startswith(b"+OK")


async def test_without_a_throttle_table_nothing_is_throttled(
    maildir: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    world = make_world(maildir, autojump_clock)
    context = dataclasses.replace(world.context, throttle=None)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(Session(server_stream, PeerAddress("192.0.2.1", 1), context).run)
    client = session_client(client_stream)
    await client.line()
    for n in range(LIMITS.auth_lockout_failures + 1):
        assert (await attempt(client, "demo", f"w{n}"))[1] == pytest.approx(FAILURE_DELAY)
    assert (await attempt(client, "demo", "secret"))[0].startswith(b"+OK")
