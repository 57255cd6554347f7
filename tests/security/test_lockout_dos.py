"""The user-name lockout is no denial-of-service weapon (issue 18 item 1, DESIGN.md
invariant 8), against a running popproxy.

An attacker who knows a user name can lock it out with a few wrong guesses from any
address. The owner's known-good sources (the addresses, IPv6 by /64, she logged in
from within ``limits.auth_known_source_days``, kept in the state store) are spared that
lockout: alice at 127.0.0.1 still gets in at once. Nothing else changes: a new address
stays locked out for the whole lockout, and a guesser at alice's own address is still
slowed down by the address penalty and stopped by the address lockout. The memory
survives a restart (the state store). Clients connect from 127.0.0.x to the server on
127.0.0.1 (Linux routes the whole 127/8 to loopback).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from integration.harness import USER, ServerProcess, User

from .login_client import login
from .test_bruteforce import (
    AUTH_FAILED,
    FAILURE_DELAY,
    PASSWORD,
    PENALTY_INITIAL,
    PENALTY_MAX,
    one_message_maildir,
)

ALICE_HOME = "127.0.0.1"  # where alice logs in from
ATTACKER = "127.0.0.2"
NEW_PLACE = "127.0.0.3"  # an address alice never logged in from
USER_LOCKOUT = 4
ADDRESS_LOCKOUT = 8


def start_guarded(
    start: Callable[..., ServerProcess], tmp_path: Path, state: Path | None = None
) -> ServerProcess:
    return start(
        users=[User(USER, PASSWORD, one_message_maildir(tmp_path / "Maildir"))],
        listeners=["none"],
        state=state,
        limits={
            "auth_failure_delay_seconds": FAILURE_DELAY,
            "auth_penalty_initial_seconds": PENALTY_INITIAL,
            "auth_penalty_max_seconds": PENALTY_MAX,
            "auth_lockout_failures": USER_LOCKOUT,
            "auth_lockout_address_failures": ADDRESS_LOCKOUT,
            "auth_lockout_window_seconds": 600,
            "auth_lockout_seconds": 600,
        },
    )


def lock_out_alice(port: int) -> None:
    """The attacker's distinct wrong guesses from ATTACKER, enough to lock the name."""
    for n in range(USER_LOCKOUT):
        assert login(port, USER, f"attack-{n}", source=ATTACKER).reply == AUTH_FAILED


def test_an_attacker_locks_alice_out_but_not_from_where_she_logs_in(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_guarded(start, tmp_path)
    port = server.port("none")
    assert login(port, USER, PASSWORD, source=ALICE_HOME).reply.startswith(b"+OK")
    lock_out_alice(port)
    (started,) = server.records("login_lockout")
    assert (started["scope"], started["user"]) == ("user", USER)
    # From her usual address: in at once, the right password checked and accepted.
    assert login(port, USER, PASSWORD, source=ALICE_HOME).reply.startswith(b"+OK")
    (spared,) = server.records("login_spared")
    assert spared["peer"].startswith(ALICE_HOME)
    # From a new address the name stays locked out, the right password included, and
    # alice's own login just now does not lift it.
    refused = login(port, USER, PASSWORD, source=NEW_PLACE)
    assert refused.reply == AUTH_FAILED
    assert login(port, USER, PASSWORD, source=ATTACKER).reply == AUTH_FAILED
    assert {r["scope"] for r in server.records("login_refused")} == {"user"}
    assert all(
        r["peer"].startswith(("127.0.0.2", "127.0.0.3")) for r in server.records("login_refused")
    )
    assert PASSWORD not in server.log_text()


def test_a_brute_force_from_alices_own_address_is_slowed_then_stopped_by_the_address(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_guarded(start, tmp_path)
    port = server.port("none")
    assert login(port, USER, PASSWORD, source=ALICE_HOME).reply.startswith(b"+OK")
    guesses = [login(port, USER, f"guess-{n}", source=ALICE_HOME) for n in range(ADDRESS_LOCKOUT)]
    assert {g.reply for g in guesses} == {AUTH_FAILED}
    # Every guess waited its address's penalty, the ones past the name's lockout too
    # (the known source is spared the name's lockout, not the penalty).
    for n, guess in enumerate(guesses):
        penalty = 0.0 if n == 0 else min(PENALTY_INITIAL * 2 ** (n - 1), PENALTY_MAX)
        assert guess.seconds >= penalty + FAILURE_DELAY, (n, guess.seconds)
    # The name locked after USER_LOCKOUT of them: refused from anywhere else.
    assert login(port, USER, PASSWORD, source=NEW_PLACE).reply == AUTH_FAILED
    # The guesses past it were still checked (spared), until the address locked.
    assert len(server.records("login_spared")) == ADDRESS_LOCKOUT - USER_LOCKOUT
    scopes = [r["scope"] for r in server.records("login_lockout")]
    assert scopes == ["user", "address"]
    # Now the address is locked: the right password from it is refused too.
    assert login(port, USER, PASSWORD, source=ALICE_HOME).reply == AUTH_FAILED
    assert server.records("login_refused")[-1]["scope"] == "address"


def test_known_sources_survive_a_restart(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    state = tmp_path / "shared-state.db"
    first = start_guarded(start, tmp_path / "first", state)
    assert login(first.port("none"), USER, PASSWORD, source=ALICE_HOME).reply.startswith(b"+OK")
    assert first.stop() == 0
    second = start_guarded(start, tmp_path / "second", state)
    port = second.port("none")
    lock_out_alice(port)
    assert login(port, USER, PASSWORD, source=NEW_PLACE).reply == AUTH_FAILED
    assert login(port, USER, PASSWORD, source=ALICE_HOME).reply.startswith(b"+OK")
