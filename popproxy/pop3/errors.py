"""The two error roots of the sans-IO core (DESIGN.md, Sans-IO core).

``RemoteProtocolError`` is the peer's fault and carries the ``-ERR`` reply to
send; ``LocalProtocolError`` is our own misuse of the state machine: a bug.
"""

from __future__ import annotations

from popproxy.pop3.replies import Err


class LocalProtocolError(Exception):
    """We drove the state machine wrongly (a bug in popproxy, never the peer's fault)."""


class RemoteProtocolError(Exception):
    """The peer broke the protocol.

    ``reply`` is the ``-ERR`` line to send to it (the server role) or to report
    (the client role); ``fatal`` says the connection cannot go on and must close
    after the reply.
    """

    def __init__(self, reply: Err, *, fatal: bool = False) -> None:
        super().__init__(reply.text)
        self.reply = reply
        self.fatal = fatal
