"""An unknown user and a wrong password are indistinguishable to a client (issue 6).

Against a running popproxy on loopback: the same replies to USER, PASS and AUTH PLAIN,
the same lockout behaviour, and, within a stated bound, the same time. The time check
compares medians of interleaved attempts with each other, and the bound with the cost
of one hash measured in this process; it sets no absolute speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from integration.harness import USER, ServerProcess, User

from popproxy.auth.passwords import hash_password, verify_password
from popproxy.secret import Secret

from .login_client import Attempt, login
from .test_bruteforce import AUTH_FAILED, PASSWORD, one_message_maildir

UNKNOWN = "no-such-user"
FAILURE_DELAY = 0.05
ROUNDS = 15
# The user's hash costs real work here (ln=13: 8 MiB, tens of milliseconds), so an
# unknown user answered without the dummy hash would be one hash faster.
TIMED_HASH_LN = 13


def start_server(
    start: Callable[..., ServerProcess], tmp_path: Path, hash_ln: int = 4, **limits: float
) -> ServerProcess:
    return start(
        users=[User(USER, PASSWORD, one_message_maildir(tmp_path / "Maildir"), hash_ln)],
        listeners=["none"],
        limits={"auth_failure_delay_seconds": FAILURE_DELAY, **limits},
    )


def test_replies_are_identical(start: Callable[..., ServerProcess], tmp_path: Path) -> None:
    port = start_server(start, tmp_path, auth_penalty_initial_seconds=0).port("none")
    for plain in (False, True):
        wrong = login(port, USER, "wrong", plain=plain)
        unknown = login(port, UNKNOWN, "wrong", plain=plain)
        assert (wrong.user_reply, wrong.reply) == (unknown.user_reply, unknown.reply)
        assert wrong.reply == AUTH_FAILED


def hash_seconds(ln: int) -> float:
    """The median time of one scrypt check at cost ``ln`` in this process."""
    phc = hash_password(Secret.from_str("x"), ln=ln)
    times = []
    for _ in range(5):
        start = time.monotonic()
        verify_password(phc, Secret.from_str("y"))
        times.append(time.monotonic() - start)
    return statistics.median(times)


def test_times_are_alike_within_a_bound(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The difference of the medians is under half a hash: a server that skipped the
    dummy hash for unknown users (or any other step as long) fails this."""
    # No penalty and no lockout, so every attempt meets the same delays; interleaved,
    # so load on the machine falls on both sides alike.
    server = start_server(
        start,
        tmp_path,
        TIMED_HASH_LN,
        auth_penalty_initial_seconds=0,
        auth_lockout_failures=0,
    )
    port = server.port("none")
    bound = hash_seconds(TIMED_HASH_LN) / 2
    wrong: list[Attempt] = []
    unknown: list[Attempt] = []
    for n in range(ROUNDS):
        wrong.append(login(port, USER, f"wrong-{n}"))
        unknown.append(login(port, UNKNOWN, f"wrong-{n}"))
    assert {a.reply for a in wrong + unknown} == {AUTH_FAILED}
    assert min(a.seconds for a in wrong + unknown) >= FAILURE_DELAY
    wrong_median = statistics.median(a.seconds for a in wrong)
    unknown_median = statistics.median(a.seconds for a in unknown)
    assert abs(wrong_median - unknown_median) < bound, (wrong_median, unknown_median, bound)


def test_lockout_looks_the_same_for_an_existing_and_an_unknown_user(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Each name against a server of its own, so neither inherits the other's record."""
    lockout = 3
    seen = {}
    for user in (USER, UNKNOWN):
        server = start_server(
            start, tmp_path / user, auth_penalty_initial_seconds=0, auth_lockout_failures=lockout
        )
        port = server.port("none")
        replies = [login(port, user, f"guess-{n}").reply for n in range(lockout)]
        replies.append(login(port, user, PASSWORD).reply)  # right for USER, locked for both
        server.wait_for_log(
            lambda rs: any(r.get("msg") == "login_refused" for r in rs),
            timeout=10,
            what="msg=login_refused",
        )
        started = sorted((r["scope"], r["user"]) for r in server.records("login_lockout"))
        seen[user] = (replies, [scope for scope, _ in started], {name for _, name in started})
    assert seen[USER][:2] == seen[UNKNOWN][:2] == ([AUTH_FAILED] * (lockout + 1), ["user"])
    assert (seen[USER][2], seen[UNKNOWN][2]) == ({USER}, {UNKNOWN})
