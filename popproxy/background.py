"""What ``popproxy run`` keeps running beside its listeners until the shutdown begins:
the reloads SIGHUP asks for and the gateway polls SIGUSR1 asks for (the signal
handlers live in cli.py and feed these channels), and the copy of the loaded config
kept after the start and each reload."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import trio

from popproxy.config import Config
from popproxy.config.snapshot import snapshot_dir_of, write_snapshot
from popproxy.gateway.schedule import Scheduler
from popproxy.reload import ConfigLoader, ReloadOutcome

# The server's logger: these lines were logged by serve.py before this module existed.
log = logging.getLogger("popproxy.serve")


class Reloadable(Protocol):
    """The server as a reload sees it (serve.Server)."""

    async def reload(self, load: ConfigLoader) -> ReloadOutcome: ...


@dataclass(frozen=True, slots=True)
class Background:
    """What runs beside the listeners until the shutdown begins: reloads and the gateway."""

    reloads: trio.abc.ReceiveChannel[ConfigLoader] | None
    gateway: Scheduler
    poll_requests: trio.abc.ReceiveChannel[None] | None

    async def apply_reloads(self, server: Reloadable) -> None:
        if self.reloads is None:
            return
        async with self.reloads:
            async for load in self.reloads:
                await server.reload(load)
                self.gateway.reloaded()

    async def forward_poll_requests(self) -> None:
        if self.poll_requests is None:
            return
        async with self.poll_requests:
            async for _ in self.poll_requests:
                log.info("gateway_poll_now")
                self.gateway.poll_now()


async def keep_snapshot(config: Config) -> None:
    """Keep a copy of the files the running config was loaded from, for
    ``check-config --against-running`` (popproxy/config/snapshot.py); ``run`` calls it
    at the start and after each successful reload. A copy that cannot be written is
    logged; serving goes on."""
    directory = snapshot_dir_of(config)
    if directory is None:
        return
    try:
        written = await trio.to_thread.run_sync(
            write_snapshot, config, directory, Path.cwd(), datetime.now(UTC)
        )
    except OSError as exc:
        log.warning(
            "snapshot_not_written",
            extra={"fields": {"directory": directory, "reason": exc.strerror or str(exc)}},
        )
        return
    if written:
        log.info("snapshot_written", extra={"fields": {"directory": directory}})
