"""Sessions over a real loopback TCP connection on popproxy's ``TcpStream`` (the stream
``serve.py`` gives every plain session, popproxy/socket_stream.py), where a write or
read the kernel completes at once costs no cancel scope: the deadlines still hold.
A client that never reads is cut off at the send deadline; a silent one at the idle
deadline. Times are virtual (autojump_clock)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path

import trio
import trio.testing
from maildirs import make_maildir
from pop3client import Pop3Client
from test_session import LIMITS, login, make_context, session_client
from test_socket_stream import tcp_pair

from popproxy.outcomes import SessionResult
from popproxy.peer import PeerAddress
from popproxy.session import Session

# Small kernel buffers on both ends, so that the message below cannot fit in them.
BUFFER_BYTES = 16 * 1024
MESSAGE_BYTES = 4 * 1024 * 1024
BIG = "1700000009.M9P1.test"


@contextlib.asynccontextmanager
async def logged_in_over_tcp(
    maildir: Path, clock: trio.testing.MockClock
) -> AsyncIterator[tuple[Session, Pop3Client, trio.Event]]:
    """A session on the server end of ``tcp_pair``, its client logged in: (the
    session, the client, an event set once ``Session.run`` returned). The clock
    stands still until the caller lets it jump."""
    client_stream, server_stream = tcp_pair(BUFFER_BYTES)
    session = Session(server_stream, PeerAddress("192.0.2.1", 1), make_context(maildir))
    done = trio.Event()

    async def run() -> None:
        await session.run()
        done.set()

    async with client_stream, trio.open_nursery() as nursery:
        # The hash and the Maildir listing run in worker threads: keep the clock still
        # until they are done, or it would jump to the client's own read deadline.
        clock.autojump_threshold = math.inf
        nursery.start_soon(run)
        client = session_client(client_stream)
        assert (await client.line()).startswith(b"+OK")
        await login(client)
        yield session, client, done


async def test_a_client_that_never_reads_is_cut_off_at_the_send_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    line = b"x" * 998 + b"\n"
    maildir = make_maildir(
        tmp_path / "Maildir",
        {
            "1700000001.M1P1.test": b"Subject: one\n\nfirst body\n",
            "1700000002.M2P1.test": b"Subject: two\n\nsecond\n",
            BIG: b"Subject: big\n\n" + line * (MESSAGE_BYTES // len(line)),
        },
    )
    async with logged_in_over_tcp(maildir, autojump_clock) as (session, client, done):
        await client.send(b"RETR 3\r\n")  # and never read again
        autojump_clock.autojump_threshold = 0
        before = trio.current_time()
        await done.wait()
        elapsed = trio.current_time() - before
    timeout = LIMITS.send_timeout_seconds
    assert timeout <= elapsed < timeout + 1
    summary = session.summary
    assert summary.result is SessionResult.TIMEOUT
    assert 0 < summary.bytes_out < MESSAGE_BYTES  # cut off mid-message


async def test_a_silent_logged_in_client_is_cut_off_at_the_idle_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    maildir = make_maildir(
        tmp_path / "Maildir",
        {
            "1700000001.M1P1.test": b"Subject: one\n\nfirst body\n",
            "1700000002.M2P1.test": b"Subject: two\n\nsecond\n",
            "1700000003.M3P1.test": b"Subject: three\n\nthird\n",
        },
    )
    async with logged_in_over_tcp(maildir, autojump_clock) as (session, client, done):
        # Answered at once, many times in a row: the fast path keeps every deadline.
        for _ in range(50):
            assert await client.cmd("NOOP") == b"+OK"
        autojump_clock.autojump_threshold = 0
        before = trio.current_time()
        await done.wait()
        elapsed = trio.current_time() - before
        assert await client.line() == b"-ERR Disconnected for inactivity."
    assert LIMITS.idle_timeout_seconds <= elapsed < LIMITS.idle_timeout_seconds + 1
    assert session.summary.result is SessionResult.TIMEOUT
