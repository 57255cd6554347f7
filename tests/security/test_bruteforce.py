"""Brute force against a running popproxy is throttled, then locked out (issue 6).

One address (127.0.0.1) guesses distinct passwords: each failure makes the next attempt
wait longer before its password is even checked (lower bounds the server's own delays
guarantee: no upper bounds on speed), and after ``auth_lockout_failures`` failures the
right password is refused too, with the same reply and no hashing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from integration.harness import USER, ServerProcess, User
from maildirs import make_maildir

from .login_client import login

PASSWORD = "the-right-one"
FAILURE_DELAY = 0.05
PENALTY_INITIAL = 0.2
PENALTY_MAX = 0.8
LOCKOUT_FAILURES = 5
AUTH_FAILED = b"-ERR [AUTH] Authentication failed."
OWNER = "127.0.0.4"  # where the user logs in from (the guessers are elsewhere)


def one_message_maildir(root: Path) -> Path:
    return make_maildir(root, {"1700000001.M1P1.bf": b"Subject: hi\n\nbody\n"})


def start_throttled(start: Callable[..., ServerProcess], tmp_path: Path) -> int:
    server = start(
        users=[User(USER, PASSWORD, one_message_maildir(tmp_path / "Maildir"))],
        listeners=["none"],
        limits={
            "auth_failure_delay_seconds": FAILURE_DELAY,
            "auth_penalty_initial_seconds": PENALTY_INITIAL,
            "auth_penalty_max_seconds": PENALTY_MAX,
            "auth_lockout_failures": LOCKOUT_FAILURES,
            "auth_lockout_window_seconds": 600,
            "auth_lockout_seconds": 600,
        },
    )
    return server.port("none")


def test_brute_force_is_slowed_down_then_locked_out(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    port = start_throttled(start, tmp_path)
    # The owner logs in from an address of her own (a known source of hers is spared
    # the name's lockout: test_lockout_dos.py); the guesser is at 127.0.0.1.
    assert login(port, USER, PASSWORD, source=OWNER).reply.startswith(b"+OK")
    guesses = [login(port, USER, f"guess-{n}") for n in range(LOCKOUT_FAILURES)]
    assert {g.reply for g in guesses} == {AUTH_FAILED}
    # The n-th failure waits the penalty of the n-1 before it, then the failure delay:
    # 0.05, 0.25, 0.45, 0.85, 0.85 s at least.
    for n, guess in enumerate(guesses):
        penalty = 0.0 if n == 0 else min(PENALTY_INITIAL * 2 ** (n - 1), PENALTY_MAX)
        assert guess.seconds >= penalty + FAILURE_DELAY, (n, guess.seconds)
    # Locked out now: the right password gets the failure's reply.
    locked = login(port, USER, PASSWORD)
    assert locked.reply == AUTH_FAILED
    assert locked.seconds >= PENALTY_MAX + FAILURE_DELAY  # refused, but not faster


def test_the_lockout_is_logged_and_counted_and_no_password_is(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start(
        users=[User(USER, PASSWORD, one_message_maildir(tmp_path / "Maildir"))],
        listeners=["none"],
        limits={
            "auth_failure_delay_seconds": 0,
            "auth_penalty_initial_seconds": 0,
            "auth_lockout_address_failures": LOCKOUT_FAILURES,
        },
    )
    port = server.port("none")
    for n in range(LOCKOUT_FAILURES):
        assert login(port, f"sprayed-{n}", "Winter2026!").reply == AUTH_FAILED
    assert login(port, USER, PASSWORD).reply == AUTH_FAILED  # the address is locked
    server.wait_for_log(
        lambda rs: any(r.get("msg") == "login_refused" for r in rs),
        timeout=10,
        what="msg=login_refused",
    )
    (started,) = server.records("login_lockout")
    assert (started["scope"], started["user"]) == ("address", f"sprayed-{LOCKOUT_FAILURES - 1}")
    (refused,) = server.records("login_refused")
    assert (refused["scope"], refused["user"]) == ("address", USER)
    assert PASSWORD not in server.log_text()
    assert "Winter2026" not in server.log_text()


def test_retrying_one_stale_password_never_locks_the_user_out(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A mail client polling with an old password is not mistaken for a guesser."""
    port = start_throttled(start, tmp_path)
    for _ in range(3 * LOCKOUT_FAILURES):
        stale = login(port, USER, "last-years-password")
        assert stale.reply == AUTH_FAILED
    assert login(port, USER, PASSWORD).reply.startswith(b"+OK")
