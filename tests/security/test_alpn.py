"""ALPN on both legs (ALPACA, RFC 7301; issue 18 item 2).

A browser sent to a POP3 port by a cross-protocol attack offers ALPN ``http/1.1``:
both TLS listener kinds refuse that handshake with RFC 7301's fatal alert, while a
client offering ``pop3``, or no ALPN at all, gets in. Upstream, popproxy offers
``pop3`` and logs in through the suite's Dovecot whatever ALPN it answers (none).
"""

from __future__ import annotations

import ssl

import pytest
from integration.dovecot import DovecotServer
from integration.harness import PASSWORD, TlsFiles
from pop3client import SocketPop3

from .probe import LOCAL_USER, Target


def client(tls_files: TlsFiles, alpn: list[str] | None) -> ssl.SSLContext:
    context = tls_files.client_context()
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def open_tls(target: Target, kind: str, context: ssl.SSLContext) -> SocketPop3:
    """A session on the implicit TLS listener, or on the STLS one after STLS."""
    if kind == "implicit":
        return SocketPop3(target.port("implicit"), tls=context)
    pop = target.connect("starttls")
    try:
        assert pop.cmd(b"STLS") == b"+OK Begin TLS negotiation now."
        pop.start_tls(context)
    except BaseException:
        pop.close()
        raise
    return pop


@pytest.mark.parametrize("kind", ["implicit", "starttls"])
@pytest.mark.parametrize("alpn", [["http/1.1"], ["h2", "http/1.1"]], ids=["http1", "h2-http1"])
def test_a_client_offering_alpn_without_pop3_is_refused(
    target: Target, tls_files: TlsFiles, kind: str, alpn: list[str]
) -> None:
    before = len(target.server.records("tls_alpn_refused"))
    with pytest.raises(ssl.SSLError, match="no application protocol"):
        open_tls(target, kind, client(tls_files, alpn)).close()
    target.server.wait_for_log(
        lambda rs: len([r for r in rs if r.get("msg") == "tls_alpn_refused"]) > before,
        timeout=10,
        what="msg=tls_alpn_refused",
    )
    refused = target.server.records("tls_alpn_refused")[-1]
    assert refused["offered"] == ",".join(alpn)
    target.still_serves()


@pytest.mark.parametrize("kind", ["implicit", "starttls"])
@pytest.mark.parametrize(
    ("alpn", "selected"),
    [(None, None), (["pop3"], "pop3"), (["http/1.1", "pop3"], "pop3")],
    ids=["none", "pop3", "http1-and-pop3"],
)
def test_a_client_offering_pop3_or_no_alpn_logs_in(
    target: Target, tls_files: TlsFiles, kind: str, alpn: list[str] | None, selected: str | None
) -> None:
    with open_tls(target, kind, client(tls_files, alpn)) as pop:
        assert pop.sock.selected_alpn_protocol() == selected  # type: ignore[attr-defined]
        if kind == "implicit":
            assert pop.greeting.startswith(b"+OK")
        assert pop.login(LOCAL_USER, PASSWORD).startswith(b"+OK Logged in")
        assert pop.cmd(b"QUIT").startswith(b"+OK")


@pytest.mark.parametrize("kind", ["implicit", "starttls"])
def test_the_upstream_leg_offers_pop3_and_dovecot_answers_no_alpn(
    dovecot: DovecotServer, target: Target, kind: str
) -> None:
    """What the suite's Dovecot answers to popproxy's offer (none: it has no ALPN for
    POP3), and popproxy logs in through it (target's upstream is Dovecot's STLS port)."""
    context = dovecot.ssl_context()
    context.set_alpn_protocols(["pop3"])
    host, port = dovecot.endpoint(kind)
    with SocketPop3(port, host=host, tls=context if kind == "implicit" else None) as pop:
        if kind == "starttls":
            assert pop.cmd(b"STLS").startswith(b"+OK")
            pop.start_tls(context)
        assert pop.sock.selected_alpn_protocol() is None  # type: ignore[attr-defined]
    target.still_serves()
