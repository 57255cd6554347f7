"""``popproxy explain`` for a gateway user: what the next poll of each source would do.

For each source it logs in as a poll would, reads the store's facts without writing
(``GatewayStore.gateway_facts``), builds the same view and plan as a poll
(``AccountPolicy.poll_plan``) and says per upstream message: fetched or not, and
what happens upstream after the download. It leaves without QUIT, so the upstream
changes nothing (RFC 1939 §6), and it writes nothing to the Maildir or the store. A
source on a token upstream logs in with an access token refreshed for the dry run
(a provider that rotates refresh tokens gets the new one written back, as a poll does).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import trio

from popproxy.config import Config, FetchSource, UpstreamConfig, UserConfig
from popproxy.maildrop.connection import UpstreamConnection
from popproxy.maildrop.retention import decide_view
from popproxy.maildrop.route import source_route
from popproxy.maildrop.upstream_login import UpstreamAccount, open_account
from popproxy.oauth2.cache import TokenCache
from popproxy.policy import Candidate, Headers, Planned, parse_headers
from popproxy.policy.headers import MAX_HEADER_OCTETS
from popproxy.pop3.commands import Top
from popproxy.pop3.replies import Err
from popproxy.state import open_store
from popproxy.state.base import FetchFacts, FetchState, SourceKey
from popproxy.tls import client_context

Clock = Callable[[], datetime]
# How a dry run reads the store: ``GatewayStore.gateway_facts`` (no write).
FactsReader = Callable[[SourceKey, Sequence[str]], Awaitable[Mapping[str, FetchFacts]]]


@dataclass(frozen=True, slots=True)
class SourceMessage:
    """What the next poll would do with one upstream message of a source."""

    number: int  # RFC 1939 message number upstream
    uid: str
    size: int
    first_seen: datetime  # the store's, or now for a message never listed
    known: str  # "new", "listed" (seen, not fetched), "staged", "delivered"
    next_poll: str  # what the next poll would do, with the rule that says so
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class SourceExplanation:
    """One source and its messages, in upstream order."""

    source: SourceKey
    messages: tuple[SourceMessage, ...]


async def explain_user(config: Config, user: UserConfig, clock: Clock) -> list[SourceExplanation]:
    """``explain_sources`` with the configured store, opened to read and closed; a
    sqlite store that does not exist yet is not created (nothing is known)."""
    path = config.state.sqlite_path
    if path is not None and not path.exists():

        async def nothing(source: SourceKey, uids: Sequence[str]) -> Mapping[str, FetchFacts]:
            return {}

        return await explain_sources(config, user, clock, nothing)
    store = await open_store(config.state)
    try:
        return await explain_sources(config, user, clock, store.gateway_facts)
    finally:
        await store.aclose()


async def explain_sources(
    config: Config,
    user: UserConfig,
    clock: Clock,
    read_facts: FactsReader,
    *,
    tokens: TokenCache | None = None,
) -> list[SourceExplanation]:
    """Dry-run the next poll of each of ``user``'s sources (see the module docstring).

    ``tokens``: where token upstreams' access tokens come from (default: a cache of the
    dry run's own). Lets ``MaildropError`` (upstream unreachable, login refused, no
    access token) and ``StateError`` through.
    """
    tokens = tokens if tokens is not None else TokenCache()
    out = []
    for source in user.fetch:
        out.append(await _explain_source(config, user, source, clock, read_facts, tokens))
    return out


async def _explain_source(  # noqa: PLR0917 (one dry run's parts)
    config: Config,
    user: UserConfig,
    source: FetchSource,
    clock: Clock,
    read_facts: FactsReader,
    tokens: TokenCache,
) -> SourceExplanation:
    key = SourceKey(user.name, source.upstream, source.upstream_user)
    route = source_route(source, config.upstreams)
    upstream = route.upstream
    connection, listing = await open_account(
        UpstreamAccount(upstream, route.user, route.credential),
        tls_context=await _tls(upstream),
        tokens=tokens,
    )
    try:
        now = clock()
        stored = await read_facts(key, [m.uid for m in listing])
        facts: dict[str, FetchFacts | None] = {}
        for m in listing:
            fact = stored.get(m.uid)
            # Another size under a known UIDL is new content (RFC 1939 §7).
            facts[m.uid] = fact if fact is not None and fact.size == m.size else None
        policy = config.policy.for_user(user.name, source.upstream)
        candidates = []
        for index, m in enumerate(listing):
            fact = facts[m.uid]
            headers = await top_headers(connection, m.number) if policy.needs_headers else None
            first_seen = now if fact is None else fact.first_seen
            candidates.append(Candidate(index, m.uid, m.size, first_seen, headers=headers))
        view = await decide_view(policy, candidates, now)
        durable = {
            i
            for i, m in enumerate(listing)
            if (fact := facts[m.uid]) is not None and fact.state is FetchState.DELIVERED
        }
        before = policy.poll_plan(view, durable, now)
        after = policy.poll_plan(view, durable | set(before.fetch), now)
    finally:
        await connection.aclose()
    skipped = _by_index(before.skip)
    deleted = _by_index(after.delete_upstream)
    fetched = set(before.fetch)
    rows = []
    for index, m in enumerate(listing):
        decision = view.decisions[index]
        fact = facts[m.uid]
        if index in skipped:
            what = f"left upstream, not fetched [{skipped[index].rule}]"
        elif index in fetched and index in deleted:
            what = f"fetch, then delete upstream at QUIT [{deleted[index].rule}]"
        elif index in fetched:
            what = f"fetch, keep upstream [{decision.rule}]"
        elif index in deleted:
            item = deleted[index]
            why = "expired" if item.reason.value == "expired" else "fetched before"
            what = f"delete upstream at QUIT ({why}) [{item.rule}]"
        else:
            what = f"kept upstream [{decision.rule}]"
        rows.append(
            SourceMessage(
                number=m.number,
                uid=m.uid,
                size=m.size,
                first_seen=view.candidates[index].first_seen,
                known="new" if fact is None else fact.state.value,
                next_poll=what,
                expires_at=decision.expires_at,
            )
        )
    return SourceExplanation(key, tuple(rows))


def format_sources(user: str, explanations: Sequence[SourceExplanation]) -> str:
    """A fixed-width table per source, for ``popproxy explain``."""
    out = [f"explain for gateway user {user}: the next poll of each source, nothing changed"]
    for explanation in explanations:
        header = ("up#", "uid", "size", "first seen", "known", "next poll", "expires")
        lines = [header]
        for r in explanation.messages:
            lines.append(
                (
                    str(r.number),
                    r.uid,
                    str(r.size),
                    r.first_seen.strftime("%Y-%m-%d %H:%M"),
                    r.known,
                    r.next_poll,
                    "-" if r.expires_at is None else r.expires_at.strftime("%Y-%m-%d %H:%M"),
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out.append(f"source {explanation.source.label}: {len(explanation.messages)} messages")
        out += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        ]
    return "\n".join(out) + "\n"


def _by_index(items: Sequence[Planned]) -> Mapping[int, Planned]:
    return {item.index: item for item in items}


async def _tls(upstream: UpstreamConfig) -> ssl.SSLContext | None:
    if upstream.tls.value == "none":
        return None
    return await trio.to_thread.run_sync(client_context, upstream)


async def top_headers(connection: UpstreamConnection, number: int) -> Headers:
    """The header of message ``number`` from ``TOP n 0`` (RFC 1939 §7), at most
    ``MAX_HEADER_OCTETS``; the reply is read to its end so the connection stays usable.
    A message the upstream refuses has an empty header."""
    head = bytearray()

    async def sink(data: bytes | bytearray) -> None:
        head.extend(data[: max(0, MAX_HEADER_OCTETS - len(head))])

    timeout = connection.upstream.command_timeout_seconds
    with connection.exchange():
        connection.check_quiet()
        reply = await connection.request(Top(number, 0), within=timeout)
        if isinstance(reply, Err):
            return parse_headers(b"")
        await connection.stream_body(sink, read_seconds=timeout)
    return parse_headers(bytes(head))
