"""The gateway's schedule: the pure backoff decisions, and the driver on trio's mock clock."""

from __future__ import annotations

import dataclasses
import random
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.auth.passwords import hash_password
from popproxy.config import Config, FetchSource, GatewayConfig, UserConfig, load_config
from popproxy.gateway.fetcher import PollReport
from popproxy.gateway.schedule import Backoff, Scheduler, poll_once, sources_of
from popproxy.outcomes import PollResult
from popproxy.secret import Secret
from popproxy.state.base import SourceKey

GATEWAY = GatewayConfig(
    interval_seconds=300,
    jitter_seconds=0,
    backoff_initial_seconds=60,
    backoff_max_seconds=400,
    auth_backoff_seconds=1000,
    auth_backoff_max_seconds=5000,
)


# -- the pure decisions -------------------------------------------------------------------


def delays(results: list[PollResult]) -> list[float]:
    backoff = Backoff()
    out = []
    for result in results:
        backoff = backoff.after(result)
        out.append(backoff.delay(GATEWAY, 0.0))
    return out


def test_success_waits_the_interval() -> None:
    assert delays([PollResult.OK, PollResult.OK]) == [300, 300]


def test_failures_double_up_to_the_cap_and_a_success_resets() -> None:
    failed = PollResult.UPSTREAM_ERROR
    assert delays([failed] * 5 + [PollResult.OK, failed]) == [60, 120, 240, 400, 400, 300, 60]


def test_auth_failures_back_off_much_longer() -> None:
    auth = PollResult.AUTH_FAILED
    assert delays([auth] * 4) == [1000, 2000, 4000, 5000]
    # Another kind of failure after auth failures starts its own count, and back.
    assert delays([auth, auth, PollResult.MAILDIR_FULL, auth]) == [1000, 2000, 60, 1000]


def test_a_busy_or_lease_lost_poll_changes_no_backoff() -> None:
    """Skipped (another holds the mailbox) or stopped (its lease lost): nothing said
    about the source, so neither a backoff nor a reset of one."""
    failed, busy, lost = PollResult.UPSTREAM_ERROR, PollResult.BUSY, PollResult.LEASE_LOST
    assert delays([busy, lost, busy]) == [300, 300, 300]
    assert delays([failed, failed, busy, lost, failed]) == [60, 120, 120, 120, 240]
    assert Backoff(3, auth=True).after(busy) == Backoff(3, auth=True)


def test_jitter_adds_a_share_of_jitter_seconds() -> None:
    gateway = dataclasses.replace(GATEWAY, jitter_seconds=30)
    assert Backoff().delay(gateway, 0.5) == 315
    assert Backoff(2).delay(gateway, 0.5) == 135
    assert not Backoff().active
    assert Backoff(1).active


def test_many_failures_stay_finite() -> None:
    assert Backoff(10_000).delay(GATEWAY, 0.0) == 400


# -- the driver ---------------------------------------------------------------------------

HASH = hash_password(Secret.from_str("pw"), ln=4)


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PW", "x")
    yield tmp_path / "popproxy.yaml"


def make_config(path: Path, sources: list[str], gateway: str = ", jitter_seconds: 0") -> Config:
    fetch = ", ".join(
        f"{{upstream: {up}, upstream_user: {name}, upstream_password_env: PW}}"
        for up, _, name in (s.partition("/") for s in sources)
    )
    path.write_text(
        textwrap.dedent(f"""\
        listen: [{{address: 127.0.0.1, port: 0, tls: none}}]
        upstreams:
          a: {{host: pop.a.example}}
          b: {{host: pop.b.example}}
        users:
          carol:
            password_hash: "{HASH}"
            maildir: mail
            fetch: [{fetch}]
        gateway: {{interval_seconds: 300, backoff_initial_seconds: 60,
                   backoff_max_seconds: 400, auth_backoff_seconds: 1000{gateway}}}
        """)
    )
    return load_config(path)


class ScriptedPoller:
    """Polls take ``seconds`` of (mock) time and end with the result scripted per source."""

    def __init__(self, seconds: float = 10, results: dict[str, PollResult] | None = None):
        self.seconds = seconds
        self.results = results or {}
        self.started: list[tuple[float, str]] = []
        self.running = 0
        self.most_running = 0

    async def poll(self, config: Config, user: UserConfig, source: FetchSource) -> PollReport:
        self.started.append((trio.current_time(), source.label))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await trio.sleep(self.seconds)
        finally:
            self.running -= 1
        key = SourceKey(user.name, source.upstream, source.upstream_user)
        return PollReport(key, "id", self.results.get(source.label, PollResult.OK))


def times_of(poller: ScriptedPoller, label: str) -> list[float]:
    return [round(t) for t, name in poller.started if name == label]


async def run_for(scheduler: Scheduler, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await scheduler.run()


async def test_each_source_is_polled_every_interval_after_its_last_poll(
    autojump_clock: trio.testing.MockClock, config_file: Path
) -> None:
    config = make_config(config_file, ["a/x", "b/y"])
    poller = ScriptedPoller(seconds=10)
    await run_for(Scheduler(poller, lambda: config), 1000)
    assert times_of(poller, "a/x") == [0, 310, 620, 930]
    assert times_of(poller, "b/y") == [0, 310, 620, 930]


async def test_a_failing_source_backs_off_and_the_other_goes_on(
    autojump_clock: trio.testing.MockClock, config_file: Path
) -> None:
    config = make_config(config_file, ["a/x", "b/y"])
    poller = ScriptedPoller(seconds=0, results={"a/x": PollResult.UPSTREAM_ERROR})
    reports: list[tuple[str, Backoff]] = []
    scheduler = Scheduler(
        poller, lambda: config, on_report=lambda r, b: reports.append((r.source.label, b))
    )
    await run_for(scheduler, 1000)
    assert times_of(poller, "a/x") == [0, 60, 180, 420, 820]
    assert times_of(poller, "b/y") == [0, 300, 600, 900]
    assert scheduler.backoffs[SourceKey("carol", "a", "x")] == Backoff(5)
    assert ("a/x", Backoff(1)) in reports


async def test_an_auth_failure_waits_the_auth_backoff(
    autojump_clock: trio.testing.MockClock, config_file: Path
) -> None:
    config = make_config(config_file, ["a/x"])
    poller = ScriptedPoller(seconds=0, results={"a/x": PollResult.AUTH_FAILED})
    await run_for(Scheduler(poller, lambda: config), 3500)
    assert times_of(poller, "a/x") == [0, 1000, 3000]


async def test_concurrency_caps_hold(
    autojump_clock: trio.testing.MockClock, config_file: Path
) -> None:
    many = [f"a/u{i}" for i in range(5)] + [f"b/v{i}" for i in range(5)]
    config = make_config(
        config_file,
        many,
        ", jitter_seconds: 0, max_concurrent_polls: 3, max_connections_per_upstream: 1",
    )
    poller = ScriptedPoller(seconds=10)
    await run_for(Scheduler(poller, lambda: config), 45)
    assert poller.most_running == 2  # one per upstream
    starts = sorted(round(t) for t, _ in poller.started)
    assert starts == [0, 0, 10, 10, 20, 20, 30, 30, 40, 40]  # two at a time, one per upstream
    config = make_config(
        config_file,
        many,
        ", jitter_seconds: 0, max_concurrent_polls: 3, max_connections_per_upstream: 3",
    )
    poller = ScriptedPoller(seconds=10)
    await run_for(Scheduler(poller, lambda: config), 5)
    assert poller.most_running == 3


async def test_poll_now_polls_at_once_even_in_backoff(
    autojump_clock: trio.testing.MockClock, config_file: Path
) -> None:
    config = make_config(config_file, ["a/x"])
    poller = ScriptedPoller(seconds=0, results={"a/x": PollResult.AUTH_FAILED})
    scheduler = Scheduler(poller, lambda: config)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        await trio.sleep(100)
        scheduler.poll_now()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert times_of(poller, "a/x") == [0, 100]


async def test_a_reload_adds_and_removes_sources_without_a_restart(
    autojump_clock: trio.testing.MockClock, config_file: Path
) -> None:
    current = [make_config(config_file, ["a/x"])]
    poller = ScriptedPoller(seconds=0)
    scheduler = Scheduler(poller, lambda: current[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        await trio.sleep(50)
        current[0] = make_config(config_file, ["b/y"])
        scheduler.reloaded()
        await trio.sleep(700)
        nursery.cancel_scope.cancel()
    assert times_of(poller, "a/x") == [0]
    assert times_of(poller, "b/y") == [50, 350, 650]


async def test_the_first_polls_are_spread_by_the_jitter(
    autojump_clock: trio.testing.MockClock, config_file: Path
) -> None:
    config = make_config(config_file, [f"a/u{i}" for i in range(4)], ", jitter_seconds: 60")
    poller = ScriptedPoller(seconds=0)
    await run_for(Scheduler(poller, lambda: config, rng=random.Random(7)), 59)
    firsts = sorted(t for t, _ in poller.started)
    assert len(firsts) == 4
    assert len(set(firsts)) == 4
    assert all(0 <= t < 60 for t in firsts)


async def test_poll_once_polls_every_source_or_one_user(
    autojump_clock: trio.testing.MockClock, config_file: Path
) -> None:
    config = make_config(config_file, ["a/x", "b/y"])
    poller = ScriptedPoller(seconds=5, results={"b/y": PollResult.UPSTREAM_ERROR})
    reports = await poll_once(poller, config)
    assert [(r.source.label, r.result) for r in reports] == [
        ("a/x", PollResult.OK),
        ("b/y", PollResult.UPSTREAM_ERROR),
    ]
    assert await poll_once(poller, config, ["nobody"]) == []
    assert list(sources_of(config, ["carol"])) == [
        SourceKey("carol", "a", "x"),
        SourceKey("carol", "b", "y"),
    ]
