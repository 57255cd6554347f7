"""A client that drips its login a byte at a time is closed by the pre-auth deadline:
the drip does not extend it (limits.login_timeout_seconds, docs/security.md)."""

from __future__ import annotations

import socket
import time

from integration.conftest import StartServer
from integration.dovecot import DovecotServer, DovecotUser
from integration.harness import LOOPBACK, PASSWORD, Corpus

from .probe import LOCAL_USER, Target

LOGIN_TIMEOUT_SECONDS = 2.0
DRIP_INTERVAL_SECONDS = 0.2
# Slack for the server's wake-up on a loaded machine; the drip would take far longer.
CLOSE_SLACK_SECONDS = 3.0
# The test gives up (and fails) after this long.
TEST_DEADLINE_SECONDS = 20.0


def test_a_byte_by_byte_drip_is_closed_by_the_login_deadline(
    start: StartServer, dovecot: DovecotServer, mailbox: DovecotUser, corpus: Corpus
) -> None:
    target = Target.start(
        start, dovecot, mailbox, corpus, limits={"login_timeout_seconds": LOGIN_TIMEOUT_SECONDS}
    )
    drip = b"CAPA\r\nUSER " + LOCAL_USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n"
    # Dripped whole, this would take several times the login deadline.
    assert len(drip) * DRIP_INTERVAL_SECONDS > 4 * LOGIN_TIMEOUT_SECONDS
    with socket.create_connection((LOOPBACK, target.port()), timeout=5) as sock:
        connected = time.monotonic()
        sock.settimeout(DRIP_INTERVAL_SECONDS)
        received = bytearray()
        sent = 0
        closed_at = None
        while time.monotonic() - connected < TEST_DEADLINE_SECONDS:
            if sent < len(drip):
                try:
                    sock.send(drip[sent : sent + 1])
                    sent += 1
                except OSError:
                    pass  # closed: the next recv says so
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                closed_at = time.monotonic()
                break
            received += data
    assert closed_at is not None, f"not closed within {TEST_DEADLINE_SECONDS} s: {received!r}"
    elapsed = closed_at - connected
    assert elapsed >= LOGIN_TIMEOUT_SECONDS - DRIP_INTERVAL_SECONDS
    assert elapsed < LOGIN_TIMEOUT_SECONDS + CLOSE_SLACK_SECONDS
    lines = bytes(received).split(b"\r\n")
    assert lines[0].startswith(b"+OK")  # the greeting
    assert lines[-2:] == [b"-ERR [SYS/TEMP] Disconnected: login timeout.", b""]
    assert sent < len(drip)
    target.still_serves()
