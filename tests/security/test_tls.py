"""TLS on the client leg: STLS command injection, nothing from before the handshake
surviving it, TLS 1.2 as the floor, and no plaintext credentials unless allowed
(RFC 2595 §4, RFC 8314, RFC 8996)."""

from __future__ import annotations

import base64
import ssl

import pytest
from integration.conftest import StartServer
from integration.dovecot import DovecotServer, DovecotUser
from integration.harness import PASSWORD, Corpus, TlsFiles
from pop3client import SocketPop3

from .hostile import tls_1_1_client, tls_1_1_works_here
from .probe import LOCAL_USER, Target

PLAINTEXT_DISALLOWED = (
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)


@pytest.mark.parametrize("behind", [b"CAPA\r\n", b"USER mall"], ids=["a-command", "a-partial-line"])
def test_stls_with_anything_behind_it_in_the_buffer_is_refused_and_closed(
    target: Target, behind: bytes
) -> None:
    with target.connect("starttls") as pop:
        pop.send(b"STLS\r\n" + behind)
        assert pop.line() == b"-ERR STLS must be the last command sent in clear"
        # No TLS handshake starts and what followed is never answered: the connection ends.
        assert pop.rest_until_closed() == b""
    target.still_serves()


def test_a_user_given_before_stls_does_not_survive_the_handshake(
    target: Target, tls_files: TlsFiles
) -> None:
    with target.connect("starttls") as pop:
        assert pop.cmd(b"USER " + LOCAL_USER.encode()) == b"+OK"
        assert pop.cmd(b"STLS") == b"+OK Begin TLS negotiation now."
        pop.start_tls(tls_files.client_context())
        # RFC 2595 §4: everything from before is forgotten, the USER included.
        assert pop.cmd(b"PASS " + PASSWORD.encode()) == b"-ERR No username given"
        assert pop.login(LOCAL_USER, PASSWORD).startswith(b"+OK Logged in")
        assert pop.cmd(b"STLS") == b"-ERR Command not valid in this state"
        assert pop.cmd(b"QUIT").startswith(b"+OK")
    target.still_serves()


def test_a_tls_1_1_client_is_refused_on_both_tls_listeners(
    target: Target, tls_files: TlsFiles
) -> None:
    assert tls_1_1_works_here(tls_files), "this OpenSSL cannot offer TLS 1.1 at all"
    with pytest.raises(ssl.SSLError):
        SocketPop3(target.port("implicit"), tls=tls_1_1_client(tls_files))
    with target.connect("starttls") as pop:
        assert pop.cmd(b"STLS") == b"+OK Begin TLS negotiation now."
        with pytest.raises(ssl.SSLError):
            pop.start_tls(tls_1_1_client(tls_files))
    # The same client allowed TLS 1.2 gets in: the refusal was the version.
    tls_1_2 = tls_1_1_client(tls_files)
    tls_1_2.maximum_version = ssl.TLSVersion.TLSv1_2
    with SocketPop3(target.port("implicit"), tls=tls_1_2) as pop:
        assert pop.greeting.startswith(b"+OK")
        assert pop.sock.version() == "TLSv1.2"  # type: ignore[attr-defined]
    target.still_serves()


@pytest.fixture
def strict_target(
    start: StartServer, dovecot: DovecotServer, mailbox: DovecotUser, corpus: Corpus
) -> Target:
    """As `target`, with allow_plaintext_auth: false (the default)."""
    return Target.start(start, dovecot, mailbox, corpus, allow_plaintext_auth=False)


@pytest.mark.parametrize("kind", ["none", "starttls"])
def test_no_plaintext_credentials_before_tls_unless_allowed(
    strict_target: Target, tls_files: TlsFiles, kind: str
) -> None:
    plain = base64.b64encode(f"\0{LOCAL_USER}\0{PASSWORD}".encode())
    with strict_target.connect(kind) as pop:
        assert pop.cmd(b"CAPA").startswith(b"+OK")
        capabilities = pop.body()
        assert b"USER" not in capabilities
        assert not any(c.startswith(b"SASL") for c in capabilities)
        assert (b"STLS" in capabilities) == (kind == "starttls")
        assert pop.cmd(b"USER " + LOCAL_USER.encode()) == PLAINTEXT_DISALLOWED
        assert pop.cmd(b"PASS " + PASSWORD.encode()) == PLAINTEXT_DISALLOWED
        assert pop.cmd(b"AUTH PLAIN " + plain) == PLAINTEXT_DISALLOWED
        assert pop.cmd(b"AUTH PLAIN") == PLAINTEXT_DISALLOWED
        assert pop.cmd(b"AUTH").startswith(b"+OK")
        assert pop.body() == []  # no mechanism is offered in clear
        if kind == "starttls":
            assert pop.cmd(b"STLS") == b"+OK Begin TLS negotiation now."
            pop.start_tls(tls_files.client_context())
            assert pop.cmd(b"CAPA").startswith(b"+OK")
            capabilities = pop.body()
            assert b"USER" in capabilities and b"SASL PLAIN LOGIN" in capabilities
            assert pop.cmd(b"AUTH PLAIN " + plain).startswith(b"+OK Logged in")
            assert pop.cmd(b"QUIT").startswith(b"+OK")
    with strict_target.connect("implicit", tls=tls_files.client_context()) as pop:
        assert pop.login(LOCAL_USER, PASSWORD).startswith(b"+OK Logged in")
        assert pop.cmd(b"QUIT").startswith(b"+OK")
