"""What one client session reports: the facts counted as it runs and logged once at
its end, the QUIT reply's account of what was done, and the lines logged on the way.

The ``session_end`` line (docs/operations.md, "Logs") is the session's audit
record: who logged in, to which upstream, how it ended, how much it moved, what the
client marked and what was really deleted or hidden. ``login_failed`` is the one line
of a failed login (the fail2ban filter reads it), ``tls_alpn_refused`` and
``retrieve_failed`` say why a session ended early. popproxy/session.py logs nothing
itself.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from popproxy.auth.login import LoginOutcome
from popproxy.maildrop.base import Committed
from popproxy.metrics import LoginMechanism, LoginResult
from popproxy.outcomes import SessionResult

# The session's logger: every line a session logs comes from here.
log = logging.getLogger("popproxy.session")

# The login result counted for an attempt that gets AUTH_FAILED.
FAILURE_RESULTS = {
    LoginOutcome.FAILED: LoginResult.FAILED,
    LoginOutcome.HASH_UNUSABLE: LoginResult.ERROR,
    LoginOutcome.LOCKED_OUT: LoginResult.LOCKED_OUT,
    LoginOutcome.THROTTLED: LoginResult.THROTTLED,
}


class LoginFailure(enum.Enum):
    """Why a login failed: ``reason=`` of the ``login_failed`` line (docs/operations.md)."""

    BAD_CREDENTIALS = "bad_credentials"  # a wrong password, or a name no user has
    MALFORMED = "malformed"  # SASL credentials that decode but do not parse (RFC 4616 §2)
    THROTTLED = "throttled"  # refused unchecked: this client address is locked out
    LOCKED_OUT = "locked_out"  # refused unchecked: the user name is locked out (by anyone)
    BUSY = "busy"  # too many logins were waiting for a hash: nothing was checked
    HASH_UNUSABLE = "hash_unusable"  # the user's stored hash could not be used (config)


FAILURE_REASONS = {
    LoginOutcome.FAILED: LoginFailure.BAD_CREDENTIALS,
    LoginOutcome.HASH_UNUSABLE: LoginFailure.HASH_UNUSABLE,
    LoginOutcome.LOCKED_OUT: LoginFailure.LOCKED_OUT,
    LoginOutcome.THROTTLED: LoginFailure.THROTTLED,
}

# What a session that did not commit did: immutable, so one instance serves every session.
NOTHING_COMMITTED = Committed()

# The ends that follow an upstream failure when the client gives up: it closes, or QUITs.
_ENDS_AFTER_A_FAILURE = frozenset({SessionResult.EOF, SessionResult.QUIT})


def quit_text(committed: Committed) -> str:
    """The QUIT reply's text: what was done, never what was only marked (RFC 1939 §6
    leaves the text free). Under a keep rule a DELE deletes nothing: it hides."""
    deleted = committed.deleted_local + committed.deleted_upstream
    text = f"Logging out, {deleted} messages deleted"
    if committed.hidden:
        text += f", {committed.hidden} kept on the server and hidden from this mailbox"
    return text + "."


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
    committed: Committed = NOTHING_COMMITTED
    started: float = field(default_factory=trio.current_time)

    def settle(self, marked: int, *, upstream_failed: bool) -> None:
        """Take the client's marks at the end; ``upstream_failed``: the last local login's
        upstream could not be opened (``result=upstream_error``)."""
        self.marked = marked
        if upstream_failed and self.result in _ENDS_AFTER_A_FAILURE:
            # What ended it was the upstream: the client only gave up after the -ERR.
            self.result = SessionResult.UPSTREAM_ERROR

    def login_failed(self, mechanism: LoginMechanism, reason: LoginFailure) -> None:
        """The one ``login_failed`` line of a failed login (docs/operations.md has a fail2ban
        filter for it): the client's address, never the name it tried or its password."""
        log.info(
            "login_failed",
            extra={
                "fields": {
                    "session": self.session_id,
                    "peer": self.peer,
                    "mechanism": mechanism.value,
                    "reason": reason.value,
                }
            },
        )

    def alpn_refused(self, offered: Sequence[bytes]) -> None:
        """The ``tls_alpn_refused`` line: a ClientHello offered ALPN without pop3."""
        log.info(
            "tls_alpn_refused",
            extra={
                "fields": {
                    "session": self.session_id,
                    "peer": self.peer,
                    # At most a few names, each cut short; logfmt escapes them.
                    "offered": ",".join(
                        name[:32].decode("ascii", "replace") for name in offered[:4]
                    ),
                }
            },
        )

    def retrieve_failed(self, msg: int) -> None:
        """The ``retrieve_failed`` line: a RETR or TOP broke off after its +OK."""
        log.warning("retrieve_failed", extra={"fields": {"session": self.session_id, "msg": msg}})

    def log_end(self) -> None:
        """Log the ``session_end`` line; the duration runs from ``started`` to now.

        Made into a record and handed to the logger's handlers as ``log.info`` would,
        without its look-up of the calling file and line (``findCaller``), which
        neither formatter writes: every session ends here (issue 15)."""
        if not log.isEnabledFor(logging.INFO):
            return
        record = log.makeRecord(
            log.name,
            logging.INFO,
            __file__,
            0,
            "session_end",
            (),
            None,
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
        log.handle(record)
