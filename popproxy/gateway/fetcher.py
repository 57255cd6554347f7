"""One poll of one gateway source: log in, list, fetch what is new, delete per policy.

Theory of operation (DESIGN.md, "Gateway data flow"; docs/gateway.md):

1. Settle what a poll that died left STAGED (``_recover``): a staged file still in
   ``tmp/`` is published, one in ``new/`` or ``cur/`` is delivered, one that is
   nowhere goes back to LISTED and is fetched again. This needs no upstream.
2. Log in and take the listing with UIDL and LIST (the upstream connection code of
   proxy mode, pipelined where the upstream allows): with the source's password, or
   with an OAuth2 access token (XOAUTH2, OAUTHBEARER; RFC 7628) from the process's
   token cache, which proxy sessions share and a reload keeps (docs/oauth2.md). The
   store records the listing and says, per (UIDL, size), whether it is new; a UIDL
   listed with another size is new content (RFC 1939 §7).
3. The policy (``AccountPolicy.poll_plan``) says what to fetch, what to skip.
4. Each message is streamed, un-stuffed, into ``tmp/`` and fsync'ed; never held
   whole. Every ``BATCH_MESSAGES`` messages (or ``BATCH_BYTES``): ``tmp/`` is
   fsync'ed, the store records the batch STAGED, the files move to ``new/``,
   ``new/`` is fsync'ed, the store records them DELIVERED.
5. The policy, given what is now DELIVERED, says what to delete upstream; the DELEs
   go at QUIT, whose ``+OK`` is needed before the store records the deletions. A
   poll that fails anywhere drops the connection without QUIT: nothing is deleted.
   Just before the DELEs the poll confirms that it still holds the upstream
   mailbox (``Hold.confirm``; its lease, across instances: ``gateway/leases.py``).

Steps 1 and 4 are ``durable.py`` (receiving into ``tmp/``, publishing, recovery),
which runs every file operation in a worker thread behind the gateway's limiter.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import trio

from popproxy.config import Config, FetchSource, UpstreamConfig, UserConfig
from popproxy.gateway import delivery
from popproxy.gateway.delivery import DeliveryError, TmpFile
from popproxy.gateway.dryrun import top_headers
from popproxy.gateway.durable import Clock, DurableDelivery, Step, StepHook
from popproxy.locks import HELD_HERE, Hold, MailboxLost
from popproxy.maildrop.base import MaildropError
from popproxy.maildrop.connection import UpstreamConnection, UpstreamError, unavailable
from popproxy.maildrop.retention import decide_view
from popproxy.maildrop.route import source_route
from popproxy.maildrop.upstream_login import CapabilityMemo, UpstreamAccount, open_account
from popproxy.metrics import Metrics
from popproxy.oauth2.cache import TokenCache
from popproxy.outcomes import PollResult, UpstreamFailure
from popproxy.policy import AccountPolicy, Candidate, Planned, View
from popproxy.pop3.client_replies import ListedMessage
from popproxy.pop3.commands import Retr
from popproxy.pop3.replies import Err
from popproxy.state.base import (
    Disposal,
    FetchFacts,
    FetchState,
    GatewayStore,
    PollSummary,
    SeenMessage,
    SourceKey,
    StagedMessage,
    StateError,
)
from popproxy.tls import client_context

log = logging.getLogger("popproxy.gateway")

# Messages (or octets) fetched before their batch is made durable and recorded: one
# fsync of tmp/ and of new/ and two store commits per batch instead of per message.
# 64 messages of mail's median size (a few KB) is a fraction of a second of work; a
# crash loses at most one batch of downloading, never a message.
BATCH_MESSAGES = 64
BATCH_BYTES = 16 * 1024 * 1024
# Messages whose last write and fsync may be pending at once while the next ones
# arrive; each holds at most durable.WRITE_BYTES until written.
MAX_PENDING_WRITES = 16

# How the fetcher gets the state store: the server's opener (opened on first need).
StoreGetter = Callable[[], Awaitable[GatewayStore]]


# The login failures that back a source off as a rejected login (GatewayConfig's
# auth_backoff_seconds): a password refused, or (RFC 6749 §5.2 invalid_grant, RFC 7628
# §3.2.2) a refresh token revoked or an access token refused after one refresh. Every
# other failure, a token endpoint that is down among them, is temporary.
_LOGIN_REFUSED = {
    UpstreamFailure.AUTH_REJECTED: PollResult.AUTH_FAILED,
    UpstreamFailure.TOKEN_REJECTED: PollResult.AUTH_FAILED,
}


class MaildirOverLimit(Exception):
    """The user's Maildir holds ``max_maildir_bytes`` or more: the poll does not start."""

    def __init__(self, held: int, limit: int) -> None:
        super().__init__(
            f"the Maildir holds {held} bytes, max_maildir_bytes is {limit}; not fetching"
        )


@dataclass(frozen=True, slots=True)
class PollReport:
    """How one poll of one source went: the poll's log line and metrics come from it."""

    source: SourceKey
    poll_id: str
    result: PollResult
    fetched: int = 0
    skipped: int = 0
    deleted: int = 0
    fetched_bytes: int = 0
    seconds: float = 0.0
    reason: str = ""  # why it failed, safe for logs (no secret, no message content)
    deleted_by_rule: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Counts:
    fetched: int = 0
    skipped: int = 0
    deleted: int = 0
    fetched_bytes: int = 0
    deleted_by_rule: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Session:
    """One logged-in poll: the connection, the listing and what the store knows of it."""

    connection: UpstreamConnection
    key: SourceKey
    root: Path
    listing: Sequence[ListedMessage]
    facts: Mapping[str, FetchFacts]
    policy: AccountPolicy
    counts: _Counts
    depth: int  # RETRs in flight at once
    poll_id: str  # the session= of the poll's log lines, and of its audit log rows
    hold: Hold  # the upstream mailbox, confirmed before any DELE


class Fetcher:
    """Polls gateway sources; one per trio run, shared by every poll (and reloads).

    ``clock`` is what retention reads as now (tests move it by days); ``on_step``
    is awaited at each ``Step`` (the crash tests kill the process there). ``tokens``:
    the process's OAuth2 access tokens (the server's, shared with proxy sessions); by
    default a cache of this fetcher's own (``fetch --once``).
    """

    def __init__(
        self,
        store: StoreGetter,
        *,
        clock: Clock,
        metrics: Metrics | None = None,
        on_step: StepHook | None = None,
        tokens: TokenCache | None = None,
    ) -> None:
        self._get_store = store
        # The store once opened: every poll gets the same one from the getter.
        self._opened: GatewayStore | None = None
        self._clock = clock
        self._metrics = metrics
        self._durable = DurableDelivery(clock=clock, on_step=on_step)
        self._tokens = tokens if tokens is not None else TokenCache()
        self._memos: dict[str, CapabilityMemo] = {}
        self._tls: dict[UpstreamConfig, ssl.SSLContext] = {}

    async def poll(
        self,
        config: Config,
        user: UserConfig,
        source: FetchSource,
        *,
        hold: Hold = HELD_HERE,
        poll_id: str | None = None,
    ) -> PollReport:
        """Poll ``source`` into ``user``'s Maildir once; never raises for a failed poll.

        ``hold`` is the caller's hold of the upstream mailbox, confirmed before any
        DELE; ``poll_id`` names the poll in log lines (a new one if None).
        """
        key = SourceKey(user.name, source.upstream, source.upstream_user)
        poll_id = poll_id or new_poll_id()
        started = trio.current_time()
        counts = _Counts()
        result, reason = PollResult.OK, ""
        store: GatewayStore | None = None
        try:
            store = self._opened = await self._get_store()
            await self._poll(config, user, source, key, counts, poll_id=poll_id, hold=hold)
        except UpstreamError as exc:
            result = _LOGIN_REFUSED.get(exc.failure, PollResult.UPSTREAM_ERROR)
            reason = f"{exc.failure.value}: {exc.text}"
            if exc.failure is UpstreamFailure.TOKEN_REJECTED:
                reason += f"; run `popproxy oauth-login` again for {key.label}"
        except MailboxLost as exc:
            result, reason = PollResult.LEASE_LOST, exc.text
        except MaildropError as exc:
            result, reason = PollResult.UPSTREAM_ERROR, exc.text
        except DeliveryError as exc:
            result = PollResult.MAILDIR_FULL if exc.disk_full else PollResult.MAILDIR_ERROR
            reason = str(exc)
        except MaildirOverLimit as exc:
            result, reason = PollResult.MAILDIR_FULL, str(exc)
        except StateError as exc:
            result, reason = PollResult.STATE_ERROR, str(exc)
        except Exception:
            # A bug must not take the listeners (and the other sources' polls) down.
            log.exception(
                "gateway_poll_crashed", extra={"fields": {"user": key.user, "source": key.label}}
            )
            result, reason = PollResult.INTERNAL_ERROR, "internal error (see gateway_poll_crashed)"
        report = PollReport(
            source=key,
            poll_id=poll_id,
            result=result,
            fetched=counts.fetched,
            skipped=counts.skipped,
            deleted=counts.deleted,
            fetched_bytes=counts.fetched_bytes,
            seconds=trio.current_time() - started,
            reason=reason,
            deleted_by_rule=dict(counts.deleted_by_rule),
        )
        summary = PollSummary(
            self._clock(),
            result.value,
            counts.fetched,
            counts.skipped,
            counts.deleted,
            counts.fetched_bytes,
        )
        if store is not None:
            with contextlib.suppress(StateError):  # the poll's own line says what failed
                await store.gateway_poll_finished(key, summary)
        log_poll(report)
        return report

    # -- the poll ------------------------------------------------------------------------

    async def _poll(
        self,
        config: Config,
        user: UserConfig,
        source: FetchSource,
        key: SourceKey,
        counts: _Counts,
        *,
        poll_id: str,
        hold: Hold,
    ) -> None:
        if user.maildir is None:  # the config refuses it; a caller's bug otherwise
            raise ValueError("a gateway user needs a maildir")
        root = user.maildir
        await self._durable.run(delivery.ensure_maildir, root)
        await self._durable.recover(self._store(), key, root)
        if user.max_maildir_bytes is not None:
            held = await self._durable.run(delivery.maildir_bytes, root)
            if held >= user.max_maildir_bytes:
                raise MaildirOverLimit(held, user.max_maildir_bytes)
        route = source_route(source, config.upstreams)
        upstream = route.upstream
        connection, listing = await open_account(
            UpstreamAccount(upstream, route.user, route.credential),
            tls_context=await self._tls_context(upstream),
            tokens=self._tokens,
            metrics=self._metrics.upstream(upstream.name) if self._metrics else None,
            capabilities=self._memos.setdefault(upstream.name, CapabilityMemo()),
            session=poll_id,
        )
        try:
            now = self._clock()
            seen = [SeenMessage(m.uid, m.size) for m in listing]
            facts = await self._store().gateway_listing(key, seen, now)
            await self._durable.step(Step.LISTED)
            policy = config.policy.for_user(user.name, source.upstream)
            candidates = [
                Candidate(
                    index,
                    message.uid,
                    message.size,
                    facts[message.uid].first_seen,
                    headers=(
                        await top_headers(connection, message.number)
                        if policy.needs_headers
                        else None
                    ),
                )
                for index, message in enumerate(listing)
            ]
            view = await decide_view(policy, candidates, now)
            durable = {
                index
                for index, message in enumerate(listing)
                if facts[message.uid].state is FetchState.DELIVERED
            }
            plan = policy.poll_plan(view, durable, now)
            counts.skipped = len(plan.skip)
            _log_skips(key, plan.skip, listing, facts, now)
            # RFC 2449 §6.6: several commands in flight only where the upstream says so.
            depth = config.gateway.pipelining_depth if connection.pipelining else 1
            session = _Session(
                connection, key, root, listing, facts, policy, counts, depth, poll_id, hold
            )
            durable |= await self._fetch(session, plan.fetch)
            await self._delete(session, view, durable)
        finally:
            await connection.aclose()

    async def _fetch(self, session: _Session, indexes: Sequence[int]) -> set[int]:
        """Fetch ``indexes`` into the Maildir in durable batches; the indexes delivered.

        ``session.depth`` RETRs are kept in flight (RFC 2449 §6.6): the next one is sent
        as soon as a reply's status line is read, so the upstream never waits for a
        round trip between messages; each body still streams to its file in order,
        never held whole. A message's last write and its fsync run in a worker thread
        while the next messages arrive (at most ``MAX_PENDING_WRITES`` at once, so at
        most that many final pieces of ``WRITE_BYTES`` are held); a batch is delivered
        once all of its files are written. A message the upstream refuses (``-ERR``:
        deleted meanwhile by another client) is skipped. A failure (upstream or local)
        first makes the messages whose files were written durable and recorded, then
        propagates: they are not fetched again.
        """
        key, root, counts = session.key, session.root, session.counts
        connection = session.connection
        timeout = connection.upstream.command_timeout_seconds
        source = (key.user, key.upstream, key.upstream_user)
        delivered: set[int] = set()
        written: list[tuple[int, StagedMessage]] = []  # files written, not yet delivered
        waiting = collections.deque(indexes)
        in_flight: collections.deque[tuple[int, float]] = collections.deque()
        pending_writes = trio.Semaphore(MAX_PENDING_WRITES)

        async def send_more() -> None:
            # Refilled by halves: one write carries several RETRs (fewer send calls),
            # and the upstream still always has commands queued.
            if len(in_flight) > session.depth // 2:
                return
            commands = []
            now = trio.current_time()
            while waiting and len(in_flight) < session.depth:
                index = waiting.popleft()
                in_flight.append((index, now))
                commands.append(Retr(session.listing[index].number))
            if commands:
                await connection.send(*commands)

        async def finish(index: int, tmp: TmpFile | None, name: str, rest: list[bytes]) -> None:
            message = session.listing[index]
            try:
                size = await self._durable.finish(tmp, root, name, rest)
            finally:
                pending_writes.release()
            counts.fetched_bytes += size
            written.append((index, StagedMessage(message.uid, message.size, name)))
            await self._durable.step(Step.WRITTEN)

        try:
            with connection.exchange():
                connection.check_quiet()
                await send_more()
                while in_flight:  # ends: each batch takes at least one reply off in_flight
                    batch_messages = batch_bytes = 0
                    try:
                        async with trio.open_nursery() as writes:
                            while in_flight and (
                                batch_messages < BATCH_MESSAGES and batch_bytes < BATCH_BYTES
                            ):
                                index, sent = in_flight.popleft()
                                with trio.fail_after(timeout):
                                    reply = await connection.status()
                                connection.answered(Retr.verb, sent)
                                await send_more()
                                message = session.listing[index]
                                if isinstance(reply, Err):
                                    _log_vanished(key, message)
                                    continue
                                first_seen = session.facts[message.uid].first_seen
                                name = delivery.message_name(
                                    first_seen, source, uid=message.uid, size=message.size
                                )
                                await pending_writes.acquire()
                                try:
                                    tmp, rest, size = await self._durable.receive(
                                        connection, root, name
                                    )
                                except BaseException:
                                    pending_writes.release()
                                    raise
                                writes.start_soon(finish, index, tmp, name, rest)
                                batch_messages += 1
                                batch_bytes += size
                    except BaseExceptionGroup as group:
                        raise _first_failure(group) from None
                    full, written[:] = list(written), []
                    delivered |= await self._durable.deliver(self._store(), key, root, full)
                    counts.fetched += len(full)
        except BaseException:
            # Keep what arrived whole; the failure that stopped the poll is what it reports.
            if written:
                with trio.CancelScope(shield=True):
                    try:
                        delivered |= await self._durable.deliver(self._store(), key, root, written)
                        counts.fetched += len(written)
                    except (DeliveryError, StateError) as exc:
                        log.warning(
                            "gateway_batch_not_kept",
                            extra={"fields": {"source": key.label, "reason": str(exc)}},
                        )
            raise
        return delivered

    async def _delete(self, session: _Session, view: View, durable: set[int]) -> None:
        """DELE what the policy allows among the durable messages, then QUIT (RFC 1939
        §6); record the deletions only after QUIT's +OK."""
        key, counts = session.key, session.counts
        plan = session.policy.poll_plan(view, durable, self._clock())
        deletes = plan.delete_upstream
        if deletes:
            # Still this poll's mailbox (a lease can be lost): if not, no DELE.
            await session.hold.confirm()
        await session.connection.commit([session.listing[item.index].number for item in deletes])
        await self._durable.step(Step.QUIT_SENT)
        if not deletes:
            return
        counts.deleted = len(deletes)
        for item in deletes:
            counts.deleted_by_rule[item.rule] = counts.deleted_by_rule.get(item.rule, 0) + 1
        disposals = [Disposal(item.uid, item.rule) for item in deletes]
        await self._store().gateway_deleted(
            key, disposals, self._clock(), session_id=session.poll_id
        )
        await self._durable.step(Step.DELETIONS_RECORDED)

    # -- helpers -------------------------------------------------------------------------

    async def _tls_context(self, upstream: UpstreamConfig) -> ssl.SSLContext | None:
        if upstream.tls.value == "none":
            return None
        context = self._tls.get(upstream)
        if context is None:
            try:
                context = await trio.to_thread.run_sync(client_context, upstream)
            except (OSError, ssl.SSLError) as exc:
                log.warning(
                    "gateway_tls_context_failed",
                    extra={"fields": {"upstream": upstream.name, "reason": str(exc)}},
                )
                raise unavailable(UpstreamFailure.TLS) from exc
            self._tls[upstream] = context
        return context

    def _store(self) -> GatewayStore:
        if self._opened is None:
            raise RuntimeError("the store is opened at the start of each poll")
        return self._opened


def _first_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception a batch's writes and receive failed with: the first leaf that is not
    a cancellation (the others were cancelled because of it)."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return leaves[0]


def _log_vanished(key: SourceKey, message: ListedMessage) -> None:
    """A listed message the upstream refused to RETR (gone meanwhile): skipped."""
    log.info(
        "gateway_message_gone",
        extra={"fields": {"user": key.user, "source": key.label, "uid": message.uid}},
    )


def _log_skips(
    key: SourceKey,
    skips: Sequence[Planned],
    listing: Sequence[ListedMessage],
    facts: Mapping[str, FetchFacts],
    now: datetime,
) -> None:
    """One line per skipped message the first time a poll sees it (not at every poll)."""
    for item in skips:
        if facts[item.uid].first_seen != now:
            continue
        log.info(
            "gateway_skipped",
            extra={
                "fields": {
                    "user": key.user,
                    "source": key.label,
                    "uid": item.uid,
                    "size": listing[item.index].size,
                    "rule": item.rule,
                }
            },
        )


_POLL_LEVELS = {PollResult.OK: logging.INFO, PollResult.BUSY: logging.DEBUG}


def new_poll_id() -> str:
    """A poll's id: its log lines' ``session=`` and its audit rows' session."""
    return secrets.token_hex(4)


def log_poll(report: PollReport) -> None:
    """The poll's ``gateway_poll`` line: info if ok, debug if busy (skipped), else a warning."""
    fields: dict[str, object] = {
        "session": report.poll_id,
        "user": report.source.user,
        "source": report.source.label,
        "result": report.result.value,
        "fetched": report.fetched,
        "skipped": report.skipped,
        "deleted": report.deleted,
        "bytes": report.fetched_bytes,
        "duration": f"{report.seconds:.3f}",
    }
    if report.reason:
        fields["reason"] = report.reason
    level = _POLL_LEVELS.get(report.result, logging.WARNING)
    log.log(level, "gateway_poll", extra={"fields": fields})
