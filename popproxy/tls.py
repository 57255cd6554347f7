"""TLS contexts for the listeners (RFC 8314, RFC 2595)."""

from __future__ import annotations

import ssl

from popproxy.config import TlsConfig


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context with TLS 1.2 or later and the configured certificate chain.

    Blocking (reads the files): call it from a worker thread.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996 retires TLS 1.0 and 1.1
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context
