"""A brief wait in poll(2) for one socket while nothing else in the process can run
(issue 15, docs/benchmarks.md).

Theory of operation. When a read finds no data, waiting the trio way costs a
cancel scope for the read's deadline, an ``EPOLLONESHOT`` re-arm (``epoll_ctl``),
a pass through trio's run loop (``epoll_wait``) and a task switch: measured on
this project's benchmark machine, about a third of the CPU of a small RETR
relayed. On a proxy the bytes are often a fraction of a millisecond away: an
upstream on the same network answers a RETR that fast, and a client that loops
over its messages sends the next command as soon as it has read the last reply.

``QuickWait.readable`` first looks at trio's run queue: if any task is ready to
run, it returns False at once and the caller waits the trio way. Otherwise it
blocks in ``poll`` on two descriptors for at most ``QUICK_WAIT_MILLISECONDS``:
the socket, and trio's own epoll descriptor, which is readable as soon as
anything trio waits for is ready (another session's socket, the listening
socket, a worker thread's result or a signal, both of which go through trio's
wake-up socket). So the brief wait ends the moment other work appears, and the
only thing it can hold up is a trio timer due within that millisecond, by at
most that millisecond. It is not a cancel point; the trio wait after a miss is.

A socket whose peer is far away (a provider over the Internet, a person at a
mail client) misses: after ``QUICK_WAIT_MISSES`` misses in a row the stream
stops trying for its next ``QUICK_WAIT_PAUSE`` waits, then tries once more.

It reads two private attributes of trio's run loop (its run queue and its epoll
object). Where they are missing (another trio release, another I/O manager:
kqueue, IOCP), ``loop_view`` returns None and every wait is trio's own;
``tests/test_quick_wait.py`` pins that they are there on the trio this project
installs. Self-contained: it imports nothing of popproxy.
"""

from __future__ import annotations

import select
from collections.abc import Sized
from typing import Any

_RUN_CONTEXT: Any  # the thread's trio run, if any (trio's own thread-local)
try:
    from trio._core._run import GLOBAL_RUN_CONTEXT as _RUN_CONTEXT
except ImportError:  # a trio without it: every wait is trio's
    _RUN_CONTEXT = None

# The longest a read blocks the thread in poll(2) before waiting the trio way; also
# the most a trio timer due meanwhile can be late. An upstream or client on the
# same network answers well within it.
QUICK_WAIT_MILLISECONDS = 1
# After this many brief waits in a row that timed out, a stream stops trying...
QUICK_WAIT_MISSES = 3
# ...for this many of its waits, then tries once more.
QUICK_WAIT_PAUSE = 64

# Where select has no poll (Windows), ``LoopView`` cannot be made and ``loop_view``
# gives None: every wait is trio's own.
_POLL_IN = getattr(select, "POLLIN", 0)


class LoopView:
    """What a brief wait reads of one trio run: its run queue and epoll descriptor."""

    __slots__ = ("epoll_fd", "poller", "runner", "runq")

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.runq: Sized = runner.runq  # AttributeError: not the trio this was written for
        self.epoll_fd: int = runner.io_manager._epoll.fileno()
        # One poll set for the run's brief waits (one at a time: the run is one thread):
        # the epoll descriptor stays in it, each wait adds its socket for its duration.
        self.poller = select.poll()
        self.poller.register(self.epoll_fd, _POLL_IN)


class _LastView:
    """The view of the last run asked about (rebuilt when the run changes)."""

    __slots__ = ("view",)

    def __init__(self) -> None:
        self.view: LoopView | None = None


_LAST = _LastView()


def loop_view() -> LoopView | None:
    """The current trio run's ``LoopView``, or None where brief waits cannot be made
    (no trio run in this thread, or a trio whose run loop lacks what they read)."""
    try:
        runner = _RUN_CONTEXT.runner
    except AttributeError:
        return None
    view = _LAST.view
    if view is not None and view.runner is runner:
        return view
    try:
        view = LoopView(runner)
    except (AttributeError, OSError, ValueError):  # OSError, ValueError: a closed epoll
        return None
    _LAST.view = view
    return view


class QuickWait:
    """One stream's brief waits for its socket to be readable (see the module docstring)."""

    __slots__ = ("_fd", "_misses", "_pause")

    def __init__(self, fd: int) -> None:
        """``fd``: the stream's socket, which stays open as long as this is used."""
        self._fd = fd
        self._misses = 0
        self._pause = 0

    def readable(self, wait_seconds: float | None = None) -> bool:
        """Wait in poll(2) until the socket is readable, at most ``QUICK_WAIT_MILLISECONDS``
        and never longer than ``wait_seconds``; True if it is. False at once if a trio
        task is ready to run, and as soon as anything trio waits for is ready."""
        if self._pause:
            self._pause -= 1
            return False
        view = loop_view()
        if view is None or view.runq:
            return False
        if wait_seconds is not None and wait_seconds * 1000 < QUICK_WAIT_MILLISECONDS:
            return False
        fd, poller = self._fd, view.poller
        poller.register(fd, _POLL_IN)
        try:
            ready = poller.poll(QUICK_WAIT_MILLISECONDS)
        finally:
            poller.unregister(fd)
        if not ready:
            self._misses += 1
            if self._misses >= QUICK_WAIT_MISSES:
                self._misses = 0
                self._pause = QUICK_WAIT_PAUSE
            return False
        for ready_fd, _ in ready:
            if ready_fd == fd:  # readable, or hung up / in error: the read will tell
                self._misses = 0
                return True
        return False  # something else is ready: let trio run it
