"""The PostgreSQL store's proxy-mode facts: per upstream account and UIDL, its first-
and last-seen times and size, each local user's retrievals and hides, and its
deletion upstream (``facts`` at login, ``record`` at QUIT, ``messages`` and
``prune`` for ``popproxy state``).

Concurrency. Transactions run at READ COMMITTED. ``record`` first upserts its
account row and so holds that row's lock until it commits: the records of one
account (from any process) apply one after another, those of different accounts
in parallel. ``prune`` deletes in batches and re-checks each row against the
committed listing it would remove (so a record that lists a UIDL again wins).
``messages`` reads one REPEATABLE READ snapshot.

A UIDL listed with a size other than the stored one is new content under a reused
UIDL (RFC 1939 §7): the store forgets the old content's history
(``checks.split_listing``); the audit log (``audit.py``) keeps every hide and
upstream deletion with the size it applied to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from popproxy.state.base import (
    AccountKey,
    MessageFacts,
    SessionRecord,
    StateError,
    StoredMessage,
)
from popproxy.state.checks import (
    MAX_LISTED_MESSAGES,
    PRUNE_BATCH,
    session_audit,
    split_listing,
)
from popproxy.state.postgres.audit import append_audit
from popproxy.state.postgres.nonblocking import as_text, text_array
from popproxy.state.postgres.sql import maybe_utc, utc
from popproxy.state.rows import stored_messages

# Whether libpq has pipeline mode (14 and later; psycopg-binary brings its own). Without
# it a record sends the same statements one round trip each.
PIPELINE = psycopg.Pipeline.is_supported()


def facts(
    conn: psycopg.Connection[Any], account: AccountKey, user: str, uids: list[str]
) -> dict[str, MessageFacts]:
    rows = conn.execute(  # one statement: one snapshot
        "SELECT m.uid, m.size, m.first_seen, m.last_seen, r.at, h.local_user IS NOT NULL,"
        " m.deleted_upstream_at FROM accounts AS a JOIN messages AS m ON m.account_id = a.id"
        " LEFT JOIN retrievals AS r ON r.message_id = m.id AND r.local_user = %(user)s"
        " LEFT JOIN hides AS h ON h.message_id = m.id AND h.local_user = %(user)s"
        " WHERE a.upstream = %(upstream)s AND a.upstream_user = %(upstream_user)s"
        " AND m.uid = ANY(%(uids)s::text[])",
        {
            "user": user,
            "upstream": account.upstream,
            "upstream_user": account.upstream_user,
            "uids": uids,
        },
    )
    return {
        uid: MessageFacts(
            uid=uid,
            size=size,
            first_seen=utc(first),
            last_seen=utc(last),
            retrieved_at=maybe_utc(retrieved),
            hidden=hidden,
            deleted_upstream_at=maybe_utc(deleted),
        )
        for uid, size, first, last, retrieved, hidden, deleted in rows
    }


# ``facts`` as one statement of text in and out, for ``nonblocking.Statements``: the
# times as whole microseconds since the epoch (exact, and read without a parser).
FACTS_STATEMENT = (
    "SELECT m.uid, m.size, (extract(epoch FROM m.first_seen) * 1000000)::bigint,"
    " (extract(epoch FROM m.last_seen) * 1000000)::bigint,"
    " (extract(epoch FROM r.at) * 1000000)::bigint, h.local_user IS NOT NULL,"
    " (extract(epoch FROM m.deleted_upstream_at) * 1000000)::bigint"
    " FROM accounts AS a JOIN messages AS m ON m.account_id = a.id"
    " LEFT JOIN retrievals AS r ON r.message_id = m.id AND r.local_user = $1::text"
    " LEFT JOIN hides AS h ON h.message_id = m.id AND h.local_user = $1::text"
    " WHERE a.upstream = $2::text AND a.upstream_user = $3::text"
    " AND m.uid = ANY($4::text[])"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def facts_parameters(account: AccountKey, user: str, uids: list[str]) -> tuple[str, ...]:
    """The parameters of ``FACTS_STATEMENT``."""
    return (user, account.upstream, account.upstream_user, text_array(uids))


def facts_from_text(rows: Iterable[Sequence[bytes | None]]) -> dict[str, MessageFacts]:
    """``FACTS_STATEMENT``'s rows as ``facts`` gives them."""
    facts: dict[str, MessageFacts] = {}
    for raw_uid, size, first, last, retrieved, hidden, deleted in rows:
        uid = as_text(raw_uid)
        facts[uid] = MessageFacts(
            uid=uid,
            size=int(as_text(size)),
            first_seen=_at(first),
            last_seen=_at(last),
            retrieved_at=None if retrieved is None else _at(retrieved),
            hidden=hidden == b"t",
            deleted_upstream_at=None if deleted is None else _at(deleted),
        )
    return facts


def _at(micros: bytes | None) -> datetime:
    """A time sent as whole microseconds since the epoch (``int`` reads the octets)."""
    if micros is None:
        raise ValueError("unexpected NULL")
    return _EPOCH + timedelta(microseconds=int(micros))


def record_session(conn: psycopg.Connection[Any], record: SessionRecord) -> None:
    """What one QUIT did, in one transaction, in two flights of pipelined statements
    (psycopg's pipeline mode): the account's upsert with the read of its stored
    listing, then every write and the ``COMMIT``; a statement with nothing to write is
    not sent. Two round trips, whatever the session did (without pipeline mode,
    ``PIPELINE``, one a statement)."""
    at = record.at
    sizes = {m.uid: m.size for m in record.seen}
    account = record.account
    pipeline = conn.pipeline() if PIPELINE else contextlib.nullcontext()
    with pipeline, conn.transaction():
        # Creates the account or moves its last listing, and holds its row lock until
        # COMMIT: records of one account apply one after another. The read after it
        # is a statement of its own, so its snapshot comes after that lock is held
        # (READ COMMITTED): it sees the rows of the record that held it before.
        upserted = conn.execute(
            "INSERT INTO accounts (upstream, upstream_user, last_listed) VALUES (%s, %s, %s)"
            " ON CONFLICT (upstream, upstream_user) DO UPDATE"
            " SET last_listed = greatest(accounts.last_listed, excluded.last_listed)"
            " RETURNING id",
            (account.upstream, account.upstream_user, at),
        )
        listed = conn.execute(
            "SELECT m.uid, m.size, m.last_seen > %s FROM accounts AS a"
            " JOIN messages AS m ON m.account_id = a.id"
            " WHERE a.upstream = %s AND a.upstream_user = %s AND m.uid = ANY(%s::text[])",
            (at, account.upstream, account.upstream_user, list(sizes)),
        )
        row = upserted.fetchone()
        assert row is not None  # RETURNING of an upsert always has its row
        account_id = int(row[0])
        stored = {uid: (size, later) for uid, size, later in listed.fetchall()}
        stale = _apply_listing(conn, account_id, sizes, at, stored)
        current = set(sizes) - stale
        who = {"user": record.user, "at": at, "session": record.session_id, "account": account_id}
        retrieved = sorted(record.retrieved & current)
        if retrieved:
            conn.execute(
                "INSERT INTO retrievals (message_id, local_user, at, session_id)"
                " SELECT id, %(user)s, %(at)s, %(session)s FROM messages"
                " WHERE account_id = %(account)s AND uid = ANY(%(uids)s::text[])"
                " ON CONFLICT DO NOTHING",  # the first complete RETR is the one kept
                {**who, "uids": retrieved},
            )
        hidden: dict[str, str] = {}
        for d in record.hidden:
            if d.uid in current:
                hidden.setdefault(d.uid, d.rule)  # as sqlite: the first hide of a UIDL wins
        if hidden:
            conn.execute(
                "INSERT INTO hides (message_id, local_user, at, session_id, rule)"
                " SELECT m.id, %(user)s, %(at)s, %(session)s, t.rule"
                " FROM unnest(%(uids)s::text[], %(rules)s::text[]) AS t (uid, rule)"
                " JOIN messages AS m ON m.account_id = %(account)s AND m.uid = t.uid"
                " ON CONFLICT DO NOTHING",  # hidden for good since the first hide
                {**who, "uids": list(hidden), "rules": list(hidden.values())},
            )
        deleted = {d.uid: d.rule for d in record.deleted_upstream if d.uid in current}
        if deleted:
            conn.execute(
                "UPDATE messages AS m SET deleted_upstream_at = %(at)s,"
                " deleted_session_id = %(session)s, deleted_by_rule = t.rule"
                " FROM unnest(%(uids)s::text[], %(rules)s::text[]) AS t (uid, rule)"
                " WHERE m.account_id = %(account)s AND m.uid = t.uid",
                {**who, "uids": list(deleted), "rules": list(deleted.values())},
            )
        append_audit(conn, session_audit(record, sizes), account_ids={account: account_id})


def _apply_listing(
    conn: psycopg.Connection[Any],
    account_id: int,
    sizes: Mapping[str, int],
    at: datetime,
    stored: Mapping[str, tuple[int, bool]],
) -> set[str]:
    """Upsert the session's listing, given the ``stored`` (size, seen later than ``at``)
    of its UIDLs the store knows; return the UIDLs whose stored content is newer
    (``checks.split_listing``). Same size: ``first_seen`` takes the earlier,
    ``last_seen`` the later time (so commits out of order agree)."""
    stale, reused = split_listing(sizes, stored)
    if reused:
        conn.execute(
            "DELETE FROM messages WHERE account_id = %s AND uid = ANY(%s::text[])",
            (account_id, reused),
        )
    kept = [uid for uid in sizes if uid not in stale]
    if kept:
        conn.execute(
            "INSERT INTO messages (account_id, uid, size, first_seen, last_seen)"
            " SELECT %(account)s, t.uid, t.size, %(at)s, %(at)s"
            " FROM unnest(%(uids)s::text[], %(sizes)s::bigint[]) AS t (uid, size)"
            " ON CONFLICT (account_id, uid) DO UPDATE SET"
            " first_seen = least(messages.first_seen, excluded.first_seen),"
            " last_seen = greatest(messages.last_seen, excluded.last_seen)",
            {"account": account_id, "at": at, "uids": kept, "sizes": [sizes[uid] for uid in kept]},
        )
    return stale


def messages(conn: psycopg.Connection[Any], account: AccountKey | None) -> list[StoredMessage]:
    where = ""
    args: tuple[str, ...] = ()
    if account is not None:
        where = " WHERE a.upstream = %s AND a.upstream_user = %s"
        args = (account.upstream, account.upstream_user)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        rows = conn.execute(
            "SELECT m.id, a.upstream, a.upstream_user, m.uid, m.size, m.first_seen,"
            " m.last_seen, m.deleted_upstream_at, m.deleted_by_rule, a.last_listed"
            " FROM messages AS m JOIN accounts AS a ON a.id = m.account_id"
            f"{where} ORDER BY a.upstream, a.upstream_user, m.first_seen, m.uid LIMIT %s",
            (*args, MAX_LISTED_MESSAGES + 1),
        ).fetchall()
        if len(rows) > MAX_LISTED_MESSAGES:
            raise StateError(
                f"more than {MAX_LISTED_MESSAGES} stored messages; show one account at a time"
            )
        join = (
            " JOIN messages AS m ON m.id = x.message_id JOIN accounts AS a ON a.id = m.account_id"
        )
        return stored_messages(
            rows,
            conn.execute(
                f"SELECT x.message_id, x.local_user, x.at FROM retrievals AS x{join}{where}"
                " ORDER BY x.at, x.local_user",
                args,
            ),
            conn.execute(
                f"SELECT x.message_id, x.local_user, x.rule, x.at FROM hides AS x{join}{where}"
                " ORDER BY x.at, x.local_user",
                args,
            ),
            utc,
        )


def prune_batch(conn: psycopg.Connection[Any], cutoff: datetime) -> int:
    with conn.transaction():
        # The SQL form of StoredMessage.is_gone, stated twice: once to pick the batch,
        # once on the joined rows, which PostgreSQL re-checks against a row a concurrent
        # record changed (a UIDL listed again is no longer gone and stays).
        cursor = conn.execute(
            "DELETE FROM messages AS m USING accounts AS a"
            " WHERE m.id IN (SELECT m2.id FROM messages AS m2"
            " JOIN accounts AS a2 ON a2.id = m2.account_id"
            " WHERE m2.last_seen < %(cutoff)s AND m2.last_seen < a2.last_listed LIMIT %(batch)s)"
            " AND a.id = m.account_id AND m.last_seen < %(cutoff)s"
            " AND m.last_seen < a.last_listed",
            {"cutoff": cutoff, "batch": PRUNE_BATCH},
        )
        deleted = cursor.rowcount
        # The gateway's rows the same way; a staged row is never forgotten (its file
        # is still to be settled by the next poll).
        cursor = conn.execute(
            "DELETE FROM gateway_messages AS m USING gateway_sources AS s"
            " WHERE (m.source_id, m.uid) IN (SELECT m2.source_id, m2.uid"
            " FROM gateway_messages AS m2 JOIN gateway_sources AS s2 ON s2.id = m2.source_id"
            " WHERE m2.last_seen < %(cutoff)s AND m2.last_seen < s2.last_listed"
            " AND m2.state != 'staged' LIMIT %(batch)s)"
            " AND s.id = m.source_id AND m.last_seen < %(cutoff)s"
            " AND m.last_seen < s.last_listed AND m.state != 'staged'",
            {"cutoff": cutoff, "batch": max(0, PRUNE_BATCH - deleted)},
        )
        return deleted + cursor.rowcount
