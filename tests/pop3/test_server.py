"""The server role of the sans-IO core (popproxy.pop3.server)."""

from __future__ import annotations

import pytest

from popproxy.pop3.commands import Auth
from popproxy.pop3.errors import RemoteProtocolError
from popproxy.pop3.events import Data, EndOfData
from popproxy.pop3.replies import Ok
from popproxy.pop3.server import ServerConnection
from popproxy.pop3.state import Phase


def test_bare_auth_lists_mechanisms_and_logs_nobody_in() -> None:
    conn = ServerConnection()
    conn.send(Ok("ready"))
    conn.receive_data(b"AUTH\r\nSTAT\r\n")
    assert conn.next_event() == Auth()
    conn.send(Ok("mechanisms follow"))
    conn.send(Data(b"PLAIN\r\n"))
    conn.send(EndOfData())
    assert conn.phase is Phase.AUTHORIZATION
    with pytest.raises(RemoteProtocolError) as raised:
        conn.next_event()
    assert raised.value.reply.text == "Command not valid in this state"
