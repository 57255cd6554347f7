"""The authenticator: hashing in worker threads, equal work for unknown users."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.auth import authenticator as authenticator_module
from popproxy.auth.authenticator import (
    DEFAULT_HASH_THREADS,
    Authenticator,
    HashQueue,
    Verification,
)
from popproxy.auth.cache import CredentialCache
from popproxy.auth.passwords import dummy_hash, hash_password, parse_hash, verify_password
from popproxy.config import LimitsConfig, UserConfig
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
    auth = Authenticator(users(), queue=HashQueue(1))
    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(auth.verify, "alice", Secret.from_str("x"))
            nursery.start_soon(auth.verify, "ghost", Secret.from_str("x"))
    assert len(counting.calls) == 12
    assert counting.max_running == 1


async def test_default_limiter_allows_two_threads() -> None:
    auth = Authenticator(users())
    assert DEFAULT_HASH_THREADS == 2
    assert auth._queue.limiter.total_tokens == DEFAULT_HASH_THREADS


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


# -- the hash queue's bound -------------------------------------------------------------------


class GatedVerify:
    """The real verify_password, held in its worker thread until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = 0
        self._lock = threading.Lock()

    def __call__(self, phc: str, password: Secret) -> bool:
        with self._lock:
            self.started += 1
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return verify_password(phc, password)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> GatedVerify:
    verify = GatedVerify()
    monkeypatch.setattr(authenticator_module, "verify_password", verify)
    return verify


async def test_logins_beyond_the_waiting_bound_are_refused_at_once_without_hashing(
    gated: GatedVerify, autojump_clock: trio.testing.MockClock
) -> None:
    limits = LimitsConfig(auth_max_pending_verifications=2)
    queue = HashQueue(1)
    auth = Authenticator(users(), limits, queue=queue)
    done: list[Verification] = []

    async def login(name: str, password: str) -> None:
        done.append(await auth.check(name, Secret.from_str(password)))

    async with trio.open_nursery() as nursery:
        try:
            nursery.start_soon(login, "alice", "alice-pw")  # hashing
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(login, "bob", "wrong")  # waiting
            nursery.start_soon(login, "ghost", "x")  # waiting
            await trio.testing.wait_all_tasks_blocked()
            assert (queue.in_flight, queue.waiting) == (3, 2)
            before = trio.current_time()
            for name in ("alice", "ghost", "bob"):  # known or not: the same answer, at once
                refused = await auth.check(name, Secret.from_str("anything"))
                assert refused.busy
                assert refused.user is None
            assert trio.current_time() == before
            assert gated.started <= 1  # the one thread, maybe not yet inside the hash
        finally:
            gated.gate.set()
    assert queue.in_flight == 0
    assert sorted((v.user.name if v.user else "-", v.busy) for v in done) == [
        ("-", False),
        ("-", False),
        ("alice", False),
    ]
    assert gated.started == 3  # the three that queued, never the refused ones


async def test_a_zero_bound_allows_only_what_the_threads_run(gated: GatedVerify) -> None:
    auth = Authenticator(
        users(), LimitsConfig(auth_max_pending_verifications=0), queue=HashQueue(2)
    )
    async with trio.open_nursery() as nursery:
        try:
            for _ in range(2):
                nursery.start_soon(auth.check, "alice", Secret.from_str("nope"))
            await trio.testing.wait_all_tasks_blocked()
            assert (await auth.check("bob", Secret.from_str("bob-pw"))).busy
        finally:
            gated.gate.set()
    assert not (await auth.check("bob", Secret.from_str("bob-pw"))).busy


async def test_a_real_slow_hash_fills_the_queue() -> None:
    """No injected runner: a real scrypt at a raised cost keeps the one thread busy."""
    slow = hash_password(Secret.from_str("slow-pw"), ln=14)
    auth = Authenticator(
        {"slow": UserConfig("slow", slow, maildir=Path("/s"))},
        LimitsConfig(auth_max_pending_verifications=1),
        queue=HashQueue(1),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(auth.check, "slow", Secret.from_str("a"))
        nursery.start_soon(auth.check, "slow", Secret.from_str("b"))
        await trio.testing.wait_all_tasks_blocked()
        assert (await auth.check("slow", Secret.from_str("slow-pw"))).busy
    assert (await auth.check("slow", Secret.from_str("slow-pw"))).user is not None


# -- the verified-credential cache -----------------------------------------------------------


async def test_a_repeat_login_is_served_from_the_cache_without_hashing(
    counting: CountingVerify,
) -> None:
    auth = Authenticator(users())
    first = await auth.check("alice", Secret.from_str("alice-pw"))
    second = await auth.check("alice", Secret.from_str("alice-pw"))
    assert first.user is not None
    assert not first.cached
    assert second.user is first.user
    assert second.cached
    assert counting.calls == [ALICE_HASH]


async def test_failed_passwords_never_enter_the_cache(counting: CountingVerify) -> None:
    cache = CredentialCache(10)
    auth = Authenticator(users(), cache=cache)
    for _ in range(3):
        assert (await auth.check("alice", Secret.from_str("wrong"))).user is None
        assert (await auth.check("ghost", Secret.from_str("wrong"))).user is None
    assert len(cache) == 0
    assert len(counting.calls) == 6  # every failure hashed
    await auth.check("alice", Secret.from_str("alice-pw"))
    wrong = await auth.check("alice", Secret.from_str("wrong"))  # cached user, other password
    assert wrong.user is None
    assert not wrong.cached
    assert len(counting.calls) == 8


async def test_a_cache_hit_skips_the_queue_even_when_it_is_full(gated: GatedVerify) -> None:
    limits = LimitsConfig(auth_max_pending_verifications=0)
    auth = Authenticator(users(), limits, queue=HashQueue(1))
    gated.gate.set()
    assert (await auth.check("alice", Secret.from_str("alice-pw"))).user is not None
    gated.gate.clear()
    async with trio.open_nursery() as nursery:
        try:
            nursery.start_soon(auth.check, "bob", Secret.from_str("bob-pw"))
            await trio.testing.wait_all_tasks_blocked()
            assert (await auth.check("bob", Secret.from_str("x"))).busy
            cached = await auth.check("alice", Secret.from_str("alice-pw"))
            assert cached.cached
        finally:
            gated.gate.set()


async def test_cache_entries_expire_after_the_ttl(
    counting: CountingVerify, autojump_clock: trio.testing.MockClock
) -> None:
    auth = Authenticator(users(), LimitsConfig(auth_cache_ttl_seconds=60))
    await auth.check("alice", Secret.from_str("alice-pw"))
    await trio.sleep(59)
    assert (await auth.check("alice", Secret.from_str("alice-pw"))).cached
    await trio.sleep(1)
    again = await auth.check("alice", Secret.from_str("alice-pw"))
    assert again.user is not None
    assert not again.cached
    assert len(counting.calls) == 2


async def test_a_reload_that_changes_or_removes_a_user_invalidates_the_cache() -> None:
    """Authenticator generations share the cache, as across a reload in serve.py."""
    cache = CredentialCache(10)
    old = Authenticator(users(), cache=cache)
    assert (await old.check("alice", Secret.from_str("alice-pw"))).user is not None
    assert (await old.check("bob", Secret.from_str("bob-pw"))).user is not None
    new_hash = hash_password(Secret.from_str("new-pw"), ln=4)
    changed = {"alice": UserConfig("alice", new_hash, maildir=Path("/m/alice"))}  # bob removed
    new = Authenticator(changed, cache=cache)
    assert (await new.check("alice", Secret.from_str("alice-pw"))).user is None
    assert (await new.check("bob", Secret.from_str("bob-pw"))).user is None
    assert (await new.check("alice", Secret.from_str("new-pw"))).user is not None
    assert (await new.check("alice", Secret.from_str("new-pw"))).cached


async def test_cache_size_zero_turns_it_off(counting: CountingVerify) -> None:
    auth = Authenticator(users(), LimitsConfig(auth_cache_size=0))
    for _ in range(2):
        verdict = await auth.check("alice", Secret.from_str("alice-pw"))
        assert verdict.user is not None
        assert not verdict.cached
    assert len(counting.calls) == 2


async def test_the_credential_digest_is_the_same_for_a_hit_a_miss_and_a_failure() -> None:
    """The throttle recognises a retried password by it, whatever the outcome."""
    auth = Authenticator(users())
    wrong = [await auth.check("alice", Secret.from_str("nope")) for _ in range(2)]
    assert wrong[0].credential == wrong[1].credential
    assert len(wrong[0].credential) == 32
    right = await auth.check("alice", Secret.from_str("alice-pw"))
    assert right.credential != wrong[0].credential
    assert (await auth.check("alice", Secret.from_str("alice-pw"))).credential == right.credential
