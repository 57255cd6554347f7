"""When each gateway source is polled, and the trio driver that polls them.

The decisions are pure (:class:`Backoff`): after a successful poll the next one
waits ``interval_seconds`` plus a random share of ``jitter_seconds``; after a
failed one it waits ``backoff_initial_seconds``, doubling per consecutive failure
up to ``backoff_max_seconds``; after a rejected login it waits
``auth_backoff_seconds``, doubling up to ``auth_backoff_max_seconds``, because a
provider locks an account whose logins keep failing (docs/gateway.md, Scheduling).
A poll that did not run because another holds the mailbox (``busy``), or that
stopped because its lease was lost (``lease_lost``), changes no backoff: the source
is tried again after its usual wait.

:class:`Scheduler` runs one poll per source at a time, at most
``max_concurrent_polls`` at once and ``max_connections_per_upstream`` per upstream,
reads the config again at every decision (so a reload's new sources, removed
sources and new schedule apply at once, while a running poll finishes with the
config it started with), and polls every source at once on :meth:`poll_now`
(SIGUSR1). :func:`poll_once` is ``popproxy fetch --once``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from popproxy.config import Config, FetchSource, GatewayConfig, UserConfig
from popproxy.gateway.fetcher import PollReport
from popproxy.metrics import Metrics
from popproxy.outcomes import PollResult
from popproxy.state.base import SourceKey

# The exponent of a backoff stops growing here (2**20 times the initial wait is far
# past any cap a config allows); it only keeps the float arithmetic finite.
MAX_BACKOFF_DOUBLINGS = 20


class Poller(Protocol):
    """What polls one source: ``Fetcher`` (tests give a scripted one)."""

    async def poll(self, config: Config, user: UserConfig, source: FetchSource) -> PollReport:
        """Poll ``source`` once; a failed poll is a report, not an exception."""
        ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """A source's consecutive failed polls, and whether the last one was a rejected login."""

    failures: int = 0
    auth: bool = False

    @property
    def active(self) -> bool:
        """Whether the source is in backoff (its last poll failed)."""
        return self.failures > 0

    def after(self, result: PollResult) -> Backoff:
        """The backoff after a poll that ended with ``result``."""
        match result:
            case PollResult.OK:
                return Backoff()
            case PollResult.BUSY | PollResult.LEASE_LOST:
                return self  # says nothing about the source (gateway/leases.py)
            case PollResult.AUTH_FAILED:
                failures = self.failures + 1 if self.auth else 1
                return Backoff(failures, auth=True)
            case _:
                return Backoff(self.failures + 1 if not self.auth else 1)

    def delay(self, gateway: GatewayConfig, jitter: float) -> float:
        """Seconds until the next poll; ``jitter`` is a random number in [0, 1)."""
        spread = jitter * gateway.jitter_seconds
        if not self.active:
            return gateway.interval_seconds + spread
        if self.auth:
            first, cap = gateway.auth_backoff_seconds, gateway.auth_backoff_max_seconds
        else:
            first, cap = gateway.backoff_initial_seconds, gateway.backoff_max_seconds
        doublings = min(self.failures - 1, MAX_BACKOFF_DOUBLINGS)
        return min(cap, first * 2.0**doublings) + spread


def sources_of(
    config: Config, users: Sequence[str] | None = None
) -> dict[SourceKey, tuple[UserConfig, FetchSource]]:
    """Every gateway source of the config (of ``users`` only, if given), by key."""
    out: dict[SourceKey, tuple[UserConfig, FetchSource]] = {}
    for user in config.gateway_users:
        if users is not None and user.name not in users:
            continue
        for source in user.fetch:
            out[SourceKey(user.name, source.upstream, source.upstream_user)] = (user, source)
    return out


class _Limits:
    """The concurrency caps, resized in place when a reload changes them."""

    def __init__(self, gateway: GatewayConfig) -> None:
        self.polls = trio.CapacityLimiter(gateway.max_concurrent_polls)
        self.per_upstream: dict[str, trio.CapacityLimiter] = {}
        self.per_upstream_tokens = gateway.max_connections_per_upstream

    def apply(self, gateway: GatewayConfig) -> None:
        self.polls.total_tokens = gateway.max_concurrent_polls
        self.per_upstream_tokens = gateway.max_connections_per_upstream
        for limiter in self.per_upstream.values():
            limiter.total_tokens = self.per_upstream_tokens

    def upstream(self, name: str) -> trio.CapacityLimiter:
        limiter = self.per_upstream.get(name)
        if limiter is None:
            limiter = self.per_upstream[name] = trio.CapacityLimiter(self.per_upstream_tokens)
        return limiter


async def _limited_poll(
    fetcher: Poller, limits: _Limits, config: Config, user: UserConfig, source: FetchSource
) -> PollReport:
    # The upstream's cap first: a poll waiting for its upstream must not hold one of the
    # global slots, which another upstream's poll could use meanwhile.
    async with limits.upstream(source.upstream), limits.polls:
        return await fetcher.poll(config, user, source)


@dataclass(slots=True)
class _SourceSchedule:
    due: float  # trio time of the next poll
    backoff: Backoff = field(default_factory=Backoff)
    running: bool = False


class Scheduler:
    """Polls every gateway source of the current config, forever (see the module doc).

    ``current_config`` is called at every decision: the server passes the config
    of its current runtime, so a reload applies without a restart. ``metrics`` counts
    each finished poll and the sources in backoff; ``on_report`` gets each finished
    poll too (tests). ``rng`` draws the jitter (tests seed it).
    """

    def __init__(
        self,
        fetcher: Poller,
        current_config: Callable[[], Config],
        *,
        metrics: Metrics | None = None,
        on_report: Callable[[PollReport, Backoff], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._fetcher = fetcher
        self._current_config = current_config
        self._metrics = metrics
        self._on_report = on_report
        self._rng = rng or random.Random()
        self._limits = _Limits(current_config().gateway)
        self._schedules: dict[SourceKey, _SourceSchedule] = {}
        self._changed = trio.Event()

    @property
    def backoffs(self) -> dict[SourceKey, Backoff]:
        """Each known source's backoff (metrics: sources in backoff)."""
        return {key: s.backoff for key, s in self._schedules.items()}

    def poll_now(self) -> None:
        """Poll every source that is not polling now at once, backoff or not (SIGUSR1)."""
        now = trio.current_time()
        for schedule in self._schedules.values():
            schedule.due = min(schedule.due, now)
        self._changed.set()

    def reloaded(self) -> None:
        """The config changed: look at its sources and schedule again."""
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled; the first polls start at once, spread by the jitter."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:  # ends: cancelled with the server
                config = self._current_config()
                self._limits.apply(config.gateway)
                if self._metrics is not None:
                    self._metrics.gateway_interval(config.gateway.interval_seconds)
                sources = sources_of(config)
                now = trio.current_time()
                for key in sources.keys() - self._schedules.keys():
                    spread = self._rng.random() * config.gateway.jitter_seconds
                    self._schedules[key] = _SourceSchedule(due=now + spread)
                for key in self._schedules.keys() - sources.keys():
                    if not self._schedules[key].running:
                        del self._schedules[key]
                wake = math.inf
                for key, (user, source) in sources.items():
                    schedule = self._schedules[key]
                    if schedule.running:
                        continue
                    if schedule.due <= now:
                        schedule.running = True
                        nursery.start_soon(self._poll, key, config, user, source)
                    else:
                        wake = min(wake, schedule.due)
                with trio.move_on_at(wake):
                    await self._changed.wait()
                self._changed = trio.Event()

    async def _poll(
        self, key: SourceKey, config: Config, user: UserConfig, source: FetchSource
    ) -> None:
        schedule = self._schedules[key]
        try:
            report = await _limited_poll(self._fetcher, self._limits, config, user, source)
        finally:
            schedule.running = False
        schedule.backoff = schedule.backoff.after(report.result)
        delay = schedule.backoff.delay(self._current_config().gateway, self._rng.random())
        schedule.due = trio.current_time() + delay
        if self._metrics is not None:
            self._metrics.gateway_poll(
                source.upstream,
                report.result,
                seconds=report.seconds,
                fetched=report.fetched,
                fetched_bytes=report.fetched_bytes,
                deleted_by_rule=report.deleted_by_rule,
                timestamp=time.time(),
            )
            in_backoff: dict[str, int] = {}
            for other, state in self._schedules.items():
                if state.backoff.active:
                    in_backoff[other.upstream] = in_backoff.get(other.upstream, 0) + 1
            self._metrics.gateway_backoff(in_backoff)
        if self._on_report is not None:
            self._on_report(report, schedule.backoff)
        self._changed.set()


async def poll_once(
    fetcher: Poller, config: Config, users: Sequence[str] | None = None
) -> list[PollReport]:
    """One poll of every source (of ``users``, if given), within the concurrency caps;
    the reports in config order (``popproxy fetch --once``)."""
    sources = sources_of(config, users)
    limits = _Limits(config.gateway)
    reports: dict[SourceKey, PollReport] = {}

    async def one(key: SourceKey, user: UserConfig, source: FetchSource) -> None:
        reports[key] = await _limited_poll(fetcher, limits, config, user, source)

    async with trio.open_nursery() as nursery:
        for key, (user, source) in sources.items():
            nursery.start_soon(one, key, user, source)
    return [reports[key] for key in sources]


__all__ = ["Backoff", "Scheduler", "poll_once", "sources_of"]
