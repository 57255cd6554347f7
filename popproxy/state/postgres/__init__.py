"""The shared ``StateStore``: PostgreSQL, for several popproxy processes on one store.

Theory of operation. Calls run in worker threads over psycopg 3's synchronous
connection pool (psycopg's async API needs asyncio; popproxy runs on trio), each
one transaction at READ COMMITTED; the row lock of an account or a source orders
the writes to it from any process. Every wait on the server is bounded by libpq's
timeouts, ``statement_timeout`` and ``lock_timeout``. Migrations run at open, once
across every process that starts at the same time (an advisory lock), and are
versioned in the database. Times are ``timestamptz``; names and UIDLs are
``text COLLATE "C"``, so they compare and sort by their bytes, as in sqlite.

The modules, one job each:

- ``store.py``: the pool, worker threads, opening, ``record``; the other calls come
  from ``popproxy/state/frontend.py`` over its ``QUERIES``.
- ``target.py``: where and how to connect (the URL, its password apart, libpq's
  bounds) and the error text of a failed call.
- ``schema.py``: the migrations and the advisory lock they run under.
- ``retention.py``: proxy mode's facts, records, listing and pruning.
- ``gateway.py``: the gateway's facts per source and its polls.
- ``audit.py``: the audit log of hides and upstream deletions.
- ``known_sources.py``: the addresses each user lately logged in from.
- ``sql.py``: what they all use (times in and out).
- ``shared.py``: what several instances share beside the store: leases and login
  failures, on a pool of their own.
- ``nonblocking.py``: one-statement calls from the trio thread, libpq non-blocking.
- ``unchanged.py``: which QUITs change nothing, by their login's facts.

``popproxy/state/sqlite/`` has the same modules for sqlite. Only modules of this
package import psycopg, an optional extra (popproxy[postgres]); ``open_store``
imports this package only for a ``postgresql://`` URL.
"""

from popproxy.state.postgres.audit import append_audit
from popproxy.state.postgres.store import (
    PG_MIN_CONNECTIONS,
    PG_STATEMENT_TIMEOUT_SECONDS,
    PG_THREADS,
    PostgresStore,
    open_postgres,
)
from popproxy.state.postgres.target import (
    PG_CONNECT_TIMEOUT_SECONDS,
    PG_TCP_USER_TIMEOUT_MS,
    PostgresTarget,
    first_line,
    refuse_password,
)

__all__ = [
    "PG_CONNECT_TIMEOUT_SECONDS",
    "PG_MIN_CONNECTIONS",
    "PG_STATEMENT_TIMEOUT_SECONDS",
    "PG_TCP_USER_TIMEOUT_MS",
    "PG_THREADS",
    "PostgresStore",
    "PostgresTarget",
    "append_audit",
    "first_line",
    "open_postgres",
    "refuse_password",
]
