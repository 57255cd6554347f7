"""The sqlite store's schema: its migrations, and the checks and pragmas at open.

``PRAGMA user_version`` names the schema version and ``MIGRATIONS`` brings an older
file up to date in one transaction at open; ``PRAGMA application_id`` marks the file
as popproxy's. A file from a newer popproxy or from another program is refused. The
journal is WAL (readers never wait for the writer), and ``prepare`` can run
``PRAGMA integrity_check`` (``state.integrity_check``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from popproxy.state.base import StateError
from popproxy.state.sqlite.sql import transaction

# Lines of ``PRAGMA integrity_check`` quoted in the error when the check fails.
MAX_INTEGRITY_LINES = 5
# "PoPx" in ASCII: marks a database file as popproxy's state (PRAGMA application_id).
APPLICATION_ID = 0x506F5078


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: the statements that take version ``version - 1`` to ``version``."""

    version: int
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        (
            """CREATE TABLE accounts (
                id INTEGER PRIMARY KEY,
                upstream TEXT NOT NULL,
                upstream_user TEXT NOT NULL,
                UNIQUE (upstream, upstream_user)
            ) STRICT""",
            # One row per UIDL an account listed; deleted_* say this content was
            # deleted upstream by a QUIT (and by which rule and session).
            """CREATE TABLE messages (
                id INTEGER PRIMARY KEY,
                account_id INTEGER NOT NULL REFERENCES accounts (id),
                uid TEXT NOT NULL,
                size INTEGER NOT NULL CHECK (size >= 0),
                first_seen TEXT NOT NULL,
                last_seen TEXT NOT NULL,
                deleted_upstream_at TEXT,
                deleted_by_rule TEXT,
                deleted_session_id TEXT,
                UNIQUE (account_id, uid)
            ) STRICT""",
            "CREATE INDEX messages_last_seen ON messages (last_seen)",
            """CREATE TABLE retrievals (
                message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
                user TEXT NOT NULL,
                at TEXT NOT NULL,
                session_id TEXT NOT NULL,
                PRIMARY KEY (message_id, user)
            ) STRICT, WITHOUT ROWID""",
            """CREATE TABLE hides (
                message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
                user TEXT NOT NULL,
                rule TEXT NOT NULL,
                at TEXT NOT NULL,
                session_id TEXT NOT NULL,
                PRIMARY KEY (message_id, user)
            ) STRICT, WITHOUT ROWID""",
            # The audit log: every hide and upstream deletion, never rewritten.
            """CREATE TABLE disposals (
                id INTEGER PRIMARY KEY,
                account_id INTEGER NOT NULL REFERENCES accounts (id),
                uid TEXT NOT NULL,
                size INTEGER NOT NULL,
                action TEXT NOT NULL CHECK (action IN ('hide', 'delete_upstream')),
                user TEXT NOT NULL,
                rule TEXT NOT NULL,
                at TEXT NOT NULL,
                session_id TEXT NOT NULL
            ) STRICT""",
            "CREATE INDEX disposals_account_uid ON disposals (account_id, uid)",
        ),
    ),
    # When each account was last listed, so prune forgets only UIDLs missing from a
    # later listing, never those of an account nobody logged in to for a while.
    Migration(
        2,
        (
            "ALTER TABLE accounts ADD COLUMN last_listed TEXT",
            "UPDATE accounts SET last_listed ="
            " (SELECT max(last_seen) FROM messages WHERE account_id = accounts.id)",
        ),
    ),
    # The gateway: per source (local user, upstream account) each listed (UIDL, size),
    # how far its delivery got (popproxy.state.base.FetchState) and its deletion
    # upstream; and each source's last poll, for `popproxy state show`.
    Migration(
        3,
        (
            """CREATE TABLE gateway_sources (
                id INTEGER PRIMARY KEY,
                user TEXT NOT NULL,
                upstream TEXT NOT NULL,
                upstream_user TEXT NOT NULL,
                last_listed TEXT,
                last_poll_at TEXT,
                last_result TEXT,
                last_fetched INTEGER,
                last_skipped INTEGER,
                last_deleted INTEGER,
                last_fetched_bytes INTEGER,
                last_success_at TEXT,
                UNIQUE (user, upstream, upstream_user)
            ) STRICT""",
            """CREATE TABLE gateway_messages (
                source_id INTEGER NOT NULL REFERENCES gateway_sources (id),
                uid TEXT NOT NULL,
                size INTEGER NOT NULL CHECK (size >= 0),
                first_seen TEXT NOT NULL,
                last_seen TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('listed', 'staged', 'delivered')),
                file_name TEXT,
                state_at TEXT NOT NULL,
                deleted_upstream_at TEXT,
                deleted_by_rule TEXT,
                PRIMARY KEY (source_id, uid)
            ) STRICT, WITHOUT ROWID""",
            "CREATE INDEX gateway_messages_state ON gateway_messages (source_id, state)",
        ),
    ),
    # The client addresses each local user lately logged in from (known-good sources,
    # spared by the user-name lockout; popproxy/known_sources.py).
    Migration(
        4,
        (
            """CREATE TABLE known_sources (
                user TEXT NOT NULL,
                source TEXT NOT NULL,
                last_login TEXT NOT NULL,
                PRIMARY KEY (user, source)
            ) STRICT, WITHOUT ROWID""",
        ),
    ),
    # A QUIT whose listing equals the account's latest one writes no message row:
    # listing_digest names that listing, and listing_since is when it was last
    # written out. A row with last_seen >= listing_since is in the latest listing and
    # was last seen at accounts.last_listed (see "Lazy last_seen" in the module text).
    Migration(
        5,
        (
            "ALTER TABLE accounts ADD COLUMN listing_digest BLOB",
            "ALTER TABLE accounts ADD COLUMN listing_since TEXT",
            "UPDATE accounts SET listing_since = last_listed",
        ),
    ),
    # The audit log by time: `popproxy audit` reads it newest first, and the trim to
    # state.audit_retention_days deletes its oldest rows.
    Migration(6, ("CREATE INDEX disposals_at ON disposals (at)",)),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def prepare(conn: sqlite3.Connection, migrations: Sequence[Migration], check: bool) -> None:
    """At a writable open: WAL mode, the pending ``migrations`` in one transaction, and
    with ``check`` the integrity check."""
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "memory":
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StateError(f"the state store cannot use WAL mode (journal_mode is {mode})")
    with transaction(conn, write=True):
        migrate(conn, migrations)
    if check:
        rows = conn.execute("PRAGMA integrity_check").fetchmany(MAX_INTEGRITY_LINES)
        if [tuple(row) for row in rows] != [("ok",)]:
            found = "; ".join(str(row[0]) for row in rows)
            raise StateError(f"the state store failed its integrity check: {found}")


def check_version(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
    """For a read-only open: the file is popproxy's and its schema is one this code reads
    (any version from 1, whose tables the reads need, to the latest)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id != APPLICATION_ID or version < 1:
        raise StateError("the file is not a popproxy state store")
    _refuse_newer(version, migrations)


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
    """Bring the schema to the last of ``migrations``; inside the open transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id not in (0, APPLICATION_ID) or (
        version == 0 and conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
    ):
        raise StateError("the file is not a popproxy state store")
    _refuse_newer(version, migrations)
    for migration in migrations:
        if migration.version <= version:
            continue
        for statement in migration.statements:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {migration.version:d}")
    if app_id == 0:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")


def _refuse_newer(version: int, migrations: Sequence[Migration]) -> None:
    latest = migrations[-1].version
    if version > latest:
        raise StateError(
            f"the state store has schema version {version}, written by a newer popproxy;"
            f" this one knows up to {latest}"
        )
