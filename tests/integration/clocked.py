"""popproxy's ``serve`` in the test's own process, with a clock the test moves by days.

The retention and operator-log tests run ``serve`` in front of the suite's Dovecot with
an ``expire_after_days`` rule, drive it with poplib from worker threads, and move
`MovableClock.now` (tests/clocks.py) between sessions; the gateway tests give the same clock to the
fetcher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import trio
from clocks import MovableClock

from popproxy.config import load_config
from popproxy.serve import serve

from .dovecot import DovecotServer
from .harness import ProxyUser, TlsFiles, write_config
from .test_proxy import UPSTREAM, upstream_for

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EXPIRE_DAYS = 3
EXPIRE = {
    "50-expire.yaml": (
        f"rules:\n  - name: expire-old\n    action: keep\n    expire_after_days: {EXPIRE_DAYS}\n"
    )
}
# One whole in-process test: its sessions against Dovecot and a clean shutdown.
TEST_DEADLINE_SECONDS = 60


@asynccontextmanager
async def expiring_proxy(
    workdir: Path, tls: TlsFiles, dovecot: DovecotServer, user: ProxyUser, clock: MovableClock
) -> AsyncIterator[int]:
    """``serve`` with ``clock``, the EXPIRE rule and ``user`` on Dovecot's plain port,
    under TEST_DEADLINE_SECONDS; yields the port of its plain listener, and shuts it
    down when the block ends."""
    config = load_config(
        write_config(
            workdir / "popproxy.yaml",
            users=[user],
            tls=tls,
            listeners=["none"],
            upstreams={UPSTREAM: upstream_for(dovecot, "none")},
            rules=EXPIRE,
        )
    )
    shutdown = trio.Event()
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(
                lambda task_status: serve(
                    config, shutdown=shutdown, clock=clock, task_status=task_status
                )
            )
            yield ports[0][1]
            shutdown.set()
