"""The popproxy under attack, and how a test connects to it.

Clients are tests/pop3client.py's `SocketPop3`: exact octets out, exact reply lines in,
under a socket timeout, so a test can assert each reply to the byte, and whether and
when the server closed. `Target` is a popproxy subprocess routing one local
user to a Dovecot account; `Target.still_serves` is the check every test ends with:
a fresh session logs in and gets a message byte for byte.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from integration.conftest import StartServer
from integration.dovecot import DovecotServer, DovecotUser
from integration.harness import PASSWORD, Corpus, ProxyUser, ServerProcess, Upstream
from pop3client import SocketPop3

UPSTREAM = "dovecot"
LOCAL_USER = "mallory"


@dataclass
class Target:
    """A popproxy subprocess whose user LOCAL_USER is routed to a Dovecot account."""

    server: ServerProcess
    mailbox: DovecotUser
    messages: frozenset[bytes]  # the CRLF form of each message in the account

    @classmethod
    def start(
        cls,
        start: StartServer,
        dovecot: DovecotServer,
        mailbox: DovecotUser,
        corpus: Corpus,
        *,
        limits: Mapping[str, float | int] | None = None,
        allow_plaintext_auth: bool = True,
        users: tuple[ProxyUser, ...] = (),
        upstreams: Mapping[str, Upstream] | None = None,
        state: Path | None = None,
    ) -> Target:
        host, port = dovecot.endpoint("starttls")
        server = start(
            users=[
                ProxyUser(LOCAL_USER, PASSWORD, UPSTREAM, mailbox.name, mailbox.password),
                *users,
            ],
            upstreams={
                UPSTREAM: Upstream(host, port, "starttls", ca_file=dovecot.ca_file),
                **(upstreams or {}),
            },
            allow_plaintext_auth=allow_plaintext_auth,
            limits=limits,
            state=state,
        )
        keys = mailbox.keys()
        expected = frozenset(m.crlf or b"" for m in corpus.small if m.key in keys)
        assert len(expected) == mailbox.count()
        return cls(server, mailbox, expected)

    def port(self, kind: str = "none") -> int:
        return self.server.port(kind)

    def connect(self, kind: str = "none", *, tls: ssl.SSLContext | None = None) -> SocketPop3:
        return SocketPop3(self.port(kind), tls=tls)

    def still_serves(self) -> None:
        """A fresh session logs in and retrieves message 1 byte for byte, then QUITs
        (nothing was marked, so nothing is deleted)."""
        with self.connect() as pop:
            assert pop.greeting.startswith(b"+OK"), pop.greeting
            assert pop.login(LOCAL_USER, PASSWORD).startswith(b"+OK Logged in"), "login failed"
            assert pop.cmd(b"RETR 1").startswith(b"+OK")
            body = b"".join(line + b"\r\n" for line in pop.body())
            assert body in self.messages
            assert pop.cmd(b"QUIT").startswith(b"+OK")
        assert self.mailbox.count() == len(self.messages)
