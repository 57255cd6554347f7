"""Property tests of whole sessions: any command sequence, pipelined, then QUIT or EOF.

Whatever a client sends, the session answers every command it reads with exactly
one reply, in order, never crashes, and the Maildir loses exactly the messages whose
DELE the client was told succeeded (and RSET did not undo), and only when QUIT got
``+OK`` after login (DESIGN.md invariants 1, 2 and 5).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from maildirs import make_maildir
from pop3client import Pop3Client
from test_session import MESSAGES, make_context, remaining

from popproxy.outcomes import SessionResult
from popproxy.peer import PeerAddress
from popproxy.session import Session

NUMBERS = [b"0", b"1", b"2", b"3", b"4", b"-1", b"x", b"01", b"99999999999", b""]
SIMPLE = [
    b"STAT", b"LIST", b"UIDL", b"NOOP", b"RSET", b"CAPA", b"AUTH", b"STLS", b"USER demo",
    b"USER nobody", b"PASS secret", b"PASS wrong", b"APOP demo " + b"0" * 32, b"", b"quit",
]  # fmt: skip
# The commands that change what QUIT deletes, drawn often enough to meet each other.
MARKING = [b"DELE 1", b"DELE 2", b"DELE 3", b"RSET", b"RETR 2", b"TOP 3 1"]
COMMAND = st.one_of(
    st.sampled_from(MARKING),
    st.sampled_from(SIMPLE),
    st.builds(
        lambda verb, n: verb + b" " + n,
        st.sampled_from([b"RETR", b"DELE", b"LIST", b"UIDL", b"TOP"]),
        st.sampled_from(NUMBERS),
    ),
    st.builds(
        lambda n, m: b"TOP " + n + b" " + m, st.sampled_from(NUMBERS), st.sampled_from(NUMBERS)
    ),
    # An unknown verb (no POP3 verb starts with X) with arbitrary bytes behind it.
    st.binary(max_size=300).map(lambda b: b"X" + b.replace(b"\n", b"").replace(b"\r", b"")),
)
# A login somewhere near the start, so most examples reach TRANSACTION.
SEQUENCE = st.tuples(
    st.lists(COMMAND, max_size=4),
    st.sampled_from([True, True, True, False]),  # logs in
    st.lists(COMMAND, max_size=25),
    st.sampled_from(["quit", "quit", "eof"]),
)

# Max examples: each one is a whole session with a Maildir on disk and a real hash.
EXAMPLES = 300


def multiline(line: bytes) -> bool:
    """Whether a +OK to ``line`` is followed by a body (RFC 1939 §3), from its words."""
    words = line.rstrip(b" ").split(b" ")  # trailing spaces are tolerated
    verb = words[0].upper()
    return verb in (b"CAPA", b"RETR", b"TOP") or (
        verb in (b"LIST", b"UIDL", b"AUTH") and len(words) == 1
    )


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(sequence=SEQUENCE)
@example(sequence=([], True, [b"DELE 1", b"RSET", b"DELE 2", b"RETR 3"], "quit"))
@example(sequence=([], True, [b"DELE 1", b"DELE 3"], "eof"))
@example(sequence=([b"DELE 1"], True, [b"DELE 2", b"XX"] + [b"BAD"] * 12, "quit"))
async def test_any_session_deletes_exactly_what_was_marked_and_only_on_quit(
    sequence: tuple[list[bytes], bool, list[bytes], str],
) -> None:
    before, login, after, ending = sequence
    lines = [*before, *([b"USER demo", b"PASS secret"] if login else []), *after]
    if ending == "quit":
        lines.append(b"QUIT")
    with tempfile.TemporaryDirectory() as tmp:
        maildir = make_maildir(Path(tmp) / "Maildir", MESSAGES)
        names = sorted(MESSAGES)
        client, server = trio.testing.memory_stream_pair()
        session = Session(server, PeerAddress("192.0.2.1", 1), make_context(maildir))
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                reader = Pop3Client(client)
                assert (await reader.next_line() or b"").startswith(b"+OK")
                await client.send_all(b"".join(line + b"\r\n" for line in lines))
                if ending == "eof":
                    await client.send_eof()
                logged_in, marked, quit_ok, answered = False, set(), False, 0
                for line in lines:
                    reply = await reader.next_line()
                    if reply is None:
                        break  # the session closed (bad-command budget, STLS rule)
                    answered += 1
                    ok = reply.startswith(b"+OK")
                    assert ok or reply.startswith(b"-ERR"), (line, reply)
                    if ok and multiline(line):
                        assert await reader.next_body_lines() is not None, line
                    verb, _, arg = line.partition(b" ")
                    match verb.upper(), ok:
                        case b"PASS", True:
                            logged_in = True
                        case b"DELE", True:
                            marked.add(names[int(arg) - 1])
                        case b"RSET", True:
                            marked.clear()
                        case b"QUIT", True:
                            quit_ok = logged_in
                await client.aclose()
        assert answered == len(lines) or session.summary.result in (
            SessionResult.PROTOCOL_ERROR,  # bad-command budget, or bytes behind STLS
            SessionResult.QUIT,  # a QUIT in the middle ends it
        )
        if quit_ok:
            assert session.summary.result is SessionResult.QUIT
            assert remaining(maildir) == set(names) - marked
        else:
            assert remaining(maildir) == set(names)
