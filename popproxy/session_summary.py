"""The facts of one client session, counted as it runs and logged once at its end.

The ``session_end`` line (docs/operations.md, "Logs") is the session's audit
record: who logged in, to which upstream, how it ended, how much it moved, what the
client marked and what was really deleted or hidden.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from popproxy.maildrop.base import Committed
from popproxy.outcomes import SessionResult

# The session's own logger (popproxy/session.py logs under the same name).
log = logging.getLogger("popproxy.session")


@dataclass(slots=True)
class SessionSummary:
    """The facts of one session, logged once at its end."""

    session_id: str
    listener: str
    peer: str
    user: str | None = None
    upstream: str | None = None  # the upstream's name from config (proxy mode)
    result: SessionResult = SessionResult.EOF
    commands: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # The client's DELE marks when the session ended (at QUIT: those it committed).
    marked: int = 0
    # What the QUIT did (popproxy.maildrop.base.Committed), which under retention
    # policy is not what was marked; nothing for a session that ended without QUIT.
    committed: Committed = field(default_factory=Committed)
    started: float = field(default_factory=trio.current_time)

    def log_end(self) -> None:
        """Log the ``session_end`` line; the duration runs from ``started`` to now."""
        log.info(
            "session_end",
            extra={
                "fields": {
                    "session": self.session_id,
                    "listener": self.listener,
                    "peer": self.peer,
                    "user": self.user or "-",
                    "upstream": self.upstream or "-",
                    "result": self.result.value,
                    "commands": self.commands,
                    "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out,
                    "marked": self.marked,
                    "deleted_upstream": self.committed.deleted_upstream,
                    "deleted_local": self.committed.deleted_local,
                    "hidden": self.committed.hidden,
                    "expired": self.committed.expired,
                    "duration_seconds": round(trio.current_time() - self.started, 3),
                }
            },
        )
