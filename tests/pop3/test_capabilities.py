"""The CAPA list (popproxy.pop3.capabilities, RFC 2449 §§5-6)."""

from __future__ import annotations

from pop3_helpers import run_server

from popproxy.pop3.capabilities import IMPLEMENTATION, capabilities
from popproxy.pop3.commands import Capa, Command, SaslLine
from popproxy.pop3.events import Data, EndOfData
from popproxy.pop3.replies import Ok
from popproxy.pop3.server import Reply, ServerConnection, ServerSettings
from popproxy.pop3.state import Phase

BASE = ["CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]


def test_defaults() -> None:
    assert capabilities(ServerSettings()) == [
        *BASE,
        "USER",
        "SASL PLAIN LOGIN",
        f"IMPLEMENTATION {IMPLEMENTATION}",
    ]


def test_plaintext_not_allowed_lists_neither_user_nor_sasl() -> None:
    caps = capabilities(ServerSettings(plaintext_auth_allowed=False, stls_available=True))
    assert "USER" not in caps
    assert not any(c.startswith("SASL") for c in caps)
    assert "STLS" in caps


def test_stls_only_where_available() -> None:
    assert "STLS" not in capabilities(ServerSettings())
    assert "STLS" in capabilities(ServerSettings(stls_available=True))


def test_expire_and_implementation() -> None:
    caps = capabilities(ServerSettings(), expire="30 USER", implementation=None)
    assert caps[-1] == "EXPIRE 30 USER"
    assert not any(c.startswith("IMPLEMENTATION") for c in caps)
    assert "EXPIRE NEVER" in capabilities(ServerSettings(), expire="NEVER")


def test_several_mechanisms() -> None:
    caps = capabilities(ServerSettings(sasl_mechanisms=("PLAIN",)))
    assert "SASL PLAIN" in caps


def test_after_login_only_what_transaction_allows() -> None:
    """No USER, SASL or STLS once logged in (RFC 2449 §6.3, §6.8, RFC 2595 §4), as
    Dovecot; EXPIRE and IMPLEMENTATION stay."""
    settings = ServerSettings(stls_available=True, plaintext_auth_allowed=True)
    for phase in (Phase.TRANSACTION, Phase.UPDATE):
        caps = capabilities(settings, phase=phase, expire="NEVER")
        assert caps == [*BASE, "EXPIRE NEVER", f"IMPLEMENTATION {IMPLEMENTATION}"]
    before = capabilities(settings, expire="NEVER")
    assert {"STLS", "USER", "SASL PLAIN LOGIN"} <= set(before)


def test_capa_reply_on_the_wire() -> None:
    settings = ServerSettings(plaintext_auth_allowed=False)

    def respond(conn: ServerConnection, command: Command | SaslLine) -> list[Reply]:
        assert command == Capa()
        body = "".join(f"{line}\r\n" for line in capabilities(conn.settings, expire="NEVER"))
        return [Ok("Capability list follows"), Data(body.encode()), EndOfData()]

    run = run_server(b"CAPA\r\n", settings, responder=respond)
    lines = run.replies[1:]
    assert lines[0] == b"+OK Capability list follows\r\n"
    assert lines[-1] == b".\r\n"
    assert b"USER\r\n" not in lines
    assert b"EXPIRE NEVER\r\n" in lines
