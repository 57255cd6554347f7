"""500 pipelined commands in one write are answered in order, one reply each
(RFC 2449 §6.6), through the proxy to Dovecot."""

from __future__ import annotations

import itertools

from integration.harness import PASSWORD

from .probe import LOCAL_USER, Target

PIPELINED_COMMANDS = 500


def test_500_pipelined_commands_are_answered_in_order(target: Target) -> None:
    with target.connect() as pop:
        # What each reply must be, from a session that sends one command at a time.
        assert pop.login(LOCAL_USER, PASSWORD).startswith(b"+OK Logged in")
        stat = pop.cmd(b"STAT")
        count = int(stat.split()[1])
        listing = {n: pop.cmd(b"LIST %d" % n) for n in range(1, count + 1)}
        uids = {n: pop.cmd(b"UIDL %d" % n) for n in range(1, count + 1)}
        assert pop.cmd(b"LIST").startswith(b"+OK")
        full_listing = pop.body()
        assert pop.cmd(b"QUIT").startswith(b"+OK")

    # (command, expected status line, expected body lines or None for a one-line reply)
    script: list[tuple[bytes, bytes | None, list[bytes] | None]] = [
        (b"USER " + LOCAL_USER.encode(), b"+OK", None),
        (b"PASS " + PASSWORD.encode(), None, None),  # "+OK Logged in, ..."
    ]
    cycle = itertools.cycle(range(6))
    n = itertools.cycle(range(1, count + 1))
    while len(script) < PIPELINED_COMMANDS - 1:
        match next(cycle):
            case 0:
                script.append((b"NOOP", b"+OK", None))
            case 1:
                script.append((b"STAT", stat, None))
            case 2:
                k = next(n)
                script.append((b"LIST %d" % k, listing[k], None))
            case 3:
                k = next(n)
                script.append((b"UIDL %d" % k, uids[k], None))
            case 4:
                script.append((b"RETR 99", b"-ERR There's no message with that number.", None))
            case _:
                script.append((b"LIST", None, full_listing))
    script.append((b"QUIT", b"+OK Logging out, 0 messages deleted.", None))
    assert len(script) == PIPELINED_COMMANDS

    with target.connect() as pop:
        pop.send(b"".join(command + b"\r\n" for command, _, _ in script))
        statuses = 0
        for command, status, body in script:
            line = pop.line()
            statuses += 1
            if status is not None:
                assert line == status, (statuses, command, line)
            else:
                assert line.startswith(b"+OK"), (statuses, command, line)
            if body is not None:
                assert pop.body() == body, (statuses, command)
        assert pop.rest_until_closed() == b""  # nothing more: exactly one reply each
    assert statuses == PIPELINED_COMMANDS
    target.still_serves()
