"""One poll per upstream mailbox, across every instance sharing the store.

A gateway poll is a POP3 session on the source's upstream mailbox (RFC 1939 §4:
exclusive access to the maildrop), so it holds that mailbox through the one lock
interface (``popproxy.locks.MailboxLocks``) under the same key as a proxy-mode
session on the account: in-process locks with sqlite, leases in PostgreSQL with
several instances (``popproxy/shared_locks.py``, docs/scaling.md).

- A scheduled poll never waits: if another poll or session (of this instance or
  another) holds the mailbox, the round is skipped (``result=busy``, a debug line,
  no backoff) and the source is tried again at its next interval. ``popproxy fetch
  --once`` waits up to ``limits.account_wait_seconds`` first, as a session does.
- The lease is confirmed just before the DELEs (``Fetcher`` calls ``Hold.confirm``).
- A lease found lost while the poll runs (a renewal found it taken over, or it could
  not be renewed in time) stops the poll at once: like a shutdown, nothing is
  deleted and what arrived whole is kept (docs/gateway.md, the crash table).
- The poll's id is the log context's session (``logfmt.SESSION_ID``), so the
  ``lease_*`` lines of its lease name it as the ``gateway_poll`` line does. A debug
  ``gateway_poll_started`` line is logged once the mailbox is held, so a poll's
  ``gateway_poll_started`` and ``gateway_poll`` lines bracket its upstream session
  (``gateway_poll_cancelled`` instead of the latter for a poll a shutdown cut short).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

import trio

from popproxy.config import Config, FetchSource, StateConfig, UserConfig
from popproxy.gateway.durable import Clock
from popproxy.gateway.fetcher import Fetcher, PollReport, StoreGetter, log_poll, new_poll_id
from popproxy.locks import (
    Hold,
    InProcessLocks,
    MailboxLocks,
    UpstreamMailbox,
    upstream_mailbox,
)
from popproxy.logfmt import SESSION_ID
from popproxy.maildrop.base import MaildropError, MaildropInUse
from popproxy.metrics import Metrics
from popproxy.oauth2.cache import TokenCache
from popproxy.outcomes import PollResult
from popproxy.shared_locks import SharedLocks
from popproxy.state import POSTGRES_SCHEMES
from popproxy.state.base import SourceKey
from popproxy.state.opener import SharedOpener

log = logging.getLogger("popproxy.gateway")


class HoldingPoller(Protocol):
    """What polls a source while its mailbox is held: ``Fetcher`` (tests script one)."""

    async def poll(
        self, config: Config, user: UserConfig, source: FetchSource, *, hold: Hold, poll_id: str
    ) -> PollReport:
        """Poll once, confirming ``hold`` before any DELE; never raises for a failed poll."""
        ...


def source_mailbox(config: Config, source: FetchSource) -> UpstreamMailbox:
    """The lock key of a source: its upstream account, as a proxy session's."""
    upstream = config.upstreams[source.upstream]
    return upstream_mailbox(upstream.host, upstream.port, source.upstream_user)


class LeasedPoller:
    """A ``Poller`` (``gateway/schedule.py``) that polls a source only while it holds
    the source's upstream mailbox (see the module doc)."""

    def __init__(
        self, fetcher: HoldingPoller, locks: MailboxLocks, *, wait_seconds: float = 0
    ) -> None:
        self._fetcher = fetcher
        self._locks = locks
        self._wait_seconds = wait_seconds  # for the mailbox, before a poll is busy

    @classmethod
    def fetching(
        cls,
        store: StoreGetter,
        locks: MailboxLocks,
        clock: Clock,
        metrics: Metrics,
        tokens: TokenCache | None = None,
    ) -> LeasedPoller:
        """A ``Fetcher`` on ``store`` (the server's opener) polling under ``locks``."""
        return cls(Fetcher(store, clock=clock, metrics=metrics, tokens=tokens), locks)

    async def poll(self, config: Config, user: UserConfig, source: FetchSource) -> PollReport:
        """Poll ``source`` once if its mailbox is free; never raises for a failed poll."""
        key = SourceKey(user.name, source.upstream, source.upstream_user)
        poll_id = new_poll_id()
        started = trio.current_time()
        logging_as = SESSION_ID.set(poll_id)
        try:
            mailbox = source_mailbox(config, source)
            async with self._locks.hold(mailbox, wait_seconds=self._wait_seconds) as hold:
                fields = {"session": poll_id, "user": key.user, "source": key.label}
                log.debug("gateway_poll_started", extra={"fields": fields})
                try:
                    report = await self._poll_holding(hold, config, user, source, poll_id)
                except BaseException:  # cancelled from outside (a shutdown): nothing deleted
                    log.info("gateway_poll_cancelled", extra={"fields": fields})
                    raise
                if report is None:  # cancelled when the lease was lost
                    report = PollReport(
                        key,
                        poll_id,
                        PollResult.LEASE_LOST,
                        seconds=trio.current_time() - started,
                        reason="the mailbox lease was lost; the poll stopped, nothing deleted",
                    )
                    log_poll(report)
        except MaildropInUse:
            report = PollReport(key, poll_id, PollResult.BUSY)
            log_poll(report)
        except MaildropError as exc:  # the lease could not be asked for (lease_unavailable)
            report = PollReport(key, poll_id, PollResult.STATE_ERROR, reason=exc.text)
            log_poll(report)
        finally:
            SESSION_ID.reset(logging_as)
        return report

    async def _poll_holding(
        self, hold: Hold, config: Config, user: UserConfig, source: FetchSource, poll_id: str
    ) -> PollReport | None:
        """The fetcher's poll; None if it was cancelled because ``hold`` was lost (a
        shutdown's cancellation propagates)."""
        report: PollReport | None = None
        async with trio.open_nursery() as nursery:

            async def stop_when_lost() -> None:
                await hold.wait_lost()
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_when_lost)
            report = await self._fetcher.poll(config, user, source, hold=hold, poll_id=poll_id)
            nursery.cancel_scope.cancel()
        return report


@contextlib.asynccontextmanager
async def poll_locks(
    state: StateConfig, metrics: Metrics | None = None
) -> AsyncIterator[MailboxLocks]:
    """The mailbox locks of a process that only polls (``popproxy fetch --once``):
    leases, renewed while it runs, with a PostgreSQL store; in-process ones otherwise."""
    if not state.url.startswith(POSTGRES_SCHEMES):
        yield InProcessLocks()
        return
    shared = SharedOpener(state, metrics)
    try:
        locks = SharedLocks(shared, lease_seconds=state.lease_seconds)
        async with trio.open_nursery() as nursery:
            await nursery.start(locks.run)
            yield locks
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await shared.aclose()
