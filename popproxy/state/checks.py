"""What every state backend checks and decides the same way, before and beside its SQL.

The bounds on what one call may carry, the refusal of a record no session could
have made (a caller's bug: ``ValueError``, before any thread or transaction), the
rule for a UIDL listed again with another size (new content under a reused UIDL,
RFC 1939 §7), and the audit rows a QUIT or a poll's deletions add. Both backends
(``sqlite/``, ``postgres/``) use it, so the two refuse and decide alike
(tests/state runs one contract suite on both).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from operator import attrgetter

from popproxy.metrics import MAX_NAME_CHARS
from popproxy.pop3.limits import MAX_UIDL_OCTETS
from popproxy.state.base import (
    MAX_AUDIT_ROWS,
    AccountKey,
    AuditAction,
    AuditEntry,
    AuditQuery,
    Disposal,
    SeenMessage,
    SessionRecord,
    SourceKey,
)

# The most UIDLs one ``record`` or ``facts`` call may carry: one session's listing,
# bounded by popproxy.pop3.client_replies.MAX_UPSTREAM_MESSAGES (tests/state keeps
# the two equal).
MAX_RECORD_MESSAGES = 200_000
# The most rows ``messages`` returns (``popproxy state show``): more than two full
# listings is a whole instance's store, to be shown one account at a time.
MAX_LISTED_MESSAGES = 2 * MAX_RECORD_MESSAGES
# Rows ``prune`` deletes per transaction, so a prune never holds the write lock (or,
# on PostgreSQL, its row locks) for longer than a session's commit would wait.
PRUNE_BATCH = 2000
# A local user name, as config.MAX_USER_NAME_OCTETS allows (RFC 2449 §4 USER line).
MAX_USER_OCTETS = 248
# A rule or upstream name is a metrics label value (popproxy.metrics.MAX_NAME_CHARS);
# an upstream user is a login name (RFC 2449 §4).
MAX_RULE_CHARS = MAX_NAME_CHARS
MAX_UPSTREAM_CHARS = MAX_NAME_CHARS
# A session id is a short token from session.py (8 hex digits today); this is slack.
MAX_SESSION_ID_CHARS = 64


def check_text(what: str, value: str, limit: int, *, octets: bool = True) -> None:
    """Refuse an empty or too long name, a NUL (PostgreSQL text cannot hold one) or a
    lone surrogate (not UTF-8)."""
    size = len(value.encode("utf-8")) if octets else len(value)
    if not 0 < size <= limit:
        raise ValueError(f"{what} must be 1-{limit} {'octets' if octets else 'characters'}")
    if "\0" in value:
        raise ValueError(f"{what} must not contain NUL")
    if not octets:
        value.encode("utf-8")  # raises UnicodeEncodeError, a ValueError


def check_account(account: AccountKey) -> None:
    """Refuse an account key no config could name."""
    check_text("upstream", account.upstream, MAX_UPSTREAM_CHARS, octets=False)
    check_text("upstream_user", account.upstream_user, MAX_USER_OCTETS)


def check_source(source: SourceKey) -> None:
    """Refuse a gateway source key no config could name."""
    check_text("user", source.user, MAX_USER_OCTETS)
    check_account(AccountKey(source.upstream, source.upstream_user))


def check_listing(listing: Sequence[SeenMessage]) -> None:
    """Refuse a gateway listing that no upstream could have sent (a caller's bug)."""
    if len(listing) > MAX_RECORD_MESSAGES:
        raise ValueError(f"at most {MAX_RECORD_MESSAGES} listed messages per call")
    _rows_checked(listing, "listing")


def _rows_checked(listing: Sequence[SeenMessage], where: str) -> set[str]:
    """The UIDLs of ``listing``, checked row by row; the first wrong row raises
    ValueError saying what is wrong with it (``where``: a listing or a record)."""
    listed: set[str] = set()
    for message in listing:
        check_text("a UIDL", message.uid, MAX_UIDL_OCTETS)
        if message.uid in listed:
            raise ValueError(f"a UIDL is listed twice in one {where}")
        if message.size < 0:
            raise ValueError("a message size must not be negative")
        listed.add(message.uid)
    return listed


def check_uids(uids: list[str]) -> None:
    """Refuse a ``facts`` call beyond one listing."""
    if len(uids) > MAX_RECORD_MESSAGES:
        raise ValueError(f"at most {MAX_RECORD_MESSAGES} UIDLs per call")


def check_record(record: SessionRecord) -> None:
    """Refuse a record that cannot be what a session saw (a caller's bug: ValueError)."""
    check_account(record.account)
    check_text("user", record.user, MAX_USER_OCTETS)
    check_text("session_id", record.session_id, MAX_SESSION_ID_CHARS, octets=False)
    check_aware(record.at)
    if len(record.seen) > MAX_RECORD_MESSAGES:
        raise ValueError(f"at most {MAX_RECORD_MESSAGES} listed messages per record")
    listed = _plain_listing(record.seen)
    if listed is None:  # some row is wrong: find the first, and say what is wrong with it
        listed = _rows_checked(record.seen, "record")
    disposed: list[Disposal] = [*record.hidden, *record.deleted_upstream]
    if not record.retrieved <= listed or any(d.uid not in listed for d in disposed):
        raise ValueError("a retrieved, hidden or deleted UIDL must be in the record's listing")
    for disposal in disposed:
        check_text("a rule name", disposal.rule, MAX_RULE_CHARS, octets=False)


def _plain_listing(seen: Sequence[SeenMessage]) -> set[str] | None:
    """The UIDLs of ``seen`` if every row passes ``check_record``'s row checks, checked
    over the whole listing at once (a QUIT may record 100,000 rows): ASCII UIDLs of 1
    to ``MAX_UIDL_OCTETS`` octets without NUL, each once, sizes not negative. None
    if some row may fail (those checks then run row by row)."""
    if not seen:
        return set()
    uids = list(map(_uid, seen))
    joined = "".join(uids)
    listed = set(uids)
    if (
        joined.isascii()  # then a UIDL's octets are its characters
        and "\0" not in joined
        and len(listed) == len(uids)
        and min(map(len, uids)) > 0
        and max(map(len, uids)) <= MAX_UIDL_OCTETS
        and min(map(_size, seen)) >= 0
    ):
        return listed
    return None


_uid = attrgetter("uid")
_size = attrgetter("size")


def check_audit_query(query: AuditQuery) -> None:
    """Refuse an audit query no config could name, or beyond ``MAX_AUDIT_ROWS`` rows."""
    if not 1 <= query.limit <= MAX_AUDIT_ROWS:
        raise ValueError(f"an audit query returns 1-{MAX_AUDIT_ROWS} rows")
    if query.user is not None:
        check_text("user", query.user, MAX_USER_OCTETS)
    if query.upstream is not None:
        check_text("upstream", query.upstream, MAX_UPSTREAM_CHARS, octets=False)
    if query.rule is not None:
        check_text("a rule name", query.rule, MAX_RULE_CHARS, octets=False)
    if query.uid is not None:
        check_text("a UIDL", query.uid, MAX_UIDL_OCTETS)
    if query.since is not None:
        check_aware(query.since)


def check_disposals(disposals: Sequence[Disposal], session_id: str) -> None:
    """Refuse a gateway poll's deletions no poll could report (a caller's bug)."""
    check_text("session_id", session_id, MAX_SESSION_ID_CHARS, octets=False)
    if len(disposals) > MAX_RECORD_MESSAGES:
        raise ValueError(f"at most {MAX_RECORD_MESSAGES} deletions per call")
    for disposal in disposals:
        check_text("a UIDL", disposal.uid, MAX_UIDL_OCTETS)
        check_text("a rule name", disposal.rule, MAX_RULE_CHARS, octets=False)


def session_audit(record: SessionRecord, sizes: Mapping[str, int]) -> list[AuditEntry]:
    """The audit rows of what one QUIT did: its hides, then its upstream deletions, each
    with the listed size (``sizes``: the record's listing) of the content it applied to."""
    return [
        AuditEntry(
            at=record.at,
            session_id=record.session_id,
            user=record.user,
            account=record.account,
            uid=d.uid,
            size=sizes[d.uid],
            rule=d.rule,
            action=action,
        )
        for action, items in (
            (AuditAction.HIDE, record.hidden),
            (AuditAction.DELETE_UPSTREAM, record.deleted_upstream),
        )
        for d in items
    ]


def gateway_audit(
    source: SourceKey,
    deleted: Sequence[Disposal],
    sizes: Mapping[str, int],
    at: datetime,
    session_id: str,
) -> list[AuditEntry]:
    """The audit rows of a gateway poll's upstream deletions: one per deleted UIDL the
    store knows for ``source`` (``sizes``), under the poll's id, for the source's user."""
    account = AccountKey(source.upstream, source.upstream_user)
    return [
        AuditEntry(
            at=at,
            session_id=session_id,
            user=source.user,
            account=account,
            uid=d.uid,
            size=sizes[d.uid],
            rule=d.rule,
            action=AuditAction.DELETE_UPSTREAM,
        )
        for d in deleted
        if d.uid in sizes
    ]


# How long after a listing was written out a QUIT of the same listing may leave its
# times unwritten (either backend's unchanged.py): far below a day, the unit of
# `state prune --gone-days` and of every retention window.
LISTING_REFRESH_SECONDS = 3600


def listing_digest(seen: Iterable[tuple[str, int]]) -> bytes:
    """What names one listing (UIDLs, sizes and their order): equal listings, equal digests.

    The text of ``"".join(f"{uid}\0{size}\n" for uid, size in seen)``, each line
    formatted in C from the (uid, size) pair a SeenMessage is (a QUIT may record
    100,000)."""
    text = "".join(map("%s\0%d\n".__mod__, seen))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def check_aware(when: datetime) -> None:
    """Refuse a naive time: the store keeps UTC, and a naive time has no offset to convert."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("state store times must be timezone-aware")


def split_listing(
    sizes: Mapping[str, int], stored: Mapping[str, tuple[int, bool]]
) -> tuple[set[str], list[str]]:
    """Which UIDLs of a session's listing hold content the store must not touch, and
    which are new content under a reused UIDL.

    ``sizes`` is the listing (UIDL -> size); ``stored`` the store's rows for those
    UIDLs (UIDL -> (size, last seen later than this record)). Same size: the same
    message. Other size: new content, which replaces the stored row and its history
    (returned second, in listing order) unless the store saw the other content
    later than this record; such *stale* UIDLs are returned first and left alone,
    so a commit that arrives late neither resurrects old content nor hides new.
    """
    stale: set[str] = set()
    reused: list[str] = []
    for uid, size in sizes.items():
        known = stored.get(uid)
        if known is None or known[0] == size:
            continue
        if known[1]:
            stale.add(uid)
        else:
            reused.append(uid)
    return stale, reused


# A client address key (PeerAddress.limit_key): an IPv4 address, or an IPv6 /64 in
# CIDR form (at most 43 characters); this is slack.
MAX_SOURCE_CHARS = 64
# The most known sources a store keeps per user (limits.auth_known_sources_per_user
# is bounded by this).
MAX_KNOWN_SOURCES = 1000


def check_login_source(user: str, source: str, keep: int | None = None) -> None:
    """Refuse a known-source call no session could make (a caller's bug)."""
    check_text("user", user, MAX_USER_OCTETS)
    check_text("source", source, MAX_SOURCE_CHARS, octets=False)
    if keep is not None and not 1 <= keep <= MAX_KNOWN_SOURCES:
        raise ValueError(f"keep must be 1-{MAX_KNOWN_SOURCES}")
