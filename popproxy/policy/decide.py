"""Pure retention decisions: the client's view at login, the retention plan at QUIT.

The policy gets the upstream listing with the state store's facts (:class:`Candidate`)
and ``now``, and returns a :class:`View` (what the client sees, and the decision for
every message); at QUIT it gets the view, the messages the client marked with DELE
and those it retrieved, and returns a :class:`RetentionPlan`: which messages to
delete upstream and which to hide for this local user. The session carries the plan
out (DESIGN.md, "Session data flow", step 6). Nothing here reads a clock, a file or
the network; docs/rules.md describes the semantics tested here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import compress, repeat
from operator import attrgetter, is_
from types import MappingProxyType
from typing import NamedTuple

from popproxy.policy.headers import Headers
from popproxy.policy.rules import DEFAULT_RULE, MAX_RULES, Action, Rule, Setting

# RFC 2449 §6.7 EXPIRE arguments.
EXPIRE_NEVER = "NEVER"  # the server does not delete messages on its own
EXPIRE_AT_QUIT = "0"  # retrieved messages are deleted at QUIT (an implicit DELE)
EXPIRE_VARIES = "USER"  # after the minimum, before login: the value varies by user

# What a message gets when no matching rule names a setting (docs/rules.md, Defaults):
# RFC 1939 DELE semantics, no expiry, no size limit.
DEFAULT_ACTION = Action.DELETE


class OnDele(enum.Enum):
    """What the client's DELE of a message does at QUIT."""

    DELETE = "delete"  # deleted upstream (RFC 1939 §6, UPDATE state)
    HIDE = "hide"  # hidden for this local user for good; upstream untouched


class Hidden(enum.Enum):
    """Why a message is not in the client's view."""

    FOR_USER = "hidden_for_user"  # an earlier QUIT hid it for this user (keep + DELE)
    HIDE_RULE = "hide_rule"  # a rule's action is hide
    TOO_LARGE = "too_large"  # larger than the max_size_bytes that applies to it


class Reason(enum.Enum):
    """Why a plan deletes a message upstream or hides it for the user."""

    DELETED = "deleted"  # the client's DELE, under delete or delete_after_retrieve
    RETRIEVED = "retrieved"  # RETR'd under delete_after_retrieve, without DELE
    EXPIRED = "expired"  # first seen more than expire_after_days ago
    HIDDEN = "hidden"  # the client's DELE under keep: hidden for this user only
    FETCHED = "fetched"  # a gateway source's message, durable in the Maildir, under delete
    SKIPPED = "skipped"  # a gateway source's message left upstream unfetched (size, hide)


class _CandidateFields(NamedTuple):
    # Shadows tuple.index (a method nothing here calls on a candidate).
    index: int  # type: ignore[assignment]
    uid: str
    size: int
    first_seen: datetime
    hidden: bool = False
    headers: Headers | None = None


class Candidate(_CandidateFields):
    """One message of the upstream listing, with what the state store knows of it.

    ``index`` is its 0-based position in the upstream listing (upstream message
    ``index + 1``, RFC 1939 §5). ``first_seen`` is the store's, or the login's
    ``now`` for a message never recorded; it must be timezone-aware. ``hidden``: an
    earlier QUIT hid it for this local user. ``headers`` from ``TOP n 0``, required
    when the account's policy ``needs_headers``, else None.

    A named tuple, not a frozen dataclass: one is built per listed message (100,000
    on a big mailbox), a tuple in about a third of the time, and the collector stops
    tracking it (it holds no container).
    """

    __slots__ = ()

    def __new__(  # noqa: PLR0917 (positional, as the named tuple's fields are)
        cls,
        index: int,
        uid: str,
        size: int,
        first_seen: datetime,
        hidden: bool = False,
        headers: Headers | None = None,
    ) -> Candidate:
        if index < 0 or size < 0:
            raise ValueError("a candidate's index and size are 0 or more")
        # UTC (what the store and the clock give) has an offset; otherwise ask.
        if first_seen.tzinfo is not UTC and first_seen.utcoffset() is None:
            raise ValueError("first_seen must be a timezone-aware datetime")
        return _new_tuple(cls, (index, uid, size, first_seen, hidden, headers))

    @classmethod
    def listing(
        cls,
        uids: Sequence[str],
        sizes: Sequence[int],
        first_seen: Sequence[datetime],
        hidden: Sequence[bool],
        headers: Sequence[Headers | None] | None = None,
    ) -> list[Candidate]:
        """A whole listing's candidates, indexed 0..n-1: ``Candidate(i, uids[i],
        sizes[i], first_seen[i], hidden[i], headers[i])`` for each ``i`` (headers None
        when not given), with the same checks and errors. When every size is 0 or more
        and every time is in UTC (what the store and the clock give), checked over the
        whole listing at once and each candidate built in C (a login builds up to
        100,000)."""
        count = len(uids)
        if len(sizes) != count or len(first_seen) != count or len(hidden) != count:
            raise ValueError("a listing's columns differ in length")
        if headers is not None and len(headers) != count:
            raise ValueError("a listing's columns differ in length")
        each = headers or repeat(None)
        columns = zip(range(count), uids, sizes, first_seen, hidden, each, strict=False)
        if (count and min(sizes) < 0) or set(map(_zone, first_seen)) - {UTC}:
            # Some row may be refused, or is in a zone other than UTC: built one by one,
            # so that the first wrong row raises what Candidate says of it.
            return [cls(*row) for row in columns]
        return list(map(_new_tuple, repeat(cls), columns))


_new_tuple = tuple.__new__
_zone = attrgetter("tzinfo")
# A candidate's and a decision's fields, read over a whole listing in C.
_index = attrgetter("index")
_hidden = attrgetter("hidden")
_headers = attrgetter("headers")
_visible = attrgetter("visible")


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided for one message, and which rules decided it.

    ``rule`` set the action (``"default"`` if none did); ``expire_rule`` set
    ``expires_at``; ``hidden_rule`` is the hide or max_size_bytes rule that hid it
    (None when it is hidden for the user). ``matched`` lists every rule that matched,
    in evaluation order (for ``popproxy explain``).
    """

    rule: str
    action: Action
    visible: bool
    on_dele: OnDele
    delete_after_retrieve: bool
    expires_at: datetime | None
    expire_rule: str | None = None
    hidden: Hidden | None = None
    hidden_rule: str | None = None
    matched: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class View:
    """The client's view of the maildrop (RFC 1939 §5: messages numbered 1..n).

    ``decisions[k]`` belongs to ``candidates[k]``. ``visible`` holds the candidate
    indexes shown, in upstream order: client message ``n`` is ``visible[n - 1]``.
    """

    candidates: tuple[Candidate, ...]
    decisions: tuple[Decision, ...]
    visible: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Planned:
    """One message a plan deletes upstream or hides, with the rule and the reason."""

    index: int
    uid: str
    rule: str
    reason: Reason


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    """What a QUIT does (DESIGN.md, step 6), in upstream order; a message is in one list at most.

    ``overruled`` counts the client's DELEs that did not delete upstream (the message
    was kept: hidden for this user only); each of those is in ``hide``.
    """

    delete_upstream: tuple[Planned, ...] = ()
    hide: tuple[Planned, ...] = ()

    @property
    def overruled(self) -> int:
        """How many of the client's DELEs a keep rule turned into a hide."""
        return sum(1 for item in self.hide if item.reason is Reason.HIDDEN)


@dataclass(frozen=True, slots=True)
class PollPlan:
    """What a gateway poll does with a source's listing (docs/rules.md, Gateway sources).

    ``fetch``: candidate indexes to download, in upstream order. ``skip``: messages
    left upstream unfetched, with the max_size_bytes or hide rule that says so.
    ``delete_upstream``: messages to DELE at the poll's QUIT, only ever among those
    already durable in the Maildir (DESIGN.md, invariant 1).
    """

    fetch: tuple[int, ...] = ()
    skip: tuple[Planned, ...] = ()
    delete_upstream: tuple[Planned, ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """A value a setting can end up with for some message of an account, and its rule."""

    value: Action | int | None  # None: not set (no expiry, no size limit)
    rule: str  # the rule that sets it, or "default"


@dataclass(frozen=True, slots=True)
class AccountPolicy:
    """The rules that can apply to one local user on one upstream account, in order.

    Built by :meth:`Policy.for_user`. ``rules`` stops at the first rule that matches
    every message of the account and does not continue: later ones never apply.
    """

    user: str
    upstream: str
    rules: tuple[Rule, ...] = ()
    needs_headers: bool = field(init=False)
    expire: str = field(init=False)
    # Which candidate fields a decision reads besides ``hidden``: the age (first_seen)
    # when a rule matches on it or sets an expiry, the size when a rule matches on it
    # or sets max_size_bytes. ``view`` shares one Decision among candidates alike in
    # those (a 100,000-message listing under the defaults needs two).
    reads_age: bool = field(init=False)
    reads_size: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_headers", any(rule.match.headers for rule in self.rules))
        object.__setattr__(self, "expire", self._expire())
        object.__setattr__(
            self,
            "reads_age",
            any(
                rule.match.older_than_days is not None
                or rule.match.newer_than_days is not None
                or rule.expire_after_days is not None
                for rule in self.rules
            ),
        )
        object.__setattr__(
            self,
            "reads_size",
            any(
                rule.match.larger_than_bytes is not None
                or rule.match.smaller_than_bytes is not None
                or rule.max_size_bytes is not None
                for rule in self.rules
            ),
        )

    def outcomes(self, setting: Setting) -> tuple[Outcome, ...]:
        """Every value ``setting`` can take for some message of this account, in rule order.

        Exact when the rules' message conditions are independent; otherwise it may
        list a value no real message gets (never the other way round).
        """
        out: list[Outcome] = []
        if self._can_end_without(setting, 0):
            out.append(Outcome(_default(setting), DEFAULT_RULE))
        for position, rule in enumerate(self.rules):
            if not rule.names(setting):
                continue
            if not rule.continues or self._can_end_without(setting, position + 1):
                out.append(Outcome(rule.setting(setting), rule.name))
        return tuple(out)

    def view(self, candidates: Sequence[Candidate], now: datetime) -> View:
        """Decide every candidate and number the visible ones (RFC 1939 §5).

        Raises ValueError if two candidates share an index, if ``now`` is not
        timezone-aware, or if a header rule applies and a candidate has no headers.
        """
        _require_aware(now, "now")
        indexes = list(map(_index, candidates))
        if len(set(indexes)) != len(indexes):
            raise ValueError("two candidates share an index")
        decisions = self._decide_alike(candidates, now)
        visible = sorted(compress(indexes, map(_visible, decisions)))
        return View(tuple(candidates), decisions, tuple(visible))

    def plan(
        self, view: View, marked: Set[int], retrieved: Set[int], now: datetime
    ) -> RetentionPlan:
        """What a QUIT at ``now`` does, given the messages the client marked and retrieved.

        ``marked`` (DELE, RFC 1939 §6) and ``retrieved`` (RETR) hold candidate indexes
        of visible messages. Deleted upstream: marked messages whose DELE deletes,
        retrieved ones under delete_after_retrieve, and every message past its
        ``expires_at`` (visible or not). Marked messages under keep are hidden for
        this user. Nothing else is touched. Raises ValueError for an index that is
        not a visible candidate, or a ``now`` that is not timezone-aware.
        """
        _require_aware(now, "now")
        shown = set(view.visible)
        stray = sorted((set(marked) | set(retrieved)) - shown)
        if stray:
            raise ValueError(f"marked or retrieved indexes not in the view: {stray[:10]}")
        delete: list[Planned] = []
        hide: list[Planned] = []
        touched = set(marked) | set(retrieved)
        # Only expiring, marked and retrieved messages can be planned: one pass picks
        # them, so a QUIT on a big listing sorts a few, not all.
        pairs = [
            (candidate, decision)
            for candidate, decision in zip(view.candidates, view.decisions, strict=True)
            if decision.expires_at is not None or candidate.index in touched
        ]
        pairs.sort(key=_by_index)
        for candidate, decision in pairs:
            index, uid = candidate.index, candidate.uid
            if decision.expires_at is not None and now > decision.expires_at:
                rule = decision.expire_rule or DEFAULT_RULE
                delete.append(Planned(index, uid, rule, Reason.EXPIRED))
            elif index in marked and decision.on_dele is OnDele.DELETE:
                delete.append(Planned(index, uid, decision.rule, Reason.DELETED))
            elif index in marked:
                hide.append(Planned(index, uid, decision.rule, Reason.HIDDEN))
            elif index in retrieved and decision.delete_after_retrieve:
                delete.append(Planned(index, uid, decision.rule, Reason.RETRIEVED))
        return RetentionPlan(tuple(delete), tuple(hide))

    def poll_plan(self, view: View, durable: Set[int], now: datetime) -> PollPlan:
        """What a gateway poll at ``now`` does, given the candidates already ``durable``.

        The same rules as a session, read for the provider side of a gateway source:
        a visible message not yet durable is fetched; one a hide or max_size_bytes
        rule hides is skipped (left upstream). A durable message is deleted upstream
        when it is past its ``expires_at``, or at once under delete and
        delete_after_retrieve (download and delete); under keep it stays. A message
        that is not durable is never deleted. ``durable`` holds candidate indexes.
        """
        _require_aware(now, "now")
        fetch: list[int] = []
        skip: list[Planned] = []
        delete: list[Planned] = []
        pairs = sorted(zip(view.candidates, view.decisions, strict=True), key=_by_index)
        for candidate, decision in pairs:
            index, uid = candidate.index, candidate.uid
            if index not in durable:
                if decision.visible:
                    fetch.append(index)
                else:
                    rule = decision.hidden_rule or decision.rule
                    skip.append(Planned(index, uid, rule, Reason.SKIPPED))
            elif decision.expires_at is not None and now > decision.expires_at:
                rule = decision.expire_rule or DEFAULT_RULE
                delete.append(Planned(index, uid, rule, Reason.EXPIRED))
            elif decision.action in (Action.DELETE, Action.DELETE_AFTER_RETRIEVE):
                delete.append(Planned(index, uid, decision.rule, Reason.FETCHED))
        return PollPlan(tuple(fetch), tuple(skip), tuple(delete))

    def _decide_alike(self, candidates: Sequence[Candidate], now: datetime) -> tuple[Decision, ...]:
        """``_decide`` for each candidate, computed once per kind of candidate: those
        equal in what the rules read (see ``reads_age``, ``reads_size``) and without
        headers get the same (immutable) Decision."""
        if not self.reads_age and not self.reads_size:
            hidden = list(map(_hidden, candidates))
            if all(map(is_, map(_headers, candidates), repeat(None))):
                # Two kinds at most (hidden for the user or not): each decided for
                # the first candidate of its kind, then looked up for all.
                by_hidden = {
                    flag: self._decide(candidates[hidden.index(flag)], now) for flag in set(hidden)
                }
                return tuple(map(by_hidden.__getitem__, hidden))
        return tuple(self._decide_each_kind(candidates, now))

    def _decide_each_kind(
        self, candidates: Sequence[Candidate], now: datetime
    ) -> Iterator[Decision]:
        decided: dict[tuple[datetime | None, int | None, bool], Decision] = {}
        for candidate in candidates:
            if candidate.headers is not None:
                yield self._decide(candidate, now)
                continue
            key = (
                candidate.first_seen if self.reads_age else None,
                candidate.size if self.reads_size else None,
                candidate.hidden,
            )
            decision = decided.get(key)
            if decision is None:
                decision = decided[key] = self._decide(candidate, now)
            yield decision

    def _decide(self, candidate: Candidate, now: datetime) -> Decision:
        age = max(now - candidate.first_seen, timedelta(0))
        action, action_rule = DEFAULT_ACTION, DEFAULT_RULE
        expire: tuple[int, str] | None = None
        size_limit: tuple[int, str] | None = None
        matched: list[str] = []
        for rule in self.rules:
            if not rule.match.matches_message(age, candidate.size, candidate.headers):
                continue
            matched.append(rule.name)
            # A later match replaces what an earlier continue rule set (docs/rules.md, Order).
            if rule.action is not None:
                action, action_rule = rule.action, rule.name
            if rule.expire_after_days is not None:
                expire = (rule.expire_after_days, rule.name)
            if rule.max_size_bytes is not None:
                size_limit = (rule.max_size_bytes, rule.name)
            if not rule.continues:
                break
        hidden: Hidden | None = None
        hidden_rule: str | None = None
        if candidate.hidden:
            hidden = Hidden.FOR_USER
        elif action is Action.HIDE:
            hidden, hidden_rule = Hidden.HIDE_RULE, action_rule
        elif size_limit is not None and candidate.size > size_limit[0]:
            hidden, hidden_rule = Hidden.TOO_LARGE, size_limit[1]
        return Decision(
            rule=action_rule,
            action=action,
            visible=hidden is None,
            on_dele=OnDele.HIDE if action in (Action.KEEP, Action.HIDE) else OnDele.DELETE,
            delete_after_retrieve=action is Action.DELETE_AFTER_RETRIEVE,
            expires_at=None if expire is None else candidate.first_seen + timedelta(days=expire[0]),
            expire_rule=None if expire is None else expire[1],
            hidden=hidden,
            hidden_rule=hidden_rule,
            matched=tuple(matched),
        )

    def _can_end_without(self, setting: Setting, start: int) -> bool:
        """Whether evaluation from ``rules[start]`` can end without a match naming ``setting``."""
        for rule in self.rules[start:]:
            if rule.names(setting):
                if not rule.match.per_message:
                    return False  # it matches every message and would name the setting
            elif not rule.continues:
                return True  # it can match and end evaluation
        return True

    def _expire(self) -> str:
        """The EXPIRE argument after login (RFC 2449 §6.7): the shortest retention that applies."""
        actions = {outcome.value for outcome in self.outcomes(Setting.ACTION)}
        if Action.DELETE_AFTER_RETRIEVE in actions:
            return EXPIRE_AT_QUIT
        days = [
            outcome.value
            for outcome in self.outcomes(Setting.EXPIRE_AFTER_DAYS)
            if isinstance(outcome.value, int)
        ]
        return str(min(days)) if days else EXPIRE_NEVER


@dataclass(frozen=True, slots=True)
class Policy:
    """Every loaded rule, in evaluation order (file name, then list order).

    ``accounts`` maps each configured local user to its upstream's name, or to None
    for a Maildir user (not subject to rules: EXPIRE NEVER, RFC 1939 DELE); it is
    what :meth:`expire_before_login` ranges over.
    """

    rules: tuple[Rule, ...] = ()
    accounts: Mapping[str, str | None] = field(
        default_factory=lambda: MappingProxyType({}), compare=False
    )
    _by_account: Mapping[tuple[str, str], AccountPolicy] = field(
        init=False, repr=False, compare=False
    )
    _expire_before_login: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.rules) > MAX_RULES:
            raise ValueError(f"at most {MAX_RULES} rules")
        names = [rule.name for rule in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        object.__setattr__(self, "accounts", MappingProxyType(dict(self.accounts)))
        by_account = {
            (user, upstream): self._account(user, upstream)
            for user, upstream in self.accounts.items()
            if upstream is not None
        }
        object.__setattr__(self, "_by_account", MappingProxyType(by_account))
        object.__setattr__(self, "_expire_before_login", self._before_login())

    @classmethod
    def empty(cls) -> Policy:
        """No rules: RFC 1939 DELE semantics for everyone, EXPIRE NEVER."""
        return cls()

    @property
    def rule_names(self) -> tuple[str, ...]:
        """Every rule's name, in order (metric labels; decisions may also say "default")."""
        return tuple(rule.name for rule in self.rules)

    def for_user(self, user: str, upstream: str) -> AccountPolicy:
        """The rules that can apply to local ``user`` on the upstream named ``upstream``."""
        known = self._by_account.get((user, upstream))
        return known if known is not None else self._account(user, upstream)

    def expire_before_login(self) -> str:
        """The CAPA EXPIRE argument before login (RFC 2449 §6.7).

        The value every configured user gets after login if they all get the same;
        otherwise the smallest of them followed by ``USER``, which tells the client
        to ask CAPA again after login.
        """
        return self._expire_before_login

    def _account(self, user: str, upstream: str) -> AccountPolicy:
        reachable: list[Rule] = []
        for rule in self.rules:
            if not rule.match.applies_to(user, upstream):
                continue
            reachable.append(rule)
            if not rule.continues and not rule.match.per_message:
                break
        return AccountPolicy(user, upstream, tuple(reachable))

    def _before_login(self) -> str:
        values = {
            EXPIRE_NEVER if upstream is None else self.for_user(user, upstream).expire
            for user, upstream in self.accounts.items()
        }
        if not values:
            return EXPIRE_NEVER
        if len(values) == 1:
            return values.pop()
        shortest = min(int(value) for value in values if value != EXPIRE_NEVER)
        return f"{shortest} {EXPIRE_VARIES}"


def _default(setting: Setting) -> Action | None:
    return DEFAULT_ACTION if setting is Setting.ACTION else None


def _by_index(pair: tuple[Candidate, Decision]) -> int:
    return pair[0].index


def _require_aware(moment: datetime, what: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")
