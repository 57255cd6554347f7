"""Building a big listing's objects with the cyclic garbage collector paused.

A login of 100,000 messages builds about half a million small objects in a few
synchronous steps (the parsed listing, the maildrop's messages, the policy's
candidates and view; at QUIT the record's listing). CPython starts a collection
every 700 container allocations, and the older generations' collections walk every
object the process holds: on the 2-vCPU test machine about a third of those steps'
time (docs/benchmarks.md). These objects hold no reference cycles, so not
collecting while they are built frees nothing later than it would have been freed.

``paused()`` pauses the collector for a block that does not await (so no other
task runs inside it; worker threads may, and their garbage waits too) and turns
it back on only if it was on. The collections owed run at the next allocations.
"""

from __future__ import annotations

import gc
from types import TracebackType


class paused:  # lower case: used as a function, ``with gc_pause.paused():``
    """The cyclic collector off inside the block (never across an ``await``). A class,
    not a generator context manager: it runs several times in every session (issue 15)."""

    __slots__ = ("_disabled",)

    def __enter__(self) -> None:
        self._disabled = gc.isenabled()
        if self._disabled:
            gc.disable()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._disabled:
            gc.enable()
