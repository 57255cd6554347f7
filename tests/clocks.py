"""A clock the tests move by hand: what popproxy reads as now (the retention policy, the
known-sources memory, the session summary, the gateway) when a test injects it."""

from __future__ import annotations

from datetime import datetime


class MovableClock:
    """Returns ``now`` until the test sets it to another time."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
