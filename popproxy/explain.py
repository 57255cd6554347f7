"""``popproxy explain``: the retention rules dry-run against a live upstream listing.

It logs in upstream as the local user's session would, reads the store's facts
without writing, builds the same view a session would, and asks the policy what
a QUIT would do with nothing marked and nothing retrieved, plus what a DELE or a
RETR would lead to for each message. It leaves the upstream without QUIT, so the
upstream changes nothing either (RFC 1939 §6: UPDATE only follows QUIT).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from popproxy.config import Config, StateConfig
from popproxy.locks import InProcessLocks
from popproxy.maildrop.connection import UpstreamError
from popproxy.maildrop.retention import Clock
from popproxy.maildrop.route import MaildirRoute, NoRoute, UpstreamRoute, route_of
from popproxy.maildrop.router import CapabilityMemos, MaildropRouter, RouterResources
from popproxy.policy import Decision, Reason, RetentionPlan
from popproxy.state import open_store
from popproxy.state.base import (
    AccountKey,
    AuditEntry,
    AuditQuery,
    MessageFacts,
    StateStore,
    StoredMessage,
)
from popproxy.tls import upstream_tls_contexts


class ExplainError(Exception):
    """Nothing to explain for this user (the text says why, for the operator)."""


@dataclass(frozen=True, slots=True)
class MessageExplanation:
    """What the rules make of one upstream message (one row of the output)."""

    upstream_number: int  # RFC 1939 message number on the upstream
    client_number: int | None  # what the client would see, None if hidden
    uid: str
    size: int
    first_seen: datetime
    rule: str
    why_hidden: str | None
    on_dele: str  # what a client's DELE leads to at QUIT
    on_retr: str  # what a complete RETR leads to at QUIT
    expires_at: datetime | None
    at_next_quit: str  # what the next QUIT does with it if the client does nothing


class _NoState:
    """The facts of a store that does not exist yet: none (and nothing is created)."""

    async def facts(
        self, account: AccountKey, user: str, uids: object
    ) -> Mapping[str, MessageFacts]:
        return {}

    async def record(self, record: object) -> None:
        raise AssertionError("explain never records")

    async def messages(self, account: AccountKey | None = None) -> Sequence[StoredMessage]:
        return ()

    async def prune(self, gone_before: datetime) -> int:
        return 0

    async def known_source(self, user: str, source: str, since: datetime) -> datetime | None:
        return None

    async def remember_source(
        self, user: str, source: str, at: datetime, *, keep: int, forget_before: datetime
    ) -> None:
        raise AssertionError("explain never records")

    async def audit(self, query: AuditQuery) -> Sequence[AuditEntry]:
        return ()

    async def trim_audit(self, before: datetime, *, dry_run: bool = False) -> int:
        return 0

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Opened:
    """A store already open, as the router asks for one (``StoreSource``)."""

    store: StateStore

    async def get(self) -> StateStore:
        return self.store


async def _open_state(config: StateConfig) -> StateStore:
    path = config.sqlite_path
    if path is not None and not path.exists():
        return _NoState()
    return await open_store(config)


async def explain(config: Config, user_name: str, clock: Clock) -> list[MessageExplanation]:
    """Dry-run the rules for local user ``user_name`` against its upstream now.

    Raises ``ExplainError`` for a user that is unknown or served from a Maildir,
    and lets ``MaildropError`` (upstream unreachable, login refused) through.
    """
    user = config.users.get(user_name)
    if user is None:
        raise ExplainError(f"no local user {user_name!r} in {config.source}")
    maildir = ExplainError(f"user {user_name!r} is served from a Maildir: no rules apply")
    try:
        route = route_of(user, config.upstreams)
    except NoRoute:
        raise maildir from None
    match route:
        case MaildirRoute():
            raise maildir
        case UpstreamRoute():
            pass
    upstream_tls = await upstream_tls_contexts(config)
    store = await _open_state(config.state)
    try:
        # The session's own routing, with a lock table, memo and greeting token of its own.
        resources = RouterResources(
            store=_Opened(store),
            locks=InProcessLocks(),
            capabilities=CapabilityMemos(),
            greeting_token=secrets.token_hex(6),
            clock=clock,
        )
        router = MaildropRouter(config, upstream_tls, resources)
        retained = await router.open_upstream(route, user_name, "explain")
        try:
            policy = config.policy.for_user(user_name, route.upstream.name)
            view = retained.view
            listing = retained.upstream_messages
            now = clock()
            idle = policy.plan(view, frozenset(), frozenset(), now)
            at_quit = {p.index: p for p in idle.delete_upstream}
            client_numbers = {index: n for n, index in enumerate(view.visible, start=1)}
            rows = []
            for index, decision in enumerate(view.decisions):
                message = listing[index]
                # A client can DELE or RETR only what it is shown.
                shown = decision.visible
                dele = policy.plan(view, {index}, frozenset(), now) if shown else None
                retr = policy.plan(view, frozenset(), {index}, now) if shown else None
                rows.append(
                    MessageExplanation(
                        upstream_number=index + 1,
                        client_number=client_numbers.get(index),
                        uid=message.uid,
                        size=message.size,
                        first_seen=retained.first_seen(index),
                        rule=decision.rule,
                        why_hidden=_why_hidden(decision),
                        on_dele=_outcome(dele, index),
                        on_retr=_outcome(retr, index),
                        expires_at=decision.expires_at,
                        at_next_quit=_reason(at_quit[index].reason) if index in at_quit else "kept",
                    )
                )
        finally:
            await retained.aclose()  # without QUIT: the upstream deletes nothing
    finally:
        await store.aclose()
    return rows


def describe_failure(exc: Exception, config: Config, user_name: str) -> str:
    """What ``popproxy explain`` prints when it cannot explain: for an upstream failure
    its cause (``TLS handshake ... failed: CERTIFICATE_VERIFY_FAILED``), then what the
    user's client would be told; otherwise the error's own text."""
    if not isinstance(exc, UpstreamError):
        return str(exc)
    user = config.users.get(user_name)
    upstream = user.upstream if user is not None else None
    return f"upstream {upstream}: {exc.detail} (a client is told: -ERR {exc})"


def _why_hidden(decision: Decision) -> str | None:
    if decision.hidden is None:
        return None
    if decision.hidden_rule is None:
        return decision.hidden.value
    return f"{decision.hidden.value} by {decision.hidden_rule}"


def _outcome(plan: RetentionPlan | None, index: int) -> str:
    """What ``plan`` does with upstream message ``index`` ("-": not shown, no plan)."""
    if plan is None:
        return "-"
    if any(planned.index == index for planned in plan.delete_upstream):
        return "deleted upstream"
    if any(planned.index == index for planned in plan.hide):
        return "hidden for this user"
    return "kept"


def _reason(reason: Reason) -> str:
    return f"deleted upstream ({reason.value})"


def format_explanation(user: str, rows: Sequence[MessageExplanation]) -> str:
    """A fixed-width table, one line per upstream message, for ``popproxy explain``."""
    header = (
        "up#",
        "client#",
        "uid",
        "size",
        "first seen",
        "rule",
        "shown",
        "DELE",
        "RETR",
        "expires",
        "next QUIT",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                str(r.upstream_number),
                "-" if r.client_number is None else str(r.client_number),
                r.uid,
                str(r.size),
                r.first_seen.strftime("%Y-%m-%d %H:%M"),
                r.rule,
                "yes" if r.why_hidden is None else f"no ({r.why_hidden})",
                r.on_dele,
                r.on_retr,
                "-" if r.expires_at is None else r.expires_at.strftime("%Y-%m-%d %H:%M"),
                r.at_next_quit,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [f"explain for user {user}: {len(rows)} upstream messages, nothing changed"]
    out += [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    return "\n".join(out) + "\n"
