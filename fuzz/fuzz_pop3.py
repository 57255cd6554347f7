"""Coverage-guided fuzz target for the sans-IO core (atheris, for long runs).

The first input byte picks a target, the rest is the peer's octets, fed in chunks
whose sizes come from the input too:

- 0: the server role (the command and SASL parsers), answering every command;
- 1: the client role (the reply parser) with a FIFO of pipelined commands;
- 2: the dot-unstuffer and the relay's scanner, which must agree, and no line the
  scanner passes on may read as a terminator.

Any input must give events or ``RemoteProtocolError``; anything else (another
exception, an unbounded buffer, the two decoders disagreeing) is a finding.
See fuzz/README.md for how to run it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from popproxy.pop3.client import ClientConnection
    from popproxy.pop3.commands import (
        Auth,
        Capa,
        List,
        Noop,
        Retr,
        SaslResponse,
        Top,
        Uidl,
        multiline_on_ok,
    )
    from popproxy.pop3.dotstuff import DotUnstuffer, StuffedBodyScanner
    from popproxy.pop3.errors import RemoteProtocolError
    from popproxy.pop3.events import NEED_DATA, ConnectionClosed, Data, EndOfData, SaslChallenge
    from popproxy.pop3.limits import MAX_REPLY_LINE_OCTETS, MAX_SASL_LINE_OCTETS
    from popproxy.pop3.replies import Err, Ok
    from popproxy.pop3.server import ServerConnection, ServerSettings
    from popproxy.pop3.state import Phase

# How many chunks one input is cut into at most (the sizes come from the input).
MAX_CHUNKS = 16


def _chunks(fdp: atheris.FuzzedDataProvider) -> list[bytes]:
    cuts = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, MAX_CHUNKS))]
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    out, at = [], 0
    for size in cuts:
        out.append(data[at : at + size])
        at += size
    out.append(data[at:])
    return [c for c in out if c]


def _server(fdp: atheris.FuzzedDataProvider) -> None:
    settings = ServerSettings(
        stls_available=fdp.ConsumeBool(), plaintext_auth_allowed=fdp.ConsumeBool()
    )
    conn = ServerConnection(settings)
    conn.send(Ok("ready"))
    for chunk in [*_chunks(fdp), b""]:
        conn.receive_data(chunk)
        while conn.phase is not Phase.CLOSED:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                conn.send(exc.reply)
                continue
            if event is NEED_DATA:
                assert conn.buffered < MAX_SASL_LINE_OCTETS
                break
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, SaslResponse) or (
                isinstance(event, Auth) and event.mechanism is not None
            ):
                conn.send(SaslChallenge(b""))
            elif multiline_on_ok(event):
                conn.send(Ok())
                conn.send(Data(b"x\r\n"))
                conn.send(EndOfData())
            else:
                conn.send(Err("no"))
            if conn.phase is Phase.TLS_HANDSHAKE:
                conn.tls_established(settings)


def _client(fdp: atheris.FuzzedDataProvider) -> None:
    conn = ClientConnection()
    for command in (Capa(), List(), Retr(1), Top(1, 2), Uidl(), Noop()):
        conn.send(command, stuffed_body=fdp.ConsumeBool())
    for chunk in [*_chunks(fdp), b""]:
        conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                assert exc.fatal
                return
            if event is NEED_DATA:
                assert conn.buffered < MAX_REPLY_LINE_OCTETS
                break
            if isinstance(event, ConnectionClosed):
                return


def _decode(
    decoder: DotUnstuffer | StuffedBodyScanner, chunks: list[bytes]
) -> tuple[bool, bytes, bytes]:
    buf = bytearray()
    out = bytearray()
    for chunk in chunks:
        buf += chunk
        if not decoder.done:
            out += decoder.feed(buf)
    return decoder.done, bytes(buf), bytes(out)


def _dotstuff(fdp: atheris.FuzzedDataProvider) -> None:
    chunks = _chunks(fdp)
    scanned = _decode(StuffedBodyScanner(), chunks)
    decoded = _decode(DotUnstuffer(), chunks)
    # Both end the body at the same octet (or neither has ended it), and un-stuffing what
    # the relay passes on gives what decoding gives.
    assert scanned[0] == decoded[0], (scanned, decoded)
    if scanned[0]:
        assert scanned[1] == decoded[1]
        assert _decode(DotUnstuffer(), [scanned[2] + b".\r\n"])[2] == decoded[2]
    # No line the relay passes on is a dot followed by a line end (a lone "." line).
    lines = (b"\n" + scanned[2]).split(b"\n")[1:-1]
    assert b"." not in lines and b".\r" not in lines, scanned


TARGETS = (_server, _client, _dotstuff)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    TARGETS[fdp.ConsumeIntInRange(0, len(TARGETS) - 1)](fdp)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
