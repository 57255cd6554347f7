"""Durable delivery of a poll's messages into a Maildir, and the recovery of a dead poll.

The asynchronous half of delivery, beside the poll driver (``fetcher.py``): the
blocking file operations are in ``delivery.py``; this module runs them in worker
threads behind the gateway's limiter and puts the store's records between them in
the order the crash table needs (docs/gateway.md, "Delivery and the crash table"):

1. ``receive`` streams one RETR body (RFC 1939 §5), un-stuffed, into ``tmp/``;
   ``finish`` makes the last write and fsyncs the file.
2. ``deliver`` makes a batch durable: ``tmp/`` fsync'ed, the store records the batch
   STAGED, the files move to ``new/``, ``new/`` is fsync'ed, the store records them
   DELIVERED.
3. ``recover`` settles what a poll that died left STAGED: a file still in ``tmp/`` is
   published, one in ``new/`` or ``cur/`` is delivered, one that is nowhere goes back
   to LISTED and is fetched again. It needs no upstream.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar, TypeVarTuple

import trio

from popproxy.gateway import delivery
from popproxy.gateway.delivery import DeliveryError, TmpFile, Where
from popproxy.maildrop.connection import UpstreamConnection
from popproxy.state.base import GatewayStore, SourceKey, StagedMessage

log = logging.getLogger("popproxy.gateway")

_R = TypeVar("_R")
_Args = TypeVarTuple("_Args")

# Un-stuffed octets gathered before a write to the tmp file: a typical message is one
# write (one worker-thread round trip), a large one is written in pieces of this size.
WRITE_BYTES = 1024 * 1024
# Worker threads doing gateway file work at once (writes, fsyncs, renames): several
# fsyncs in flight let the file system commit them together.
GATEWAY_FILE_THREADS = 4

Clock = Callable[[], datetime]


class Step(enum.Enum):
    """Points of a poll between two durable steps, where a test may kill the process."""

    LISTED = "listed"  # the store recorded the listing
    WRITTEN = "written"  # one message's tmp file is written and fsync'ed
    TMP_SYNCED = "tmp_synced"  # tmp/ fsync'ed for a batch
    STAGED = "staged"  # the store recorded the batch STAGED
    PUBLISHED = "published"  # the batch is in new/ and new/ fsync'ed
    DELIVERED = "delivered"  # the store recorded the batch DELIVERED
    QUIT_SENT = "quit_sent"  # the DELEs and QUIT answered +OK upstream
    DELETIONS_RECORDED = "deletions_recorded"  # the store recorded the deletions


StepHook = Callable[[Step], Awaitable[None]]


class DurableDelivery:
    """Writes, publishes and records messages for every poll of one ``Fetcher``.

    ``clock`` is what the store's records read as now; ``on_step`` is awaited at each
    ``Step`` (the crash tests kill the process there).
    """

    def __init__(self, *, clock: Clock, on_step: StepHook | None = None) -> None:
        self._clock = clock
        self._on_step = on_step
        self._limiter = trio.CapacityLimiter(GATEWAY_FILE_THREADS)

    async def run(self, fn: Callable[[*_Args], _R], *args: *_Args) -> _R:
        """Run the blocking ``fn(*args)`` in a worker thread behind the file limiter."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def step(self, step: Step) -> None:
        """Tell the step hook (if any) that the poll reached ``step``."""
        if self._on_step is not None:
            await self._on_step(step)

    async def receive(
        self, connection: UpstreamConnection, root: Path, name: str
    ) -> tuple[TmpFile | None, list[bytes], int]:
        """Stream the body of the RETR whose ``+OK`` was read (RFC 1939 §5), un-stuffed by
        the protocol core, towards ``tmp/name``: every ``WRITE_BYTES`` are written as
        they come; the rest is returned for the last write (the file, None if nothing was
        written yet, the rest, and the body's size). A failure removes the file."""
        pending: list[bytes] = []
        pending_bytes = 0
        total = 0
        tmp: TmpFile | None = None

        async def sink(data: bytes | bytearray) -> None:
            nonlocal pending_bytes, tmp, total
            pending.append(bytes(data))
            pending_bytes += len(data)
            total += len(data)
            if pending_bytes >= WRITE_BYTES:
                chunks = pending.copy()
                pending.clear()
                pending_bytes = 0
                tmp = await self.run(_write, tmp, root, name, chunks, False)

        try:
            await connection.stream_body(
                sink, read_seconds=connection.upstream.command_timeout_seconds
            )
        except BaseException:
            if tmp is not None:
                with trio.CancelScope(shield=True):
                    await self.run(tmp.discard)
            raise
        return tmp, pending, total

    async def finish(self, tmp: TmpFile | None, root: Path, name: str, rest: list[bytes]) -> int:
        """Write the ``rest`` that ``receive`` returned, fsync and close ``tmp/name``; the
        file's size. A failure (or a cancellation) removes the file."""
        try:
            done = await self.run(_write, tmp, root, name, rest, True)
        except BaseException:
            # Cancelled before its thread ran, a part may be on disk: remove it.
            if tmp is not None:
                with trio.CancelScope(shield=True):
                    await self.run(tmp.discard)
            raise
        return done.written

    async def deliver(
        self,
        store: GatewayStore,
        key: SourceKey,
        root: Path,
        batch: Sequence[tuple[int, StagedMessage]],
    ) -> set[int]:
        """Make a batch of fsync'ed tmp files durable and recorded (docs/gateway.md); the
        batch's indexes."""
        staged = [item for _, item in batch]
        names = [item.file_name for item in staged]
        try:
            await self.run(delivery.sync_dir, root / delivery.TMP)
            await self.step(Step.TMP_SYNCED)
            await store.gateway_stage(key, staged, self._clock())
        except BaseException:
            # Not staged: nothing refers to the files; they would be fetched again.
            with trio.CancelScope(shield=True):
                for name in names:
                    with contextlib.suppress(DeliveryError):
                        await self.run(delivery.discard_tmp, root, name)
            raise
        await self.step(Step.STAGED)
        # From here a failure leaves the batch STAGED: the next poll settles it.
        await self.run(delivery.publish, root, names)
        await self.step(Step.PUBLISHED)
        await store.gateway_settle(key, [m.uid for m in staged], (), self._clock())
        await self.step(Step.DELIVERED)
        return {index for index, _ in batch}

    async def recover(self, store: GatewayStore, key: SourceKey, root: Path) -> None:
        """Settle the STAGED messages a poll that died left (docs/gateway.md, crash table)."""
        staged = await store.gateway_staged(key)
        if not staged:
            return
        names = {fact.uid: fact.file_name or "" for fact in staged}
        where = await self.run(delivery.locate, root, list(names.values()))
        in_tmp = [name for name in names.values() if where[name] is Where.TMP]
        await self.run(delivery.publish, root, in_tmp)
        returned = [uid for uid, name in names.items() if where[name] is Where.NOWHERE]
        delivered = [uid for uid in names if uid not in returned]
        await store.gateway_settle(key, delivered, returned, self._clock())
        log.warning(
            "gateway_recovered",
            extra={
                "fields": {
                    "user": key.user,
                    "source": key.label,
                    "published": len(in_tmp),
                    "delivered": len(delivered),
                    "refetch": len(returned),
                }
            },
        )


def _write(tmp: TmpFile | None, root: Path, name: str, chunks: list[bytes], last: bool) -> TmpFile:
    """Create ``tmp/name`` if needed, append ``chunks``, and if ``last`` fsync and close."""
    if tmp is None:
        tmp = TmpFile.create(root, name)
    tmp.write(chunks)
    if last:
        tmp.finish()
    return tmp
