"""Retention policy applied to an upstream maildrop (DESIGN.md, "Session data flow").

Theory of operation. ``open_retained`` wraps a logged-in upstream session. At
login it reads the store's facts for the listed UIDLs (first seen, hidden for
this local user), fetches headers with ``TOP n 0`` only when a rule needs them,
and asks the pure policy for the client's *view*: which upstream messages the
client sees, numbered 1..n in upstream order. RETR and TOP are renumbered and
streamed through untouched; a RETR that reaches its end counts as retrieved.

At QUIT, and only then, the policy turns the client's DELE marks, its
retrievals and the clock into a plan: which messages to delete upstream and
which to hide for this user. The plan's deletions go upstream with the
upstream's own QUIT, and only after that ``+OK`` does the store record what
the session saw, retrieved, hid and deleted, in one transaction. A session
that ends any other way writes nothing and deletes nothing (invariant 2).
If the process dies between the upstream's ``+OK`` and the store's commit,
the deleted messages are simply gone from the next listing, and hides not
recorded make those messages visible again: a message is offered again only
if it was not deleted upstream.

Sessions on one upstream account are serialized (RFC 1939 §4: the server
acquires an exclusive-access lock on the maildrop): the router holds the
account's lock (``popproxy.locks``) until the retained maildrop is closed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import compress, repeat
from operator import attrgetter, is_not

import trio

from popproxy import gc_pause
from popproxy.maildrop.base import (
    Committed,
    Maildrop,
    MaildropError,
    MessageChunks,
    MessageInfo,
)
from popproxy.maildrop.upstream import UpstreamMaildrop
from popproxy.metrics import Metrics, PolicyAction
from popproxy.policy import (
    MAX_HEADER_OCTETS,
    AccountPolicy,
    Candidate,
    Headers,
    Reason,
    View,
    parse_headers,
)
from popproxy.pop3.dotstuff import TERMINATOR, DotUnstuffer
from popproxy.pop3.replies import ResponseCode
from popproxy.state.base import (
    AccountKey,
    Disposal,
    SeenMessage,
    SessionRecord,
    StateError,
    StateStore,
)
from popproxy.state.facts_cache import FactsCache, KnownMessage

log = logging.getLogger("popproxy.retention")

# Worker threads that match header rules at once, for the whole process. RE2 releases
# the GIL while it matches, so the event loop goes on serving every other session; a
# pattern that defeats RE2's DFA can take about a second per 100 KiB header here
# (policy/patterns.py), and one thread per core keeps such logins from taking every
# worker thread the process has.
HEADER_MATCH_THREADS = 2
_HEADER_MATCH_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "header_match_limiter"
)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The wall clock in UTC: the default ``Clock`` (retention ages are in days)."""
    return datetime.now(UTC)


_ACTIONS = {
    Reason.DELETED: PolicyAction.DELETED,
    Reason.RETRIEVED: PolicyAction.DELETED,
    Reason.EXPIRED: PolicyAction.EXPIRED,
    Reason.HIDDEN: PolicyAction.HIDDEN,
}


@dataclass(frozen=True, slots=True)
class RetentionContext:
    """Who the session is and where its decisions go (fixed at login)."""

    account: AccountKey
    user: str
    session_id: str
    policy: AccountPolicy
    store: StateStore
    clock: Clock
    # Where policy actions are counted; by default a Metrics nobody reads (explain, tests).
    metrics: Metrics = field(default_factory=Metrics.unexported)
    # The store's facts kept in memory (sqlite only: state/facts_cache.py); None reads
    # the store at every login.
    facts_cache: FactsCache | None = None


async def open_retained(
    inner: Maildrop,
    context: RetentionContext,
    *,
    on_close: Callable[[], Awaitable[object]] | None,
    confirm: Callable[[], Awaitable[None]] | None = None,
) -> RetainedMaildrop:
    """Build the client's view of ``inner`` (an upstream session just logged in).

    ``on_close`` is awaited once the retained maildrop is closed, shielded from
    cancellation (it releases the account lock); None when nothing is held. ``confirm`` (the lock's
    ``Hold.confirm``) runs at QUIT before anything is deleted upstream; its
    ``MaildropError`` stops the QUIT with nothing deleted. Raises ``MaildropError``
    (``[SYS/TEMP]``) when the store cannot be read; the caller then closes ``inner``
    and releases the lock itself.
    """
    listing = inner.messages
    now = context.clock()
    uids = list(map(_uid, listing))
    cache = context.facts_cache
    try:
        facts: Mapping[str, KnownMessage]
        if cache is not None:
            facts = await cache.facts(context.store, context.account, context.user, uids)
        else:
            facts = await context.store.facts(context.account, context.user, uids)
    except StateError as exc:
        log.error(  # noqa: TRY400 (the reason is in the line; a traceback adds nothing)
            "state_unavailable", extra={"fields": _fields(context, reason=str(exc))}
        )
        raise MaildropError(ResponseCode.SYS_TEMP, "Mailbox state is unavailable.") from None
    headers: Sequence[Headers | None] = ()
    if context.policy.needs_headers:
        headers = await _all_headers(inner)
    with gc_pause.paused():  # one per listed message, up to 100,000
        candidates = _candidates(uids, listing, facts, headers or None, now)
    view = await decide_view(context.policy, candidates, now)
    _count_overdue(view, now, context.metrics)
    return RetainedMaildrop(inner, context, view, tuple(candidates), on_close, confirm=confirm)


def _candidates(
    uids: list[str],
    listing: Sequence[MessageInfo],
    facts: Mapping[str, KnownMessage],
    headers: Sequence[Headers | None] | None,
    now: datetime,
) -> list[Candidate]:
    """The policy's candidates: each listed message with the store's first-seen time
    and hide, or ``now`` and not hidden for a UIDL the store does not know or knows
    with another size (a UIDL reused for other content is a new message, invariant 3)."""
    sizes = list(map(_size, listing))
    found = list(map(facts.get, uids))
    if all(map(is_not, found, repeat(None))) and list(map(_size, found)) == sizes:
        # Every message known as listed (a returning login): taken column by column.
        first_seen = list(map(_first_seen, found))
        hidden = list(map(_hidden, found))
    else:
        first_seen, hidden = [], []
        for size, known in zip(sizes, found, strict=True):
            if known is None or known.size != size:
                first_seen.append(now)
                hidden.append(False)
            else:
                first_seen.append(known.first_seen)
                hidden.append(known.hidden)
    return Candidate.listing(uids, sizes, first_seen, hidden, headers)


_uid = attrgetter("uid")
_size = attrgetter("size")
_first_seen = attrgetter("first_seen")
_hidden = attrgetter("hidden")
_expires_at = attrgetter("expires_at")
_new_tuple = tuple.__new__


async def decide_view(
    policy: AccountPolicy, candidates: Sequence[Candidate], now: datetime
) -> View:
    """``policy.view`` of ``candidates``: in a worker thread when a header rule applies
    (RE2 over up to ``MAX_HEADER_OCTETS`` per message), on the event loop otherwise
    (no header is matched, and a thread hand-off would cost more than the decisions)."""
    if not policy.needs_headers:
        with gc_pause.paused():
            return policy.view(candidates, now)
    try:
        limiter = _HEADER_MATCH_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(HEADER_MATCH_THREADS)
        _HEADER_MATCH_LIMITER.set(limiter)
    # abandon_on_cancel: a session cancelled meanwhile (drain, client gone) does not
    # wait for the match; the thread keeps its limiter slot until it ends.
    return await trio.to_thread.run_sync(
        policy.view, candidates, now, limiter=limiter, abandon_on_cancel=True
    )


def _count_overdue(view: View, now: datetime, metrics: Metrics) -> None:
    """Messages already past their expiry at login (``popproxy_policy_overdue_messages_total``):
    each QUIT deletes them, so a count that grows while deletions do not means they stall."""
    overdue: dict[str, int] = {}  # rule -> messages (no Counter: this runs at every login)
    # Only decisions with an expiry, picked in C (a listing may have 100,000).
    for decision in compress(view.decisions, map(_expires_at, view.decisions)):
        if decision.expires_at is not None and decision.expires_at <= now:
            rule = decision.expire_rule or decision.rule
            overdue[rule] = overdue.get(rule, 0) + 1
    for rule, count in overdue.items():
        metrics.policy_overdue(rule, count)


async def _all_headers(inner: Maildrop) -> list[Headers | None]:
    """Every message's header (``TOP n 0``, RFC 1939 §7, at most ``MAX_HEADER_OCTETS``),
    None where the upstream no longer has the message. From an upstream maildrop the
    TOPs are pipelined (``UpstreamMaildrop.headers``); otherwise one at a time."""
    count = len(inner.messages)
    if isinstance(inner, UpstreamMaildrop):
        out: list[Headers | None] = [None] * count
        async with contextlib.aclosing(inner.headers(range(count), MAX_HEADER_OCTETS)) as replies:
            async for index, wire in replies:
                out[index] = None if wire is None else _parse_header(wire, stuffed=True)
        return out
    return [await _headers(inner, index) for index in range(count)]


async def _headers(inner: Maildrop, index: int) -> Headers | None:
    """The header of message ``index`` from ``TOP n 0`` (RFC 1939 §7), at most
    ``MAX_HEADER_OCTETS``; None if the maildrop no longer has the message."""
    wire = bytearray()
    try:
        async with contextlib.aclosing(inner.retrieve(index, body_lines=0)) as chunks:
            async for chunk in chunks:
                room = MAX_HEADER_OCTETS - len(wire)
                wire += chunk[:room]
                if len(wire) >= MAX_HEADER_OCTETS:
                    break
    except MaildropError:
        return None
    return _parse_header(bytes(wire), stuffed=inner.dot_stuffed)


def _parse_header(wire: bytes, *, stuffed: bool) -> Headers:
    """Headers from the first octets of a TOP reply (dot-stuffed from an upstream)."""
    if not stuffed:
        return parse_headers(wire)
    text = bytearray(wire)
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    text += TERMINATOR
    return parse_headers(DotUnstuffer().feed(text))


class RetainedMaildrop:
    """An upstream maildrop seen through retention policy (DESIGN.md, proxy mode)."""

    def __init__(
        self,
        inner: Maildrop,
        context: RetentionContext,
        view: View,
        candidates: Sequence[Candidate],
        on_close: Callable[[], Awaitable[object]] | None,
        *,
        confirm: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._inner = inner
        self._on_close = on_close
        self._confirm = confirm
        self._context = context
        self._view = view
        self._candidates = candidates
        listing = inner.messages
        # The visible messages, how often to keep the upstream alive and whether RETR
        # relays stuffed octets: plain attributes (fixed at login), not properties, as
        # the session reads them at every command.
        self.messages: Sequence[MessageInfo] = list(map(listing.__getitem__, view.visible))
        self.keepalive_interval_seconds: float | None = inner.keepalive_interval_seconds
        self.dot_stuffed: bool = inner.dot_stuffed
        self._retrieved: set[int] = set()  # upstream indexes RETR'd to their end

    @property
    def view(self) -> View:
        """The policy's decisions for every upstream message (``popproxy explain``)."""
        return self._view

    @property
    def upstream_messages(self) -> Sequence[MessageInfo]:
        """The upstream's whole listing, hidden messages too (``popproxy explain``)."""
        return self._inner.messages

    def first_seen(self, index: int) -> datetime:
        """When upstream message ``index`` was first seen (the store's, or this login)."""
        return self._candidates[index].first_seen

    @property
    def expire(self) -> str:
        """The CAPA EXPIRE argument after login (RFC 2449 §6.7)."""
        return self._context.policy.expire

    def retrieve(self, index: int, *, body_lines: int | None = None) -> MessageChunks:
        """RETR / TOP of client message ``index + 1``, renumbered to the upstream's."""
        upstream_index = self._view.visible[index]
        chunks = self._inner.retrieve(upstream_index, body_lines=body_lines)
        if body_lines is not None:
            return chunks  # TOP: nothing to count
        return _Retrieved(chunks, self._retrieved, upstream_index)

    async def keep_alive(self) -> None:
        await self._inner.keep_alive()

    async def commit(self, deleted: Set[int]) -> Committed:
        """QUIT: carry out the retention plan, then record it (RFC 1939 §6).

        The upstream deletes only what the plan says; the store is written only
        after the upstream's QUIT answered ``+OK``. Returns what was deleted and hidden;
        if the store then fails, the ``MaildropError`` carries the deletions.
        """
        context = self._context
        now = context.clock()
        marked = {self._view.visible[i] for i in deleted}
        plan = context.policy.plan(self._view, marked, frozenset(self._retrieved), now)
        if self._confirm is not None:
            # The mailbox must still be this session's (a lock shared across instances
            # can be lost); if not, nothing is deleted and nothing recorded.
            await self._confirm()
        await self._inner.commit({p.index for p in plan.delete_upstream})
        listing = self._inner.messages
        with gc_pause.paused():  # the whole listing again, up to 100,000 messages
            # Each MessageInfo's (uid, size) made a SeenMessage by tuple.__new__ in C.
            seen = tuple(map(_new_tuple, repeat(SeenMessage), listing))
        record = SessionRecord(
            account=context.account,
            user=context.user,
            session_id=context.session_id,
            at=now,
            seen=seen,
            retrieved=frozenset(listing[i].uid for i in self._retrieved),
            hidden=tuple(Disposal(p.uid, p.rule) for p in plan.hide),
            deleted_upstream=tuple(Disposal(p.uid, p.rule) for p in plan.delete_upstream),
        )
        for planned in plan.delete_upstream:  # done upstream: logged even if the store fails
            self._audit(planned.uid, planned.rule, _ACTIONS[planned.reason])
        reasons = [planned.reason for planned in plan.delete_upstream]
        upstream_deleted, expired = len(reasons), reasons.count(Reason.EXPIRED)
        retrieved = reasons.count(Reason.RETRIEVED)
        stored = False
        try:
            await context.store.record(record)
            stored = True
        except StateError as exc:
            log.error(  # noqa: TRY400 (the reason is in the line; a traceback adds nothing)
                "state_not_recorded", extra={"fields": _fields(context, reason=str(exc))}
            )
            raise MaildropError(
                ResponseCode.SYS_TEMP,
                "Deletions done, but the mailbox state was not saved.",
                # What the QUIT did: the hides are not recorded.
                committed=Committed(
                    deleted_upstream=upstream_deleted, expired=expired, retrieved=retrieved
                ),
            ) from None
        finally:
            if context.facts_cache is not None:
                # Failed or cancelled, the record may or may not be in the store.
                if stored:
                    context.facts_cache.recorded(record)
                else:
                    context.facts_cache.forget(context.account)
        for planned in plan.hide:
            self._audit(planned.uid, planned.rule, _ACTIONS[planned.reason])
            # The same DELE, seen from the upstream: the keep rule left the message there.
            context.metrics.policy_action(planned.rule, PolicyAction.KEPT)
        return Committed(  # not dataclasses.replace: this is every QUIT's path
            deleted_upstream=upstream_deleted,
            hidden=len(plan.hide),
            expired=expired,
            retrieved=retrieved,
        )

    def _audit(self, uid: str, rule: str, action: PolicyAction) -> None:
        """One log line and one count per upstream deletion or hide (issue: audit)."""
        self._context.metrics.policy_action(rule, action)
        log.info(
            "policy_" + action.value,
            extra={"fields": _fields(self._context, uid=uid, rule=rule)},
        )

    async def aclose(self) -> None:
        on_close = self._on_close
        if on_close is None:  # no lock held: no shielded scope (every session's end)
            await self._inner.aclose()
            return
        try:
            await self._inner.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await on_close()


class _Retrieved:
    """A RETR's chunks, passed through; one read to its end adds its upstream index to
    ``retrieved`` (a class, not an async generator: every RETR's path, issue 15)."""

    __slots__ = ("_chunks", "_index", "_retrieved")

    def __init__(self, chunks: MessageChunks, retrieved: set[int], index: int) -> None:
        self._chunks = chunks
        self._retrieved = retrieved
        self._index = index

    def __aiter__(self) -> _Retrieved:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self._retrieved.add(self._index)
            raise

    async def aclose(self) -> None:
        await self._chunks.aclose()


def _fields(context: RetentionContext, **extra: object) -> dict[str, object]:
    return {
        "session": context.session_id,
        "user": context.user,
        "upstream": context.account.upstream,
        **extra,
    }
