"""The CAPA list (RFC 2449 §5, §6) for a session's current state."""

from __future__ import annotations

from popproxy.pop3.server import ServerSettings
from popproxy.pop3.state import Phase

IMPLEMENTATION = "popproxy"


def capabilities(
    settings: ServerSettings,
    *,
    phase: Phase = Phase.AUTHORIZATION,
    expire: str | None = None,
    implementation: str | None = IMPLEMENTATION,
) -> list[str]:
    """Capability lines, one per entry, without line ends (RFC 2449 §6).

    USER and SASL (PLAIN, LOGIN) are listed only where plaintext credentials are
    allowed (RFC 2595 §4), STLS only where the listener can start TLS, and none of
    the three once logged in: they are valid in AUTHORIZATION only (RFC 2449 §6.3,
    §6.8; RFC 2595 §4), and Dovecot drops them too. ``expire`` is the
    EXPIRE argument computed by the caller, e.g. ``"NEVER"``, ``"0"``,
    ``"30 USER"`` (RFC 2449 §6.7).
    """
    lines = ["CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]
    authorizing = phase is Phase.AUTHORIZATION
    if authorizing and settings.stls_available:
        lines.append("STLS")
    if authorizing and settings.plaintext_auth_allowed:
        lines.append("USER")
        lines.append("SASL " + " ".join(settings.sasl_mechanisms))
    if expire is not None:
        lines.append(f"EXPIRE {expire}")
    if implementation:
        lines.append(f"IMPLEMENTATION {implementation}")
    return lines
