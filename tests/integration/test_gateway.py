"""The gateway against the suite's real Dovecot, in this process (issue 17).

Each test writes a config with ``fetch:`` sources pointing at Dovecot users, opens the
state store and runs ``Fetcher.poll`` for each source, then compares the local Maildir
with the corpus by sha256 and looks at what is left upstream.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from clocks import MovableClock
from maildirs import make_maildir

from popproxy.config import Config, load_config
from popproxy.gateway.dryrun import explain_sources
from popproxy.gateway.fetcher import Fetcher, PollReport, StoreGetter
from popproxy.maildrop.maildir import open_maildir
from popproxy.outcomes import PollResult
from popproxy.secret import Secret
from popproxy.state import open_store
from popproxy.state.base import GatewayStore, StoreBackend

from .clocked import START
from .dovecot import DovecotServer, DovecotUser
from .harness import PASSWORD, Corpus, GatewayUser, Source, TlsFiles, file_digest, write_config
from .test_proxy import UPSTREAM, upstream_for

KEEP = {"10-keep.yaml": "rules:\n  - name: keep-all\n    action: keep\n"}
# One test's polls, Dovecot included; generous for a loaded 2-core machine.
TEST_DEADLINE_SECONDS = 60
# The gateway user of every test here and in test_gateway_serve.
LOCAL = "carol"


def local_files(maildir: Path) -> dict[str, bytes]:
    """The messages in new/ and cur/ of a local Maildir, by unique name."""
    out: dict[str, bytes] = {}
    for sub in ("new", "cur"):
        for path in (maildir / sub).iterdir():
            key = path.name.split(":", 1)[0]
            assert key not in out
            out[key] = path.read_bytes()
    return out


def digests(contents: Sequence[bytes]) -> list[str]:
    return sorted(hashlib.sha256(data).hexdigest() for data in contents)


def gateway_user(
    tmp_path: Path, *accounts: DovecotUser, password: str | None = None
) -> GatewayUser:
    """LOCAL, whose Maildir tmp_path/carol-mail the gateway fills from ``accounts`` (with
    ``password`` instead of theirs, if given)."""
    sources = tuple(Source(UPSTREAM, a.name, password or a.password) for a in accounts)
    return GatewayUser(LOCAL, PASSWORD, tmp_path / "carol-mail", sources)


def gateway_config(
    tmp_path: Path,
    dovecot: DovecotServer,
    tls_files: TlsFiles,
    accounts: Sequence[DovecotUser],
    *,
    rules: dict[str, str] | None = None,
    leg: str = "none",
) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(
        write_config(
            tmp_path / "popproxy.yaml",
            users=[gateway_user(tmp_path, *accounts)],
            tls=tls_files,
            listeners=["none"],
            upstreams={UPSTREAM: upstream_for(dovecot, leg)},
            rules=rules,
        )
    )


@asynccontextmanager
async def opened_store(config: Config) -> AsyncIterator[StoreBackend]:
    """The store ``config.state`` names, open for the block and closed after it."""
    store = await open_store(config.state)
    try:
        yield store
    finally:
        await store.aclose()


def given(store: GatewayStore) -> StoreGetter:
    async def get() -> GatewayStore:
        return store

    return get


async def audit_rows(config: Path, *arguments: str) -> list[dict[str, object]]:
    """What ``popproxy audit --json`` (a process of its own, as an operator runs it)
    prints for ``config``, one dict per row."""
    proc = await trio.run_process(
        [sys.executable, "-m", "popproxy", "audit", "-c", str(config), "--json", *arguments],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


async def poll_all(config: Config, fetcher: Fetcher) -> list[PollReport]:
    reports = []
    for user in config.gateway_users:
        for source in user.fetch:
            reports.append(await fetcher.poll(config, user, source))
    return reports


async def test_first_poll_fetches_everything_byte_exact_then_nothing_then_new_mail(
    dovecot: DovecotServer,
    small_account: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    config = gateway_config(
        tmp_path, dovecot, tls_files, [small_account], rules=KEEP, leg="implicit"
    )
    mail = tmp_path / "carol-mail"
    async with opened_store(config) as store:
        fetcher = Fetcher(given(store), clock=MovableClock(START))
        with trio.fail_after(TEST_DEADLINE_SECONDS):
            (first,) = await poll_all(config, fetcher)
            assert first.result is PollResult.OK, first
            assert first.fetched == len(corpus.small)
            got = local_files(mail)
            expected = [m.crlf for m in corpus.small if m.crlf is not None]
            assert digests(list(got.values())) == digests(expected)
            assert first.fetched_bytes == sum(len(data) for data in expected)
            assert not any((mail / "tmp").iterdir())
            assert small_account.count() == len(corpus.small), "keep: nothing deleted upstream"

            (second,) = await poll_all(config, fetcher)
            assert (second.result, second.fetched, second.deleted) == (PollResult.OK, 0, 0)
            assert local_files(mail) == got

            new = b"Subject: new\r\n\r\n.starts with a dot\r\nend\r\n"
            small_account.deliver(new)
            (third,) = await poll_all(config, fetcher)
            assert (third.result, third.fetched) == (PollResult.OK, 1)
            now = local_files(mail)
            assert set(now) - set(got) and now[next(iter(set(now) - set(got)))] == new


DELETE_EXPIRE = {
    "10-expire.yaml": (
        "rules:\n  - name: keep-a-week\n    action: keep\n    expire_after_days: 7\n"
    )
}


async def test_default_delete_keep_and_expire_after_days_with_the_clock(
    dovecot: DovecotServer, corpus: Corpus, tls_files: TlsFiles, tmp_path: Path
) -> None:
    deleting = dovecot.add_user(corpus=corpus, messages=corpus.small[:3])
    expiring = dovecot.add_user(corpus=corpus, messages=corpus.small[3:])
    try:
        clock = MovableClock(START)
        # No rules: download and delete.
        config = gateway_config(tmp_path / "a", dovecot, tls_files, [deleting])
        async with opened_store(config) as store:
            (report,) = await poll_all(config, Fetcher(given(store), clock=clock))
        assert (report.result, report.fetched, report.deleted) == (PollResult.OK, 3, 3)
        assert dict(report.deleted_by_rule) == {"default": 3}
        await trio.to_thread.run_sync(dovecot.wait_sessions_ended, deleting, 1)
        assert deleting.count() == 0
        assert len(local_files(tmp_path / "a" / "carol-mail")) == 3
        # Each deletion is in the audit log under the poll's id (popproxy audit, issue 18).
        audit = await audit_rows(tmp_path / "a" / "popproxy.yaml")
        assert {(r["session"], r["user"], r["upstream"], r["upstream_user"]) for r in audit} == {
            (report.poll_id, "carol", UPSTREAM, deleting.name)
        }
        assert [(r["rule"], r["action"]) for r in audit] == [("default", "delete_upstream")] * 3

        # keep with expire_after_days: kept for 7 days after the first listing.
        config = gateway_config(tmp_path / "b", dovecot, tls_files, [expiring], rules=DELETE_EXPIRE)
        async with opened_store(config) as store:
            fetcher = Fetcher(given(store), clock=clock)
            first = await poll_all(config, fetcher)
            assert [(r.result, r.fetched, r.deleted) for r in first] == [
                (PollResult.OK, len(corpus.small) - 3, 0)
            ]
            clock.now = START + timedelta(days=6)
            young = expiring.deliver(b"Subject: young\r\n\r\nx\r\n")
            second = await poll_all(config, fetcher)
            assert [(r.fetched, r.deleted) for r in second] == [(1, 0)]
            clock.now = START + timedelta(days=7, hours=1)
            third = await poll_all(config, fetcher)
            assert [(r.fetched, r.deleted) for r in third] == [(0, len(corpus.small) - 3)]
            assert dict(third[0].deleted_by_rule) == {"keep-a-week": len(corpus.small) - 3}
            expired = await audit_rows(tmp_path / "b" / "popproxy.yaml", "--rule", "keep-a-week")
            assert {r["session"] for r in expired} == {third[0].poll_id}
            assert len(expired) == len(corpus.small) - 3
        await trio.to_thread.run_sync(dovecot.wait_sessions_ended, expiring, 3)
        assert expiring.keys() == {young}, "only the message first seen on day 6 is left"
        assert len(local_files(tmp_path / "b" / "carol-mail")) == len(corpus.small) - 3 + 1
    finally:
        dovecot.remove_user(deleting)
        dovecot.remove_user(expiring)


async def test_two_sources_merge_into_one_maildir_and_a_bad_password_fails_alone(
    dovecot: DovecotServer, corpus: Corpus, tls_files: TlsFiles, tmp_path: Path
) -> None:
    first = dovecot.add_user(corpus=corpus, messages=corpus.small[:2])
    second = dovecot.add_user(corpus=corpus, messages=corpus.small[2:])
    try:
        config = gateway_config(tmp_path, dovecot, tls_files, [first, second], rules=KEEP)
        async with opened_store(config) as store:
            fetcher = Fetcher(given(store), clock=MovableClock(START))
            reports = await poll_all(config, fetcher)
            assert [(r.result, r.fetched) for r in reports] == [
                (PollResult.OK, 2),
                (PollResult.OK, len(corpus.small) - 2),
            ]
            got = local_files(tmp_path / "carol-mail")
            assert digests(list(got.values())) == sorted(m.sha256 for m in corpus.small)
            # The same message in both sources would be two messages: names differ.
            second.deliver(corpus.small[0].crlf or b"")
            (_, again) = await poll_all(config, fetcher)
            assert again.fetched == 1
            assert len(local_files(tmp_path / "carol-mail")) == len(corpus.small) + 1
        wrong = gateway_config(tmp_path / "w", dovecot, tls_files, [first], rules=KEEP)
        user = wrong.users["carol"]
        bad = replace(user.fetch[0], upstream_password=Secret(b"not-the-password"))
        async with opened_store(wrong) as store:
            report = await Fetcher(given(store), clock=MovableClock(START)).poll(wrong, user, bad)
        assert report.result is PollResult.AUTH_FAILED
        assert "not-the-password" not in report.reason
    finally:
        dovecot.remove_user(first)
        dovecot.remove_user(second)


async def test_a_session_open_during_a_poll_keeps_its_listing_and_does_not_block_it(
    dovecot: DovecotServer,
    small_account: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    config = gateway_config(tmp_path, dovecot, tls_files, [small_account], rules=KEEP)
    mail = make_maildir(
        tmp_path / "carol-mail", {"1.local.host": b"Subject: local\r\n\r\nlocal\r\n"}
    )
    session = await open_maildir(mail)  # a client holds the mailbox (RFC 1939 §4 lock)
    store = await open_store(config.state)
    try:
        (report,) = await poll_all(config, Fetcher(given(store), clock=MovableClock(START)))
        assert (report.result, report.fetched) == (PollResult.OK, len(corpus.small))
        assert [m.uid for m in session.messages] == ["1.local.host"], "a snapshot at login"
        chunks = [chunk async for chunk in session.retrieve(0)]
        assert b"".join(chunks) == b"Subject: local\r\n\r\nlocal\r\n"
        await session.commit({0})
    finally:
        await session.aclose()
        await store.aclose()
    later = await open_maildir(mail)
    try:
        assert len(later.messages) == len(corpus.small), "new mail shows at the next login"
    finally:
        await later.aclose()


class CuttingRelay:
    """A relay to ``target`` that closes both sides once ``cut_after`` octets came back."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        task_status.started()
        async with listener:
            while True:
                client = await listener.accept()
                upstream = await trio.open_tcp_stream(*self.target)
                async with client, upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, None, nursery)
                    nursery.start_soon(self._pump, upstream, client, self.cut_after, nursery)

    @staticmethod
    async def _pump(
        source: trio.abc.Stream, sink: trio.abc.Stream, limit: int | None, nursery: trio.Nursery
    ) -> None:
        sent = 0
        while data := await source.receive_some(65536):
            if limit is not None and sent + len(data) >= limit:
                await sink.send_all(data[: limit - sent])
                nursery.cancel_scope.cancel()
                return
            await sink.send_all(data)
            sent += len(data)
        nursery.cancel_scope.cancel()


async def test_an_upstream_dying_mid_retr_loses_and_deletes_nothing(
    dovecot: DovecotServer,
    small_account: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    before = small_account.digests()
    total = sum(m.size for m in corpus.small)
    config = gateway_config(tmp_path, dovecot, tls_files, [small_account])  # delete after fetch
    relay = CuttingRelay(dovecot.endpoint("none"), cut_after=total // 2)
    mail = tmp_path / "carol-mail"
    async with opened_store(config) as store:
        fetcher = Fetcher(given(store), clock=MovableClock(START))
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            cut = replace(
                config,
                upstreams={
                    UPSTREAM: replace(config.upstreams[UPSTREAM], host="127.0.0.1", port=relay.port)
                },
            )
            (broken,) = await poll_all(cut, fetcher)
            nursery.cancel_scope.cancel()
        assert broken.result is PollResult.UPSTREAM_ERROR, broken
        assert broken.deleted == 0
        await trio.to_thread.run_sync(dovecot.wait_sessions_ended, small_account, 1)
        assert small_account.digests() == before, "nothing deleted upstream"
        partial = local_files(mail)
        assert 0 < len(partial) < len(corpus.small)
        assert set(digests(list(partial.values()))) <= {m.sha256 for m in corpus.small}
        assert not any((mail / "tmp").iterdir()), "nothing half-written stays"

        (whole,) = await poll_all(config, fetcher)
        assert (whole.result, whole.fetched) == (PollResult.OK, len(corpus.small) - len(partial))
        assert digests(list(local_files(mail).values())) == sorted(m.sha256 for m in corpus.small)
        await trio.to_thread.run_sync(dovecot.wait_sessions_ended, small_account, 2)
        assert small_account.count() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of SMALL_DISK_BYTES at tmp_path/disk (the suite runs as root, as CI does)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_BYTES}", "tmpfs", str(disk)]
    result = subprocess.run(mount, capture_output=True, check=False)
    assert result.returncode == 0, f"cannot mount a tmpfs: {result.stderr.decode()}"
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


# Room for a few of the small corpus messages but not all (the long-line one is 25 KB).
SMALL_DISK_BYTES = 32 * 1024


async def test_a_full_disk_loses_and_deletes_nothing_and_the_next_poll_finishes(  # noqa: PLR0917 (pytest passes fixtures positionally)
    dovecot: DovecotServer,
    small_account: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
    small_disk: Path,
) -> None:
    before = small_account.digests()
    config = gateway_config(tmp_path, dovecot, tls_files, [small_account])  # delete after fetch
    user = config.users["carol"]
    config = replace(config, users={"carol": replace(user, maildir=small_disk / "Maildir")})
    mail = small_disk / "Maildir"
    async with opened_store(config) as store:
        fetcher = Fetcher(given(store), clock=MovableClock(START))
        (full,) = await poll_all(config, fetcher)
        assert full.result is PollResult.MAILDIR_FULL, full
        assert "No space left on device" in full.reason
        await trio.to_thread.run_sync(dovecot.wait_sessions_ended, small_account, 1)
        assert small_account.digests() == before, "nothing deleted upstream"
        partial = local_files(mail)
        assert len(partial) < len(corpus.small)
        assert set(digests(list(partial.values()))) <= {m.sha256 for m in corpus.small}
        assert not any((mail / "tmp").iterdir()), "nothing half-written stays"

        remount = ["mount", "-o", "remount,size=4m", str(small_disk)]
        await trio.run_process(remount, capture_stdout=True, capture_stderr=True)
        (whole,) = await poll_all(config, fetcher)
        assert whole.result is PollResult.OK, whole
        assert digests(list(local_files(mail).values())) == sorted(m.sha256 for m in corpus.small)
        await trio.to_thread.run_sync(dovecot.wait_sessions_ended, small_account, 2)
        assert small_account.count() == 0


async def test_explain_says_what_the_next_poll_would_do_and_changes_nothing(
    dovecot: DovecotServer,
    small_account: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    config = gateway_config(tmp_path, dovecot, tls_files, [small_account], rules=DELETE_EXPIRE)
    user = config.users["carol"]
    clock = MovableClock(START)
    async with opened_store(config) as store:
        before = await explain_sources(config, user, clock, store.gateway_facts)
        ((source, rows),) = [(e.source, e.messages) for e in before]
        assert source.label == f"{UPSTREAM}/{small_account.name}"
        assert len(rows) == len(corpus.small)
        assert {(r.known, r.next_poll) for r in rows} == {
            ("new", "fetch, keep upstream [keep-a-week]")
        }
        assert await store.gateway_sources() == [], "a dry run writes nothing"
        assert not (tmp_path / "carol-mail").exists()

        await poll_all(config, Fetcher(given(store), clock=clock))
        clock.now = START + timedelta(days=8)
        (after,) = await explain_sources(config, user, clock, store.gateway_facts)
        assert {(r.known, r.next_poll) for r in after.messages} == {
            ("delivered", "delete upstream at QUIT (expired) [keep-a-week]")
        }
        assert all(r.expires_at == START + timedelta(days=7) for r in after.messages)
    await trio.to_thread.run_sync(dovecot.wait_sessions_ended, small_account, 3)
    assert small_account.count() == len(corpus.small), "explain deleted nothing upstream"


@pytest.mark.slow
async def test_the_whole_corpus_with_the_50_mb_message_is_fetched_byte_exact(
    dovecot: DovecotServer,
    dovecot_user: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    config = gateway_config(tmp_path, dovecot, tls_files, [dovecot_user], rules=KEEP)
    mail = tmp_path / "carol-mail"
    async with opened_store(config) as store:
        with trio.fail_after(TEST_DEADLINE_SECONDS):
            (report,) = await poll_all(config, Fetcher(given(store), clock=MovableClock(START)))
    assert (report.result, report.fetched) == (PollResult.OK, len(corpus.messages))
    got = [file_digest(path)[1] for sub in ("new", "cur") for path in (mail / sub).iterdir()]
    assert sorted(got) == sorted(m.sha256 for m in corpus.messages)
    assert report.fetched_bytes == sum(m.size for m in corpus.messages)


async def test_an_unusable_ca_file_fails_the_poll_not_the_fetcher(
    dovecot: DovecotServer,
    small_account: DovecotUser,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    config = gateway_config(
        tmp_path, dovecot, tls_files, [small_account], rules=KEEP, leg="implicit"
    )
    garbage = tmp_path / "garbage-ca.pem"
    garbage.write_text("not a certificate\n")
    upstream = replace(config.upstreams[UPSTREAM], ca_file=garbage)
    broken = replace(config, upstreams={UPSTREAM: upstream})
    async with opened_store(config) as store:
        fetcher = Fetcher(given(store), clock=MovableClock(START))
        (report,) = await poll_all(broken, fetcher)
        assert (report.result, report.fetched) == (PollResult.UPSTREAM_ERROR, 0)
        assert report.reason.startswith("tls:")
        (fine,) = await poll_all(config, fetcher)
        assert fine.result is PollResult.OK


async def test_max_maildir_bytes_pauses_fetching_and_deletes_nothing(
    dovecot: DovecotServer,
    small_account: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    config = gateway_config(tmp_path, dovecot, tls_files, [small_account])  # delete after fetch
    mail = make_maildir(tmp_path / "carol-mail")
    (mail / "cur" / "1.big.host:2,S").write_bytes(b"x" * (2 * 1024 * 1024))
    user = replace(config.users["carol"], max_maildir_bytes=2 * 1024 * 1024)
    limited = replace(config, users={"carol": user})
    async with opened_store(config) as store:
        fetcher = Fetcher(given(store), clock=MovableClock(START))
        (paused,) = await poll_all(limited, fetcher)
        assert (paused.result, paused.fetched, paused.deleted) == (PollResult.MAILDIR_FULL, 0, 0)
        assert "max_maildir_bytes is 2097152" in paused.reason
        assert small_account.count() == len(corpus.small)
        (mail / "cur" / "1.big.host:2,S").unlink()  # the user made room
        (resumed,) = await poll_all(limited, fetcher)
        assert (resumed.result, resumed.fetched) == (PollResult.OK, len(corpus.small))
