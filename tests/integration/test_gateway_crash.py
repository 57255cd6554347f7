"""Invariants 1 and 7 under SIGKILL: the gateway killed at every step boundary of a poll
and at random moments, then polled to completion (issue 17).

Each case gives a fresh Dovecot user a mailbox, runs one poll in a forked child process
that is killed with SIGKILL (at a chosen ``Step`` through the fetcher's ``on_step`` hook,
or after a random delay), and checks at once that every message gone from Dovecot is in
the local Maildir, byte for byte (nothing deleted upstream that is not durable locally).
Then an unkilled poll runs to completion, and the Maildir must hold every original
message exactly once, byte-exact by sha256, with nothing left in tmp/ and nothing left
upstream (no rules: download and delete).

A forked child rather than a new interpreter: the modules are loaded already, so a case
costs a poll, not an interpreter start. The parent test is synchronous (no trio run is
active when it forks); the child leaves with ``os._exit``.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from popproxy.config import load_config
from popproxy.gateway import fetcher as fetcher_module
from popproxy.gateway.durable import Step
from popproxy.gateway.fetcher import Fetcher
from popproxy.gateway.schedule import poll_once
from popproxy.maildrop.retention import utc_now
from popproxy.state import open_store
from popproxy.state.base import GatewayStore

from .dovecot import DovecotServer, DovecotUser
from .harness import (
    PASSWORD,
    Corpus,
    GatewayUser,
    Source,
    TlsFiles,
    crlf_digest_of_file,
    write_config,
)
from .test_proxy import UPSTREAM, upstream_for

# Small batches, so that one poll crosses every kind of boundary several times.
CRASH_BATCH_MESSAGES = 4
EXTRA_MESSAGES = 6  # besides the corpus's small ones: 12 messages, 3 batches
RANDOM_KILLS = 25
# Cases tried at most for the random kills (a poll may finish before its moment).
MAX_RANDOM_CASES = 100
# How long a child poll or the wait for Dovecot may take (a loaded 2-core machine).
CHILD_DEADLINE_SECONDS = 30
UPSTREAM_SETTLE_SECONDS = 10


@dataclass(frozen=True, slots=True)
class KillAt:
    """Kill the poll at the ``nth`` time it reaches ``step``; ``None``: do not kill."""

    step: Step
    nth: int


def step_kill_points(messages: int) -> list[KillAt]:
    batches = -(-messages // CRASH_BATCH_MESSAGES)
    per_batch = (Step.TMP_SYNCED, Step.STAGED, Step.PUBLISHED, Step.DELIVERED)
    return [
        KillAt(Step.LISTED, 1),
        *(KillAt(Step.WRITTEN, n) for n in range(1, messages + 1)),
        *(KillAt(step, n) for n in range(1, batches + 1) for step in per_batch),
        KillAt(Step.QUIT_SENT, 1),
        KillAt(Step.DELETIONS_RECORDED, 1),
    ]


def _child(config_path: str, kill: KillAt | None) -> None:
    """The forked child: one poll of every source, killed where ``kill`` says."""
    code = 1
    try:
        fetcher_module.BATCH_MESSAGES = CRASH_BATCH_MESSAGES
        config = load_config(Path(config_path))
        seen: collections.Counter[Step] = collections.Counter()

        async def on_step(step: Step) -> None:
            seen[step] += 1
            if kill is not None and step is kill.step and seen[step] == kill.nth:
                os.kill(os.getpid(), signal.SIGKILL)

        async def main() -> None:
            store = await open_store(config.state)

            async def get() -> GatewayStore:
                return store

            try:
                await poll_once(Fetcher(get, clock=utc_now, on_step=on_step), config)
            finally:
                await store.aclose()

        trio.run(main)
        code = 0
    finally:
        os._exit(code)


def run_child(config_path: Path, kill: KillAt | None, *, after: float | None = None) -> int:
    """Run one poll in a forked child; kill it at ``kill`` or ``after`` seconds."""
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_child, args=(str(config_path), kill))
    child.start()
    if after is not None:
        child.join(after)
        if child.is_alive():
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
    child.join(CHILD_DEADLINE_SECONDS)
    assert not child.is_alive(), "a poll did not finish"
    assert child.exitcode is not None
    return child.exitcode


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_digests(maildir: Path) -> list[str]:
    out: list[str] = []
    for sub in ("new", "cur"):
        directory = maildir / sub
        if directory.is_dir():
            out.extend(sha(path.read_bytes()) for path in directory.iterdir())
    return sorted(out)


@dataclass(slots=True)
class Case:
    """One mailbox and one gateway config for it."""

    account: DovecotUser
    config_path: Path
    maildir: Path
    original: list[str]  # sha256 of each message upstream, as served (CRLF)


@pytest.fixture
def new_case(
    dovecot: DovecotServer, corpus: Corpus, tls_files: TlsFiles, tmp_path: Path
) -> Iterator[Callable[[int], Case]]:
    made: list[DovecotUser] = []

    def make(index: int) -> Case:
        account = dovecot.add_user(corpus=corpus, messages=corpus.small)
        made.append(account)
        for n in range(EXTRA_MESSAGES):
            body = f"Subject: extra {n}\r\n\r\n.dot line {n}\r\n{'x' * (n * 997)}\r\n"
            account.deliver(body.encode())
        workdir = tmp_path / f"case{index}"
        workdir.mkdir()
        user = GatewayUser(
            "carol",
            PASSWORD,
            workdir / "mail",
            (Source(UPSTREAM, account.name, account.password),),
        )
        config_path = write_config(
            workdir / "popproxy.yaml",
            users=[user],
            tls=tls_files,
            listeners=["none"],
            upstreams={UPSTREAM: upstream_for(dovecot, "none")},
        )
        original = sorted(d for _, d in account.digests().values())
        return Case(account, config_path, workdir / "mail", original)

    yield make
    for account in made:
        dovecot.remove_user(account)


def upstream_digests(account: DovecotUser) -> list[str]:
    """The sha256 of each message Dovecot holds, read again until a read sees no file
    move or vanish meanwhile: the killed poll's Dovecot session may still be ending
    (moving files new/ -> cur/, or expunging after a QUIT answered just before the kill)."""
    deadline = time.monotonic() + UPSTREAM_SETTLE_SECONDS
    while True:
        try:
            return [crlf_digest_of_file(path)[1] for path in account.files().values()]
        except (FileNotFoundError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def check_nothing_lost(case: Case) -> None:
    """Every message gone from Dovecot is in the Maildir, whole (invariant 1)."""
    upstream = collections.Counter(upstream_digests(case.account))
    local = collections.Counter(local_digests(case.maildir))
    gone = collections.Counter(case.original) - upstream
    assert not gone - local, "a message was deleted upstream before it was durable locally"


def finish_and_check(case: Case) -> None:
    """Poll to completion, then: each message exactly once locally, nothing upstream."""
    assert run_child(case.config_path, None) == 0
    assert local_digests(case.maildir) == case.original, "a message lost or duplicated"
    assert not any((case.maildir / "tmp").iterdir()), "a file left in tmp/"
    deadline = time.monotonic() + UPSTREAM_SETTLE_SECONDS
    while case.account.count() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert case.account.count() == 0, "the finishing poll left mail upstream"


def test_invariant_7_exactly_once_under_sigkill_at_every_step_and_at_random(
    new_case: Callable[[int], Case],
) -> None:
    make = new_case
    # A clean poll first: it must finish, and tells how long a poll takes here.
    clean = make(0)
    started = time.monotonic()
    finish_and_check(clean)
    poll_seconds = time.monotonic() - started

    points = step_kill_points(len(clean.original))
    rng = random.Random(1939)
    kills = 0
    for index, point in enumerate(points, start=1):
        case = make(index)
        assert run_child(case.config_path, point) == -signal.SIGKILL, point
        kills += 1
        check_nothing_lost(case)
        finish_and_check(case)
    # Random moments until RANDOM_KILLS of them hit a running poll (one that finished
    # first still counts as a clean poll to check). Two kills in a row on every other
    # case: the second may hit the settling of what the first left staged.
    random_kills = 0
    for index in range(MAX_RANDOM_CASES):
        if random_kills >= RANDOM_KILLS:
            break
        case = make(len(points) + 1 + index)
        for _ in range(1 + index % 2):
            code = run_child(case.config_path, None, after=rng.uniform(0, poll_seconds))
            random_kills += code == -signal.SIGKILL
            check_nothing_lost(case)
        finish_and_check(case)
    kills += random_kills
    assert kills >= 50, f"only {kills} polls were killed"
