"""The authenticator: hashing in worker threads, equal work for unknown users."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from popproxy.auth import authenticator as authenticator_module
from popproxy.auth.authenticator import DEFAULT_HASH_THREADS, Authenticator
from popproxy.auth.passwords import dummy_hash, hash_password, parse_hash, verify_password
from popproxy.config import UserConfig
from popproxy.secret import Secret

ALICE_HASH = hash_password(Secret.from_str("alice-pw"), ln=4)
BOB_HASH = hash_password(Secret.from_str("bob-pw"), ln=4)


def users() -> dict[str, UserConfig]:
    return {
        "alice": UserConfig("alice", ALICE_HASH, maildir=Path("/m/alice")),
        "bob": UserConfig("bob", BOB_HASH, maildir=Path("/m/bob")),
    }


class CountingVerify:
    """The real verify_password, counting calls and the most threads running it at once."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.threads: set[int] = set()
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def __call__(self, phc: str, password: Secret) -> bool:
        with self._lock:
            self.calls.append(phc)
            self.threads.add(threading.get_ident())
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            return verify_password(phc, password)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingVerify:
    counter = CountingVerify()
    monkeypatch.setattr(authenticator_module, "verify_password", counter)
    return counter


async def test_right_password_gives_the_user() -> None:
    auth = Authenticator(users())
    user = await auth.verify("alice", Secret.from_str("alice-pw"))
    assert user is not None
    assert user.name == "alice"
    assert user.maildir == Path("/m/alice")


async def test_wrong_password_and_unknown_user_both_give_none() -> None:
    auth = Authenticator(users())
    assert await auth.verify("alice", Secret.from_str("bob-pw")) is None
    assert await auth.verify("alice", Secret.from_str("")) is None
    assert await auth.verify("mallory", Secret.from_str("alice-pw")) is None
    assert await auth.verify("Alice", Secret.from_str("alice-pw")) is None  # names are exact


async def test_unknown_user_runs_a_full_hash_with_the_same_parameters(
    counting: CountingVerify,
) -> None:
    auth = Authenticator(users())
    assert await auth.verify("alice", Secret.from_str("nope")) is None
    assert await auth.verify("nobody", Secret.from_str("nope")) is None
    assert len(counting.calls) == 2
    known, unknown = counting.calls
    assert known == ALICE_HASH
    assert unknown not in (ALICE_HASH, BOB_HASH)
    assert parse_hash(unknown) == parse_hash(known)  # same algorithm, cost and lengths


async def test_unknown_user_work_is_real_not_a_shortcut() -> None:
    """The dummy hash is verified by the same scrypt run (it is a real, parseable hash)."""
    auth = Authenticator(users())
    assert parse_hash(auth.dummy_hash) == parse_hash(ALICE_HASH)
    assert not verify_password(auth.dummy_hash, Secret.from_str("alice-pw"))


async def test_hashing_runs_in_worker_threads(counting: CountingVerify) -> None:
    auth = Authenticator(users())
    user = await auth.verify("alice", Secret.from_str("alice-pw"))
    assert user is not None
    assert counting.calls == [ALICE_HASH]  # the hash did run, and only once
    assert counting.threads
    assert threading.get_ident() not in counting.threads


async def test_limiter_bounds_concurrent_hashes(counting: CountingVerify) -> None:
    limiter = trio.CapacityLimiter(1)
    auth = Authenticator(users(), limiter=limiter)
    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(auth.verify, "alice", Secret.from_str("x"))
            nursery.start_soon(auth.verify, "ghost", Secret.from_str("x"))
    assert len(counting.calls) == 12
    assert counting.max_running == 1


async def test_default_limiter_allows_two_threads() -> None:
    auth = Authenticator(users())
    assert DEFAULT_HASH_THREADS == 2
    assert auth._limiter.total_tokens == DEFAULT_HASH_THREADS


async def test_dummy_follows_the_most_common_parameters() -> None:
    slow = hash_password(Secret.from_str("x"), ln=5)
    many = {
        "a": UserConfig("a", ALICE_HASH, maildir=Path("/a")),
        "b": UserConfig("b", BOB_HASH, maildir=Path("/b")),
        "c": UserConfig("c", slow, maildir=Path("/c")),
    }
    auth = Authenticator(many)
    assert parse_hash(auth.dummy_hash) == parse_hash(ALICE_HASH)


async def test_no_users_uses_default_cost_dummy() -> None:
    auth = Authenticator({})
    assert parse_hash(auth.dummy_hash) == parse_hash(dummy_hash())


async def test_unusable_hash_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    argon2_user = UserConfig(
        "x",
        "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
        maildir=Path("/x"),
    )
    monkeypatch.setitem(sys.modules, "argon2", None)
    auth = Authenticator({"x": argon2_user})
    assert await auth.verify("x", Secret.from_str("pw")) is None
    verdict = await auth.check("x", Secret.from_str("pw"))
    assert verdict.user is None
    assert verdict.hash_unusable


async def test_check_says_who_and_whether_the_hash_was_usable() -> None:
    auth = Authenticator(users())
    right = await auth.check("alice", Secret.from_str("alice-pw"))
    assert right.user is not None
    assert right.user.name == "alice"
    assert not right.hash_unusable
    for name, password in (("alice", "bob-pw"), ("nobody", "alice-pw")):
        wrong = await auth.check(name, Secret.from_str(password))
        assert wrong.user is None
        assert not wrong.hash_unusable
