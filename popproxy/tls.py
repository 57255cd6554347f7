"""TLS contexts for the listeners and the upstream leg (RFC 8314, RFC 2595)."""

from __future__ import annotations

import ssl

from popproxy.config import TlsConfig, UpstreamConfig


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context with TLS 1.2 or later and the configured certificate chain.

    Blocking (reads the files): call it from a worker thread.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996 retires TLS 1.0 and 1.1
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
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
    if not upstream.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
