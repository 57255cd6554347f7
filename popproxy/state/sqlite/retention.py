"""The sqlite store's proxy-mode facts: per upstream account and UIDL, its first- and
last-seen times and size, each local user's retrievals and hides, and its deletion
upstream (``facts`` at login, ``record`` at QUIT, ``messages`` and ``prune`` for
``popproxy state``).

Lazy last_seen: a QUIT whose listing equals the account's latest one (same
``listing_digest``) writes no message row, only the account's ``last_listed``; a
row with ``last_seen >= listing_since`` is in the latest listing and counts as
seen at ``last_listed`` (docs/state.md, "Only what changed").

A UIDL listed with a size other than the stored one is new content under a reused
UIDL (RFC 1939 §7 lets a server reuse a unique-id once the old message is gone):
the store forgets the old content's first-seen time, retrievals, hides and
upstream deletion, so no old history can hide or expire the new message. The
audit log (``audit.py``) keeps every hide and upstream deletion with the size it
applied to, across reuse and pruning.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    listing_digest,
    session_audit,
    split_listing,
)
from popproxy.state.rows import stored_messages
from popproxy.state.sqlite.audit import append_audit
from popproxy.state.sqlite.sql import (
    QUERY_CHUNK,
    chunks,
    from_utc_text,
    lookup_account,
    marks,
    maybe_from_utc_text,
    transaction,
    utc_text,
)

if TYPE_CHECKING:
    from popproxy.state.sqlite.unchanged import CatchUp

# From this many UIDLs on, facts and record read all of the account's rows in one scan
# and pick the wanted ones here, instead of one ``IN (...)`` query per QUERY_CHUNK.
WHOLE_ACCOUNT_FROM = 8 * QUERY_CHUNK
# The last_seen of a message row in SQL (lazy last_seen, see ``record_session``).
EFFECTIVE_LAST_SEEN = (
    "CASE WHEN m.last_seen >= a.listing_since THEN a.last_listed ELSE m.last_seen END"
)


def _account_row(
    conn: sqlite3.Connection, account: AccountKey
) -> tuple[int, str | None, str | None, bytes | None] | None:
    """(id, last_listed, listing_since, listing_digest) of ``account``, None if unknown."""
    row = conn.execute(
        "SELECT id, last_listed, listing_since, listing_digest FROM accounts"
        " WHERE upstream = ? AND upstream_user = ?",
        (account.upstream, account.upstream_user),
    ).fetchone()
    return None if row is None else (int(row[0]), row[1], row[2], row[3])


def _effective_last_seen(last_seen: str, last_listed: str | None, since: str | None) -> str:
    """A row in the account's latest listing was last seen when that listing was."""
    if since is not None and last_listed is not None and last_seen >= since:
        return last_listed
    return last_seen


def _whole_account(wanted: int) -> bool:
    """Whether one scan of the account's rows beats ``wanted`` UIDLs in chunks."""
    return wanted > WHOLE_ACCOUNT_FROM


def facts(
    conn: sqlite3.Connection, account: AccountKey, user: str, uids: Sequence[str]
) -> dict[str, MessageFacts]:
    out: dict[str, MessageFacts] = {}
    with transaction(conn, write=False):  # one snapshot for every chunk
        known = _account_row(conn, account)
        if known is None:
            return out
        account_id, last_listed, since, _ = known
        select = (
            "SELECT m.uid, m.size, m.first_seen, m.last_seen, r.at, h.user IS NOT NULL,"
            " m.deleted_upstream_at FROM messages AS m"
            " LEFT JOIN retrievals AS r ON r.message_id = m.id AND r.user = ?"
            " LEFT JOIN hides AS h ON h.message_id = m.id AND h.user = ?"
            " WHERE m.account_id = ?"
        )
        if _whole_account(len(uids)):  # a big listing: one scan, filtered here
            wanted = set(uids)
            batches: Iterator[Iterable[tuple[Any, ...]]] = iter(
                [conn.execute(select, (user, user, account_id))]
            )
        else:
            wanted = None
            batches = (
                conn.execute(
                    f"{select} AND m.uid IN ({marks(len(chunk))})",
                    (user, user, account_id, *chunk),
                )
                for chunk in chunks(uids)
            )
        for rows in batches:
            for uid, size, first, last, retrieved, hidden, deleted in rows:
                if wanted is not None and uid not in wanted:
                    continue
                out[uid] = MessageFacts(
                    uid=uid,
                    size=size,
                    first_seen=from_utc_text(first),
                    last_seen=from_utc_text(_effective_last_seen(last, last_listed, since)),
                    retrieved_at=maybe_from_utc_text(retrieved),
                    hidden=bool(hidden),
                    deleted_upstream_at=maybe_from_utc_text(deleted),
                )
    return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """One record of a batch: its error text, or the digest of the listing it made
    the account's latest (None for a late record, which leaves the latest alone)."""

    error: str | None
    latest: bytes | None


def record_batch(
    conn: sqlite3.Connection,
    records: Sequence[SessionRecord],
    catch_ups: Sequence[CatchUp] = (),
) -> list[Outcome]:
    """Write ``records`` in one transaction (one fsync), each inside a savepoint so that
    one failing record leaves the others; returns each record's ``Outcome``. First
    the ``catch_ups``: QUITs answered without a write (``unchanged.py``) move their
    account's ``last_listed`` if it still has their listing. If the COMMIT fails,
    sqlite3.Error propagates and none of it is stored."""
    outcomes: list[Outcome] = []
    with transaction(conn, write=True):
        if catch_ups:
            conn.executemany(
                "UPDATE accounts SET last_listed = ?"
                " WHERE upstream = ? AND upstream_user = ? AND listing_digest = ?"
                " AND last_listed < ?",
                [
                    (at, c.account.upstream, c.account.upstream_user, c.digest, at)
                    for c in catch_ups
                    for at in (utc_text(c.at),)
                ],
            )
        for record in records:
            conn.execute("SAVEPOINT one_record")
            try:
                latest = record_session(conn, record)
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK TO one_record")
                outcomes.append(Outcome(str(exc), None))
            else:
                outcomes.append(Outcome(None, latest))
            conn.execute("RELEASE one_record")
    return outcomes


def record_session(conn: sqlite3.Connection, record: SessionRecord) -> bytes | None:
    """What one QUIT changes, inside the caller's transaction; returns the digest of
    the account's latest listing when this record is (or stays) it, None for a late one.

    Lazy last_seen: a listing equal to the account's latest (same digest) writes no
    message row, only accounts.last_listed; a different one is written out whole and
    becomes the latest (listing_since). A record older than the latest listing (a
    late commit from another process) is applied row by row as before and leaves the
    latest listing alone.
    """
    at = utc_text(record.at)
    sizes = {m.uid: m.size for m in record.seen}
    digest = listing_digest(record.seen)
    known = _account_row(conn, record.account)
    if known is None:
        cursor = conn.execute(
            "INSERT INTO accounts (upstream, upstream_user) VALUES (?, ?)",
            (record.account.upstream, record.account.upstream_user),
        )
        assert cursor.lastrowid is not None  # an INSERT always sets it
        known = (cursor.lastrowid, None, None, None)
    account_id, last_listed, since, stored_digest = known
    newest = last_listed is None or at >= last_listed
    if newest and stored_digest == digest:
        stale: set[str] = set()  # the same listing: every row is current, none rewritten
        conn.execute("UPDATE accounts SET last_listed = ? WHERE id = ?", (at, account_id))
    else:
        if since is not None and last_listed is not None and since < last_listed:
            # The latest listing's rows were last seen at last_listed, not at their
            # stored last_seen: write that out first, so that a row this record does
            # not list keeps its true last_seen and one only this (late) record lists
            # is not taken for a row of the latest listing.
            conn.execute(
                "UPDATE messages SET last_seen = ?"
                " WHERE account_id = ? AND last_seen >= ? AND last_seen < ?",
                (last_listed, account_id, since, last_listed),
            )
            conn.execute(
                "UPDATE accounts SET listing_since = last_listed WHERE id = ?", (account_id,)
            )
            since = last_listed
        stale = _apply_listing(conn, account_id, sizes, at, last_listed=last_listed, since=since)
        if newest:
            conn.execute(
                "UPDATE accounts SET last_listed = ?, listing_since = ?, listing_digest = ?"
                " WHERE id = ?",
                (at, at, digest, account_id),
            )
    current = set(sizes) - stale
    who = (record.user, at, record.session_id)
    if record.retrieved:
        conn.executemany(
            "INSERT INTO retrievals (message_id, user, at, session_id)"
            " SELECT id, ?, ?, ? FROM messages WHERE account_id = ? AND uid = ?"
            " ON CONFLICT DO NOTHING",  # the first complete RETR is the one kept
            [(*who, account_id, uid) for uid in sorted(record.retrieved & current)],
        )
    if record.hidden:
        conn.executemany(
            "INSERT INTO hides (message_id, user, at, session_id, rule)"
            " SELECT id, ?, ?, ?, ? FROM messages WHERE account_id = ? AND uid = ?"
            " ON CONFLICT DO NOTHING",  # hidden for good since the first hide
            [(*who, d.rule, account_id, d.uid) for d in record.hidden if d.uid in current],
        )
    if record.deleted_upstream:
        conn.executemany(
            "UPDATE messages SET deleted_upstream_at = ?, deleted_session_id = ?,"
            " deleted_by_rule = ? WHERE account_id = ? AND uid = ?",
            [
                (at, record.session_id, d.rule, account_id, d.uid)
                for d in record.deleted_upstream
                if d.uid in current
            ],
        )
    if record.hidden or record.deleted_upstream:
        append_audit(conn, session_audit(record, sizes))
    return digest if newest else None


def _apply_listing(
    conn: sqlite3.Connection,
    account_id: int,
    sizes: Mapping[str, int],
    at: str,
    *,
    last_listed: str | None,
    since: str | None,
) -> set[str]:
    """Upsert the session's listing; return the UIDLs whose stored content is newer.

    Same size: ``first_seen`` takes the earlier, ``last_seen`` the later time (so
    commits out of order agree). Other size: new content under a reused UIDL, which
    replaces the stored row (and its history) unless the store saw the other content
    later than ``at``; such stale UIDLs are returned and left alone. A row of the
    latest listing counts as seen at ``last_listed`` (lazy last_seen).
    """
    stored: dict[str, tuple[int, str]] = {}
    if _whole_account(len(sizes)):
        rows: Iterable[tuple[Any, ...]] = conn.execute(
            "SELECT uid, size, last_seen FROM messages WHERE account_id = ?", (account_id,)
        )
        stored.update((uid, (size, last)) for uid, size, last in rows if uid in sizes)
    else:
        for chunk in chunks(list(sizes)):
            rows = conn.execute(
                "SELECT uid, size, last_seen FROM messages"
                f" WHERE account_id = ? AND uid IN ({marks(len(chunk))})",
                (account_id, *chunk),
            )
            stored.update((uid, (size, last)) for uid, size, last in rows)
    stale, reused = split_listing(
        sizes,
        {
            uid: (size, _effective_last_seen(last, last_listed, since) > at)
            for uid, (size, last) in stored.items()
        },
    )
    conn.executemany(
        "DELETE FROM messages WHERE account_id = ? AND uid = ?",
        [(account_id, uid) for uid in reused],
    )
    conn.executemany(
        "INSERT INTO messages (account_id, uid, size, first_seen, last_seen)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id, uid) DO UPDATE SET"
        " first_seen = min(first_seen, excluded.first_seen),"
        " last_seen = max(last_seen, excluded.last_seen)",
        [(account_id, uid, size, at, at) for uid, size in sizes.items() if uid not in stale],
    )
    return stale


def messages(conn: sqlite3.Connection, account: AccountKey | None) -> list[StoredMessage]:
    where = ""
    args: tuple[int, ...] = ()
    with transaction(conn, write=False):
        if account is not None:
            account_id = lookup_account(conn, account, create=False)
            if account_id is None:
                return []
            where, args = " WHERE m.account_id = ?", (account_id,)
        rows = conn.execute(
            "SELECT m.id, a.upstream, a.upstream_user, m.uid, m.size, m.first_seen,"
            f" {EFFECTIVE_LAST_SEEN}, m.deleted_upstream_at, m.deleted_by_rule, a.last_listed"
            " FROM messages AS m JOIN accounts AS a ON a.id = m.account_id"
            f"{where} ORDER BY a.upstream, a.upstream_user, m.first_seen, m.uid LIMIT ?",
            (*args, MAX_LISTED_MESSAGES + 1),
        ).fetchall()
        if len(rows) > MAX_LISTED_MESSAGES:
            raise StateError(
                f"more than {MAX_LISTED_MESSAGES} stored messages; show one account at a time"
            )
        join = " JOIN messages AS m ON m.id = x.message_id"
        return stored_messages(
            rows,
            conn.execute(
                f"SELECT x.message_id, x.user, x.at FROM retrievals AS x{join}{where}"
                " ORDER BY x.at, x.user",
                args,
            ),
            conn.execute(
                f"SELECT x.message_id, x.user, x.rule, x.at FROM hides AS x{join}{where}"
                " ORDER BY x.at, x.user",
                args,
            ),
            from_utc_text,
        )


def prune_batch(conn: sqlite3.Connection, cutoff: str) -> int:
    with transaction(conn, write=True):
        cursor = conn.execute(  # the SQL form of StoredMessage.is_gone
            "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages AS m"
            " JOIN accounts AS a ON a.id = m.account_id"
            " WHERE m.last_seen < ? AND m.last_seen < a.listing_since LIMIT ?)",
            (cutoff, PRUNE_BATCH),
        )
        deleted = cursor.rowcount
        # The gateway's rows the same way; a STAGED row is never forgotten (its file
        # is still to be settled by the next poll).
        cursor = conn.execute(
            "DELETE FROM gateway_messages WHERE (source_id, uid) IN"
            " (SELECT m.source_id, m.uid FROM gateway_messages AS m"
            " JOIN gateway_sources AS s ON s.id = m.source_id"
            " WHERE m.last_seen < ? AND m.last_seen < s.last_listed AND m.state != 'staged'"
            " LIMIT ?)",
            (cutoff, max(0, PRUNE_BATCH - deleted)),
        )
        return deleted + cursor.rowcount
