"""The PostgreSQL store's schema and its migrations (``store.py`` uses them).

``popproxy_schema`` holds one row per applied version. Opening takes a
transaction-scoped advisory lock (``pg_advisory_xact_lock(APPLICATION_ID,
hashtext(current_schema()))``) and applies the missing ``MIGRATIONS`` in the
same transaction: several instances starting at once migrate once, and a
failing migration changes nothing (PostgreSQL's DDL is transactional). A schema
newer than this popproxy knows is used when its ``oldest_reader`` says this
version still understands it (an additive migration), so instances can be
upgraded one at a time; otherwise it is refused.

Version 3 adds ``known_sources``: the client addresses each local user lately
logged in from (popproxy/known_sources.py). Version 4 adds what several instances
share beside the store (``shared.py``): the ``leases`` of the cross-process
mailbox locks and the ``login_failures`` of the shared login throttle. Advisory
locks whose first key is ``APPLICATION_ID`` are popproxy's; the second key of the
migration lock is the schema's hash, so stores in several schemas of one database
do not wait for each other.

Names and UIDLs are ``text COLLATE "C"``: they compare and sort by their bytes,
as in sqlite, whatever the database's default collation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from popproxy.state.base import StateError

# The longest the migration at open may take, including waiting for another instance
# that is migrating the same schema.
PG_MIGRATION_TIMEOUT_SECONDS = 600
# "PoPx" in ASCII (as sqlite's application_id): the first key of popproxy's advisory locks.
APPLICATION_ID = 0x506F5078
SCHEMA_TABLE = "popproxy_schema"
# The tables of MIGRATIONS; a schema holding one of them but no SCHEMA_TABLE is
# another program's and is refused.
TABLES = (
    "accounts",
    "messages",
    "retrievals",
    "hides",
    "disposals",
    "gateway_sources",
    "gateway_messages",
    "known_sources",
    "leases",
    "login_failures",
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step to ``version``, and the oldest schema version whose popproxy can
    still use the result (``version`` itself unless the step only adds things older
    code does not touch)."""

    version: int
    statements: tuple[str, ...]
    oldest_reader: int


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        (
            """CREATE TABLE accounts (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                upstream text COLLATE "C" NOT NULL,
                upstream_user text COLLATE "C" NOT NULL,
                last_listed timestamptz,
                UNIQUE (upstream, upstream_user)
            )""",
            # One row per UIDL an account listed; deleted_* say this content was
            # deleted upstream by a QUIT (and by which rule and session).
            """CREATE TABLE messages (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                account_id bigint NOT NULL REFERENCES accounts (id),
                uid text COLLATE "C" NOT NULL,
                size bigint NOT NULL CHECK (size >= 0),
                first_seen timestamptz NOT NULL,
                last_seen timestamptz NOT NULL,
                deleted_upstream_at timestamptz,
                deleted_by_rule text,
                deleted_session_id text,
                UNIQUE (account_id, uid)
            )""",
            "CREATE INDEX messages_last_seen ON messages (last_seen)",
            """CREATE TABLE retrievals (
                message_id bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
                local_user text COLLATE "C" NOT NULL,
                at timestamptz NOT NULL,
                session_id text NOT NULL,
                PRIMARY KEY (message_id, local_user)
            )""",
            """CREATE TABLE hides (
                message_id bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
                local_user text COLLATE "C" NOT NULL,
                rule text NOT NULL,
                at timestamptz NOT NULL,
                session_id text NOT NULL,
                PRIMARY KEY (message_id, local_user)
            )""",
            # The audit log: every hide and upstream deletion, never rewritten.
            """CREATE TABLE disposals (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                account_id bigint NOT NULL REFERENCES accounts (id),
                uid text COLLATE "C" NOT NULL,
                size bigint NOT NULL,
                action text NOT NULL CHECK (action IN ('hide', 'delete_upstream')),
                local_user text COLLATE "C" NOT NULL,
                rule text NOT NULL,
                at timestamptz NOT NULL,
                session_id text NOT NULL
            )""",
            "CREATE INDEX disposals_account_uid ON disposals (account_id, uid)",
        ),
        oldest_reader=1,
    ),
    # The gateway (docs/gateway.md): per source each listed (UIDL, size), how far its
    # delivery got and its deletion upstream, and each source's last poll. Additive:
    # a popproxy of version 1 never reads these tables and may go on using the store.
    Migration(
        2,
        (
            """CREATE TABLE gateway_sources (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                local_user text COLLATE "C" NOT NULL,
                upstream text COLLATE "C" NOT NULL,
                upstream_user text COLLATE "C" NOT NULL,
                last_listed timestamptz,
                last_poll_at timestamptz,
                last_result text,
                last_fetched bigint,
                last_skipped bigint,
                last_deleted bigint,
                last_fetched_bytes bigint,
                last_success_at timestamptz,
                UNIQUE (local_user, upstream, upstream_user)
            )""",
            """CREATE TABLE gateway_messages (
                source_id bigint NOT NULL REFERENCES gateway_sources (id),
                uid text COLLATE "C" NOT NULL,
                size bigint NOT NULL CHECK (size >= 0),
                first_seen timestamptz NOT NULL,
                last_seen timestamptz NOT NULL,
                state text NOT NULL CHECK (state IN ('listed', 'staged', 'delivered')),
                file_name text,
                state_at timestamptz NOT NULL,
                deleted_upstream_at timestamptz,
                deleted_by_rule text,
                PRIMARY KEY (source_id, uid)
            )""",
            "CREATE INDEX gateway_messages_state ON gateway_messages (source_id, state)",
        ),
        oldest_reader=1,
    ),
    # The client addresses each local user lately logged in from (known-good sources,
    # spared by the user-name lockout; popproxy/known_sources.py). Additive: an older
    # popproxy never reads this table.
    Migration(
        3,
        (
            """CREATE TABLE known_sources (
                local_user text COLLATE "C" NOT NULL,
                source text COLLATE "C" NOT NULL,
                last_login timestamptz NOT NULL,
                PRIMARY KEY (local_user, source)
            )""",
        ),
        oldest_reader=1,
    ),
    # What several instances share beside the store (shared.py, docs/scaling.md):
    # leases (one session or poll per mailbox across processes) and login failures
    # (throttling and lockouts). Additive: an older popproxy never reads these tables.
    Migration(
        4,
        (
            # One row per held (or lapsed, not yet retaken) lease; expires_at is the
            # database's clock, so instances' clocks never have to agree.
            """CREATE TABLE leases (
                name text COLLATE "C" PRIMARY KEY,
                holder text NOT NULL,
                token text NOT NULL,
                taken_at timestamptz NOT NULL,
                expires_at timestamptz NOT NULL
            )""",
            "CREATE INDEX leases_holder ON leases (holder)",
            # Failure counts per user name and per client address, in seconds of the
            # database's clock (epoch); -infinity: never.
            """CREATE TABLE login_failures (
                scope text NOT NULL CHECK (scope IN ('user', 'address')),
                key text COLLATE "C" NOT NULL,
                penalty integer NOT NULL,
                last_failure double precision NOT NULL,
                failures double precision[] NOT NULL,
                locked_until double precision NOT NULL,
                PRIMARY KEY (scope, key)
            )""",
            "CREATE INDEX login_failures_last ON login_failures (last_failure)",
        ),
        oldest_reader=1,
    ),
    # The audit log by time: `popproxy audit` reads it newest first, and the trim to
    # state.audit_retention_days deletes its oldest rows. Additive: version 1 reads on.
    Migration(5, ("CREATE INDEX disposals_at ON disposals (at)",), oldest_reader=1),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def check_readable(conn: psycopg.Connection[Any], migrations: Sequence[Migration]) -> None:
    """For a read-only open: the schema holds a popproxy store this code can read (its
    latest version's ``oldest_reader`` is at most this code's latest). Migrates nothing."""
    latest = migrations[-1].version
    with conn.transaction():
        present = _scalar(
            conn,
            "SELECT count(*) FROM pg_tables"
            f" WHERE schemaname = current_schema() AND tablename = '{SCHEMA_TABLE}'",
        )
        if not present:
            raise StateError("the database holds no popproxy state store (nothing to read)")
        row = conn.execute(
            f"SELECT version, oldest_reader FROM {SCHEMA_TABLE} ORDER BY version DESC LIMIT 1"
        ).fetchone()
    if row is None:
        raise StateError("the database holds no popproxy state store (nothing to read)")
    if int(row[0]) > latest and int(row[1]) > latest:
        raise StateError(
            f"the state store has schema version {row[0]}, written by a newer popproxy that"
            f" needs version {row[1]} or newer to read it; this one knows up to {latest}"
        )


def migrate(conn: psycopg.Connection[Any], migrations: Sequence[Migration]) -> None:
    """Bring the schema to the last of ``migrations``, once across every process."""
    latest = migrations[-1].version
    with conn.transaction():
        conn.execute(
            "SELECT set_config('statement_timeout', %s, true),"
            " set_config('lock_timeout', %s, true)",
            (f"{PG_MIGRATION_TIMEOUT_SECONDS}s", f"{PG_MIGRATION_TIMEOUT_SECONDS}s"),
        )
        schema = _scalar(conn, "SELECT current_schema()")
        if schema is None:
            raise StateError(
                "the state store's search_path names no existing schema to create its tables in"
            )
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (APPLICATION_ID,)
        )
        present = {
            str(row[0])
            for row in conn.execute(
                "SELECT tablename FROM pg_tables"
                " WHERE schemaname = current_schema() AND tablename = ANY(%s)",
                ([SCHEMA_TABLE, *TABLES],),
            )
        }
        if SCHEMA_TABLE not in present:
            if present:
                raise StateError(
                    f"schema {schema!r} holds tables of another program"
                    f" ({', '.join(sorted(present))}); it is not a popproxy state store"
                )
            conn.execute(
                f"""CREATE TABLE {SCHEMA_TABLE} (
                    version integer PRIMARY KEY,
                    oldest_reader integer NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )"""
            )
        row = conn.execute(
            f"SELECT version, oldest_reader FROM {SCHEMA_TABLE} ORDER BY version DESC LIMIT 1"
        ).fetchone()
        version, oldest_reader = (0, 0) if row is None else (int(row[0]), int(row[1]))
        if version > latest:
            if oldest_reader > latest:
                raise StateError(
                    f"the state store has schema version {version}, written by a newer"
                    f" popproxy that needs version {oldest_reader} or newer to read it;"
                    f" this one knows up to {latest}"
                )
            return
        for migration in migrations:
            if migration.version <= version:
                continue
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                f"INSERT INTO {SCHEMA_TABLE} (version, oldest_reader) VALUES (%s, %s)",
                (migration.version, migration.oldest_reader),
            )


def _scalar(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    return None if row is None else row[0]
