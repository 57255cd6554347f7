"""TLS contexts for the listeners and the upstream leg (RFC 8314, RFC 2595).

The context builders are blocking (they read files); ``load_server_tls`` and
``upstream_tls_contexts`` run them in worker threads, for the server at start and
at each reload, and for ``popproxy explain``.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
from dataclasses import dataclass

import trio

from popproxy.config import Config, TlsConfig, TlsMode, UpstreamConfig
from popproxy.tls_hello import (
    NO_APPLICATION_PROTOCOL_ALERT,
    POP3_ALPN,
    Hello,
    HelloVerdict,
    read_client_hello,
)


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context with TLS 1.2 or later and the configured certificate chain.

    Blocking (reads the files): call it from a worker thread.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996 retires TLS 1.0 and 1.1
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # ALPACA: selected when offered; an offer without it is refused by AlpnGuard.
    context.set_alpn_protocols([POP3_ALPN])
    return context


def client_context(upstream: UpstreamConfig) -> ssl.SSLContext:
    """A client context for an upstream: TLS 1.2 or later; certificate and host name
    verified against the system store or ``ca_file`` unless ``verify: false`` was
    written (RFC 8314 §4.1, RFC 6125).

    Blocking (reads the CA files): call it from a worker thread.
    """
    cafile = str(upstream.ca_file) if upstream.ca_file is not None else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # ALPACA: an ALPN-aware upstream can refuse us if it is not a POP3 server; if it
    # selects anything else, upstream_alpn_problem says so and the login stops.
    context.set_alpn_protocols([POP3_ALPN])
    if not upstream.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# The refusal's alert is one small write; a client that does not read it does not hold
# the session up for longer than this.
ALERT_SECONDS = 5.0


def upstream_alpn_problem(selected: str | None) -> str | None:
    """Why an upstream's ALPN answer is refused, or None: no answer (a server without
    ALPN) or ``pop3`` is fine, anything else is another protocol (RFC 7301 §3.2)."""
    if selected is None or selected == POP3_ALPN:
        return None
    return f"the upstream selected ALPN protocol {selected[:40]!r}, not {POP3_ALPN!r}"


class AlpnRefused(trio.BrokenResourceError):
    """The client offered ALPN protocols and none was ``pop3``: the handshake was
    refused. ``offered``: what it offered (None when the hello was too long to read)."""

    def __init__(self, text: str, offered: tuple[bytes, ...] | None = None) -> None:
        super().__init__(text)
        self.offered = offered


class AlpnGuard(trio.abc.Stream):
    """The transport under a listener's TLS handshake (RFC 7301 §3.2, ALPACA): it passes
    every octet through, reads the client's ClientHello on the way
    (:mod:`popproxy.tls_hello`), and if it offers ALPN without ``pop3`` sends the fatal
    ``no_application_protocol`` alert and raises ``AlpnRefused`` instead of passing it
    to OpenSSL. ``hello`` holds the verdict once it is known."""

    def __init__(self, transport: trio.abc.Stream) -> None:
        self.transport = transport
        self.hello = Hello(HelloVerdict.PENDING)
        self._seen = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Receive from the transport; the ClientHello is judged as it passes."""
        data = await self.transport.receive_some(max_bytes)
        if self.hello.verdict is not HelloVerdict.PENDING or not data:
            return data
        self._seen += data
        if len(self._seen) < self.hello.need:
            return data  # parsing again could not get further yet
        self.hello = read_client_hello(bytes(self._seen))
        if self.hello.verdict is HelloVerdict.PENDING:
            return data
        self._seen = bytearray()
        if self.hello.verdict is HelloVerdict.REFUSE:
            with (
                trio.move_on_after(ALERT_SECONDS),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await self.transport.send_all(NO_APPLICATION_PROTOCOL_ALERT)
            raise AlpnRefused(
                "the client offered ALPN protocols, none of them pop3", self.hello.offered
            )
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send through the transport."""
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """As the transport's."""
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the transport."""
        await self.transport.aclose()


class TlsError(Exception):
    """A certificate, key or CA file cannot be loaded (the text names which, never a secret)."""


@dataclass(frozen=True, slots=True)
class LoadedTls:
    """A server TLS context and a digest of the files it was loaded from."""

    context: ssl.SSLContext
    digest: bytes  # sha256 over the certificate and key files: did the contents change?


def load_tls(tls: TlsConfig) -> LoadedTls:
    """Load the certificate chain and key (blocking: run it in a worker thread)."""
    context = server_context(tls)
    digest = hashlib.sha256()
    for path in (tls.cert_file, tls.key_file):
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return LoadedTls(context, digest.digest())


async def load_server_tls(tls: TlsConfig | None) -> LoadedTls | None:
    """The listeners' TLS context, loaded in a worker thread (None without ``tls:``);
    ``TlsError`` if the certificate or key cannot be loaded."""
    if tls is None:
        return None
    try:
        return await trio.to_thread.run_sync(load_tls, tls)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the TLS certificate or key: {exc}") from exc


async def upstream_tls_contexts(config: Config) -> dict[str, ssl.SSLContext]:
    """A client TLS context per upstream that uses TLS, built once in worker threads
    (reads CA files); ``TlsError`` naming the upstream whose CA file cannot be loaded."""
    contexts: dict[str, ssl.SSLContext] = {}
    for name, upstream in config.upstreams.items():
        if upstream.tls is TlsMode.NONE:
            continue
        try:
            contexts[name] = await trio.to_thread.run_sync(client_context, upstream)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load the CA file of upstream {name}: {exc}") from exc
    return contexts
