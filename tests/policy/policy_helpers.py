"""Builders for policy tests: rules, candidates and a fixed clock."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from popproxy.policy import Action, Candidate, HeaderMatch, Headers, Match, Rule
from popproxy.policy.patterns import header_pattern

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def rule(
    name: str,
    *,
    action: Action | None = None,
    expire: int | None = None,
    max_size: int | None = None,
    continues: bool = False,
    users: Iterable[str] = (),
    upstreams: Iterable[str] = (),
    older: int | None = None,
    newer: int | None = None,
    larger: int | None = None,
    smaller: int | None = None,
    headers: dict[str, str] | None = None,
) -> Rule:
    """A rule; with no setting given it is a delete rule."""
    if action is None and expire is None and max_size is None:
        action = Action.DELETE
    return Rule(
        name=name,
        match=Match(
            users=tuple(users),
            upstreams=tuple(upstreams),
            older_than_days=older,
            newer_than_days=newer,
            larger_than_bytes=larger,
            smaller_than_bytes=smaller,
            headers=tuple(
                HeaderMatch(field.lower(), header_pattern(pattern))
                for field, pattern in (headers or {}).items()
            ),
        ),
        action=action,
        expire_after_days=expire,
        max_size_bytes=max_size,
        continues=continues,
        source="test.yaml",
    )


def candidate(
    index: int,
    *,
    days_old: float = 0,
    size: int = 1000,
    hidden: bool = False,
    headers: dict[str, str] | None = None,
) -> Candidate:
    """Message ``index`` (uid "u<index>"), first seen ``days_old`` days before NOW."""
    return Candidate(
        index=index,
        uid=f"u{index}",
        size=size,
        first_seen=NOW - timedelta(days=days_old),
        hidden=hidden,
        headers=None if headers is None else Headers({k: [v] for k, v in headers.items()}),
    )
