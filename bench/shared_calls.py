"""CPU per call of the shared PostgreSQL calls a session makes (issue 15, docs/scaling.md).

Usage, from the repository root, with a PostgreSQL at ``POPPROXY_TEST_PG_URL`` (default
the machine's, ``postgresql://postgres@127.0.0.1:5432/test``):

    PYTHONPATH=$PWD .venv/bin/python -m bench.shared_calls [--tasks 32] [--loops 100]

``--tasks`` trio tasks each loop ``--loops`` times over what a proxy session asks of
``PostgresShared``: the login throttle's read of the failure counts, a lease's take, its
confirmation and its release (four calls). Printed: this process's CPU time (user and
system) per call and the wall time per call, in µs. The schema is the run's own, dropped
at the end. Run it on two checkouts (``PYTHONPATH`` of each) to compare them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import Mapping

import psycopg
import trio
from psycopg import sql

from popproxy.auth.throttle import Failures, LockScope
from popproxy.auth.throttling import FailureKey
from popproxy.state.postgres import PostgresTarget
from popproxy.state.postgres.shared import PostgresShared, open_shared

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
CALLS_PER_LOOP = 4


def _nothing(
    now: float, rows: Mapping[FailureKey, Failures]
) -> tuple[bool, Mapping[FailureKey, Failures | None]]:
    """A login's throttle read that decides nothing and writes nothing."""
    return True, {}


async def _loop(shared: PostgresShared, task: int, loops: int) -> None:
    keys = [(LockScope.USER, f"user{task}"), (LockScope.ADDRESS, "192.0.2.1")]
    for _ in range(loops):
        name, token = f"mailbox{task}", secrets.token_hex(8)
        await shared.change_failures(keys, _nothing, writes=False)
        if not await shared.take_lease(name, "bench", token, 30):
            raise RuntimeError("a lease of the run's own was held")
        if not await shared.confirm_lease(name, token, 30):
            raise RuntimeError("a lease of the run's own was lost")
        await shared.release_lease(name, token)


async def _measure(url: str, tasks: int, loops: int) -> tuple[float, float]:
    shared = await open_shared(PostgresTarget(url))
    try:
        await _loop(shared, 0, 1)  # warm-up: connections open, statements prepared
        cpu, wall = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for task in range(tasks):
                nursery.start_soon(_loop, shared, task, loops)
        calls = tasks * loops * CALLS_PER_LOOP
        return (
            (time.process_time() - cpu) / calls * 1e6,
            (time.perf_counter() - wall) / calls * 1e6,
        )
    finally:
        await shared.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--loops", type=int, default=100)
    args = parser.parse_args()
    server = os.environ.get("POPPROXY_TEST_PG_URL", DEFAULT_PG_URL)
    schema = f"bench_shared_{os.getpid()}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        separator = "&" if "?" in server else "?"
        url = f"{server}{separator}options=-csearch_path%3D{schema}"
        cpu, wall = trio.run(_measure, url, args.tasks, args.loops)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    print(
        f"{args.tasks} tasks x {args.loops} loops x {CALLS_PER_LOOP} calls:"
        f" CPU {cpu:.1f} us/call, wall {wall:.1f} us/call"
    )


if __name__ == "__main__":
    main()
