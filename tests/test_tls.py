"""TLS contexts loaded in worker threads; a file that cannot be loaded is a TlsError.
ALPN (ALPACA): a listener refuses a client offering ALPN without pop3, the upstream
leg offers pop3 and takes pop3 or no answer."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from popproxy.config import Config, LimitsConfig, StateConfig, TlsConfig, TlsMode, UpstreamConfig
from popproxy.tls import (
    AlpnGuard,
    AlpnRefused,
    TlsError,
    client_context,
    load_server_tls,
    server_context,
    upstream_alpn_problem,
    upstream_tls_contexts,
)
from popproxy.tls_hello import NO_APPLICATION_PROTOCOL_ALERT, HelloVerdict


def config(upstreams: dict[str, UpstreamConfig]) -> Config:
    return Config(
        source=Path("test.yaml"),
        listen=(),
        tls=None,
        allow_plaintext_auth=True,
        upstreams=upstreams,
        users={},
        state=StateConfig(),
        rules_dir=None,
        metrics=None,
        limits=LimitsConfig(),
    )


async def test_no_tls_section_no_server_context() -> None:
    assert await load_server_tls(None) is None


async def test_a_missing_certificate_is_a_tls_error(tmp_path: Path) -> None:
    missing = TlsConfig(tmp_path / "cert.pem", tmp_path / "key.pem")
    with pytest.raises(TlsError, match=r"^cannot load the TLS certificate or key: "):
        await load_server_tls(missing)


async def test_one_client_context_per_upstream_that_uses_tls(tmp_path: Path) -> None:
    plain = UpstreamConfig("plain", "pop.example.net", 110, TlsMode.NONE)
    implicit = UpstreamConfig("implicit", "pop.example.net", 995, TlsMode.IMPLICIT)
    contexts = await upstream_tls_contexts(config({"plain": plain, "implicit": implicit}))
    assert set(contexts) == {"implicit"}
    bad = UpstreamConfig(
        "bad", "pop.example.net", 995, TlsMode.IMPLICIT, ca_file=tmp_path / "no.pem"
    )
    with pytest.raises(TlsError, match=r"^cannot load the CA file of upstream bad: "):
        await upstream_tls_contexts(config({"bad": bad}))


# -- ALPN (ALPACA, RFC 7301) ---------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def listener_context(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    """The listeners' context, built by server_context from files as at start."""
    cert = ca.issue_cert("localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return server_context(TlsConfig(cert_file, key_file))


async def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[AlpnGuard, object, object]:
    """One handshake over a memory stream pair, the server behind an AlpnGuard: the
    guard, and what each side got (its stream's selected protocol, or its exception)."""
    left, right = trio.testing.memory_stream_pair()
    guard = AlpnGuard(left)
    server_tls = trio.SSLStream(guard, server, server_side=True)
    client_tls = trio.SSLStream(right, client, server_hostname="localhost")
    outcome: dict[str, object] = {}

    async def side(name: str, stream: trio.SSLStream[Any]) -> None:
        try:
            await stream.do_handshake()
            outcome[name] = stream.selected_alpn_protocol()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            outcome[name] = exc
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "server", server_tls)
        nursery.start_soon(side, "client", client_tls)
    return guard, outcome["server"], outcome["client"]


def alpn_client(ca: trustme.CA, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


@pytest.mark.parametrize(
    ("alpn", "selected"), [(None, None), (["pop3"], "pop3"), (["http/1.1", "pop3"], "pop3")]
)
async def test_a_listener_accepts_pop3_or_no_alpn(
    ca: trustme.CA, tmp_path: Path, alpn: list[str] | None, selected: str | None
) -> None:
    guard, server, client = await handshake(listener_context(ca, tmp_path), alpn_client(ca, alpn))
    assert (server, client) == (selected, selected)
    assert guard.hello.verdict is HelloVerdict.ACCEPT


@pytest.mark.parametrize("alpn", [["http/1.1"], ["h2", "http/1.1"], ["imap"]])
async def test_a_listener_refuses_alpn_without_pop3_with_the_alert(
    ca: trustme.CA, tmp_path: Path, alpn: list[str]
) -> None:
    guard, server, client = await handshake(listener_context(ca, tmp_path), alpn_client(ca, alpn))
    assert isinstance(server, AlpnRefused)
    assert guard.hello.offered == tuple(a.encode() for a in alpn)
    # The client hears RFC 7301's fatal alert, not a POP3 greeting or a finished handshake.
    assert isinstance(client, trio.BrokenResourceError)
    assert isinstance(client.__cause__, ssl.SSLError)
    assert "alert no application protocol" in str(client.__cause__)


async def test_a_client_hello_sent_octet_by_octet_is_refused_all_the_same(
    ca: trustme.CA, tmp_path: Path
) -> None:
    flight = client_hello_of(alpn_client(ca, ["http/1.1"]))
    left, right = trio.testing.memory_stream_pair()
    guard = AlpnGuard(left)
    for octet in flight[:-1]:
        await right.send_all(bytes([octet]))
        assert await guard.receive_some() == bytes([octet])
    await right.send_all(flight[-1:])
    with pytest.raises(AlpnRefused):
        await guard.receive_some()
    assert await right.receive_some() == NO_APPLICATION_PROTOCOL_ALERT


def client_hello_of(context: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    ("server_alpn", "selected"), [(None, None), (["pop3"], "pop3"), (["http/1.1"], None)]
)
async def test_the_upstream_leg_offers_pop3_and_takes_pop3_or_nothing(
    ca: trustme.CA, server_alpn: list[str] | None, selected: str | None
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    if server_alpn is not None:
        server.set_alpn_protocols(server_alpn)
    client = client_context(
        UpstreamConfig("up", "localhost", 995, TlsMode.IMPLICIT, ca_file=ca_file(ca))
    )
    left, right = trio.testing.memory_stream_pair()
    server_tls = trio.SSLStream(left, server, server_side=True)
    client_tls = trio.SSLStream(right, client, server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_tls.do_handshake)
        nursery.start_soon(client_tls.do_handshake)
    assert client_tls.selected_alpn_protocol() == selected
    # An OpenSSL server with no protocol in common answers nothing (CPython's NOACK).
    assert upstream_alpn_problem(client_tls.selected_alpn_protocol()) is None


def ca_file(ca: trustme.CA) -> Path:
    path = Path(tempfile.mkdtemp()) / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def test_an_upstream_answering_another_protocol_is_refused() -> None:
    assert upstream_alpn_problem(None) is None
    assert upstream_alpn_problem("pop3") is None
    problem = upstream_alpn_problem("http/1.1")
    assert problem == "the upstream selected ALPN protocol 'http/1.1', not 'pop3'"
