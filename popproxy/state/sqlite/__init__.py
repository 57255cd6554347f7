"""The embedded ``StateStore``: one sqlite3 database file per popproxy instance.

Theory of operation. The file is in WAL mode with ``synchronous=FULL``, so a
committed transaction is on disk when ``record`` returns and readers never wait
for the writer. Calls run in worker threads, each on a connection of its own;
concurrent records share one transaction and one fsync (group commit), and a QUIT
whose listing equals the account's latest one writes no message row (lazy
last_seen; docs/state.md), and one that changes nothing else writes nothing
(``unchanged.py``). Times are stored as sortable UTC text.

The modules, one job each:

- ``store.py``: connections, worker threads, opening, group commit of ``record``;
  the other calls come from ``popproxy/state/frontend.py`` over its ``QUERIES``.
- ``schema.py``: the migrations (``PRAGMA user_version``) and the checks at open.
- ``retention.py``: proxy mode's facts, records, listing and pruning.
- ``unchanged.py``: which QUITs change nothing and need no write.
- ``gateway.py``: the gateway's facts per source and its polls.
- ``audit.py``: the audit log of hides and upstream deletions.
- ``known_sources.py``: the addresses each user lately logged in from.
- ``sql.py``: what they all use (the time format, transactions, ``IN`` chunks).

``popproxy/state/postgres/`` has the same modules for PostgreSQL.
"""

from popproxy.state.checks import listing_digest
from popproxy.state.sqlite.audit import append_audit
from popproxy.state.sqlite.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, Migration
from popproxy.state.sqlite.sql import from_utc_text, utc_text
from popproxy.state.sqlite.store import SQLITE_THREADS, SqliteStore, open_sqlite

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SQLITE_THREADS",
    "Migration",
    "SqliteStore",
    "append_audit",
    "from_utc_text",
    "listing_digest",
    "open_sqlite",
    "utc_text",
]
