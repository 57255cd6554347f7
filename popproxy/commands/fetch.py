"""``popproxy fetch --once``: poll the gateway's fetch sources once and exit, for cron
and systemd timers (docs/gateway.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio

from popproxy.commands.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    LOG_LEVELS,
    Subcommands,
    load,
)
from popproxy.config import Config

log = logging.getLogger("popproxy")


def add_parser(commands: Subcommands) -> None:
    """Declare ``popproxy fetch`` and its options."""
    fetch = commands.add_parser(
        "fetch",
        help="poll the gateway's fetch sources once and exit (for cron and systemd timers)",
        description=(
            "Poll every fetch source of every gateway user (or of USER) once, as a running"
            " server would, and exit: 0 if every poll succeeded, 1 if any failed."
        ),
    )
    fetch.add_argument("--once", action="store_true", required=True, help="one poll per source")
    fetch.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    fetch.add_argument("--user", help="only this local user's sources")
    fetch.add_argument(
        "--log-format", choices=("logfmt", "json"), default="logfmt", help="default: logfmt"
    )
    fetch.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default: info")


def run(args: argparse.Namespace) -> int:
    """Poll once; the exit code says whether every poll succeeded. The polls log as
    ``run``'s do, as --log-format and --log-level say (cli.py sets that up)."""
    config = load(Path(args.config))
    if config is None:
        return EXIT_USAGE
    user: str | None = args.user
    names = [u.name for u in config.gateway_users]
    if user is not None and user not in names:
        print(f"popproxy fetch: {user!r} is not a user with fetch sources", file=sys.stderr)
        return EXIT_USAGE
    if not names:
        print("popproxy fetch: no user has fetch sources", file=sys.stderr)
        return EXIT_USAGE
    from popproxy.state import StateError

    try:
        results = trio.run(fetch_once, config, None if user is None else [user])
    except StateError as exc:
        log.error("state_unavailable", extra={"fields": {"reason": str(exc)}})  # noqa: TRY400
        return EXIT_FAILURE
    return EXIT_OK if all(ok for ok in results) else EXIT_FAILURE


async def fetch_once(config: Config, users: list[str] | None) -> list[bool]:
    """One poll of each source of ``users`` (None: every gateway user); which succeeded
    or found the source busy with another instance."""
    # The gateway and the state store are imported only when they are needed, as for run.
    from popproxy.gateway.fetcher import Fetcher
    from popproxy.gateway.leases import LeasedPoller, poll_locks
    from popproxy.gateway.schedule import poll_once
    from popproxy.maildrop.retention import utc_now
    from popproxy.outcomes import PollResult
    from popproxy.state import open_store
    from popproxy.state.base import GatewayStore

    store = await open_store(config.state)

    async def get() -> GatewayStore:
        return store

    wait = config.limits.account_wait_seconds
    try:
        async with poll_locks(config.state) as locks:
            poller = LeasedPoller(Fetcher(get, clock=utc_now), locks, wait_seconds=wait)
            reports = await poll_once(poller, config, users)
    finally:
        await store.aclose()
    # busy: another instance (a running server) was polling the source meanwhile
    return [report.result in {PollResult.OK, PollResult.BUSY} for report in reports]
