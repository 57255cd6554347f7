"""Counting the scheduler's steps of the running task: how a test shows that a call
finished without a pass through trio's scheduler, or with exactly one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio
import trio.lowlevel


class StepsOf(trio.abc.Instrument):
    """Counts the scheduler's steps of one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


@contextlib.contextmanager
def steps_of_this_task() -> Iterator[StepsOf]:
    """The steps the current task takes inside the ``with`` block."""
    steps = StepsOf(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        yield steps
    finally:
        trio.lowlevel.remove_instrument(steps)
