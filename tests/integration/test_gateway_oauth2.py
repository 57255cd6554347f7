"""The gateway fetching with XOAUTH2 from the real Dovecot's ``oauth2`` passdb (issue 14).

The Dovecot and the loopback provider (token and introspection endpoints) are those
of test_oauth2.py. In-process polls (``Fetcher`` and ``Scheduler`` against the real
Dovecot) show delivery, expiry, rotation, revocation and a token endpoint that is
down; the trio clock is a ``MockClock`` running at real speed that the expiry test
moves past a token's lifetime (no real sleep). ``popproxy run``, ``fetch --once`` and
``explain`` show the same through the command line, with the process's token cache
shared with proxy sessions and kept across a reload.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from oauth2_provider import FakeProvider
from prometheus_client.parser import text_string_to_metric_families

from popproxy.config import Config, load_config
from popproxy.gateway.fetcher import Fetcher, PollReport
from popproxy.gateway.schedule import Backoff, Scheduler
from popproxy.maildrop.retention import utc_now
from popproxy.oauth2.cache import TokenCache
from popproxy.outcomes import PollResult

from . import test_oauth2
from .conftest import StartServer
from .dovecot import DovecotServer, DovecotUser
from .harness import (
    LOOPBACK,
    PASSWORD,
    Corpus,
    GatewayUser,
    ProxyUser,
    ServerProcess,
    Source,
    TlsFiles,
    describe,
    run_client,
    write_config,
)
from .test_gateway import LOCAL, digests, given, local_files, opened_store, poll_all
from .test_gateway_serve import wait_polls
from .test_metrics_live import scrape
from .test_oauth2 import oauth_upstream

# The Dovecot with the oauth2 passdb, its provider, and the refresh-token file of
# ``mailbox`` (this module's own: every small message of the corpus), as in test_oauth2.py.
provider = test_oauth2.provider
oauth_dovecot = test_oauth2.oauth_dovecot
provider_defaults = test_oauth2.provider_defaults
tokens = test_oauth2.tokens

UPSTREAM = "oauth"
TEST_DEADLINE_SECONDS = 60
RELOAD_DEADLINE_SECONDS = 30
# Scheduled polls come at the start and on SIGUSR1 only; the first at once (no jitter).
# A refused login waits AUTH_BACKOFF_SECONDS, another failure BACKOFF_SECONDS.
AUTH_BACKOFF_SECONDS = 600
BACKOFF_SECONDS = 5
GATEWAY = {
    "interval_seconds": 3600,
    "jitter_seconds": 0,
    "auth_backoff_seconds": AUTH_BACKOFF_SECONDS,
    "backoff_initial_seconds": BACKOFF_SECONDS,
}


@pytest.fixture
def mailbox(oauth_dovecot: DovecotServer, corpus: Corpus) -> Iterator[DovecotUser]:
    user = oauth_dovecot.add_user(corpus=corpus, messages=corpus.small)
    yield user
    oauth_dovecot.remove_user(user)


def token_gateway_user(tmp_path: Path, mailbox: DovecotUser, tokens: Path) -> GatewayUser:
    """LOCAL, whose Maildir tmp_path/carol-mail the gateway fills from ``mailbox`` with
    the refresh token in ``tokens``."""
    source = Source(UPSTREAM, mailbox.name, "", refresh_token_file=tokens)
    return GatewayUser(LOCAL, PASSWORD, tmp_path / "carol-mail", (source,))


@pytest.fixture
def config_file(  # noqa: PLR0917 (fixtures)
    oauth_dovecot: DovecotServer,
    provider: FakeProvider,
    mailbox: DovecotUser,
    tokens: Path,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> Path:
    """The config of LOCAL fetching ``mailbox`` with XOAUTH2 (no rules: download and
    delete)."""
    return write_config(
        tmp_path / "popproxy.yaml",
        users=[token_gateway_user(tmp_path, mailbox, tokens)],
        tls=tls_files,
        listeners=["none"],
        upstreams={UPSTREAM: oauth_upstream(oauth_dovecot, provider)},
        gateway=GATEWAY,
    )


@pytest.fixture
def config(config_file: Path) -> Config:
    return load_config(config_file)


def refresh_token(path: Path) -> str:
    """The refresh token the file holds now."""
    return path.read_text().strip()


def corpus_digests(corpus: Corpus) -> list[str]:
    return digests([m.crlf for m in corpus.small if m.crlf is not None])


async def test_xoauth2_poll_delivers_byte_exact_and_refreshes_once_per_expiry(  # noqa: PLR0917 (fixtures)
    config: Config,
    tokens: Path,
    provider: FakeProvider,
    mailbox: DovecotUser,
    corpus: Corpus,
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.rate = 1.0  # real time (the upstream's deadlines), moved on by the test
    mail = config.users[LOCAL].maildir
    assert mail is not None
    async with opened_store(config) as store:
        fetcher = Fetcher(given(store), clock=utc_now, tokens=TokenCache())
        with trio.fail_after(TEST_DEADLINE_SECONDS):
            before = provider.refreshes
            (first,) = await poll_all(config, fetcher)
            assert first.result is PollResult.OK, first
            assert first.fetched == first.deleted == len(corpus.small)
            assert digests(list(local_files(mail).values())) == corpus_digests(corpus)
            assert not any((mail / "tmp").iterdir())
            assert mailbox.count() == 0, "no rules: deleted once durable"
            assert provider.refreshes == before + 1

            new = b"Subject: after expiry\r\n\r\n.a dot-stuffed line\r\n"
            mailbox.deliver(new)
            mock_clock.jump(test_oauth2.PAST_EXPIRY_SECONDS)  # the cached token expired
            (second,) = await poll_all(config, fetcher)
            assert (second.result, second.fetched) == (PollResult.OK, 1), second
            assert provider.refreshes == before + 2, "one refresh for the expiry"
            assert new in local_files(mail).values()
    assert refresh_token(tokens) in provider.refresh_tokens  # not rotated: unchanged


def written_alone_0600(path: Path) -> bool:
    """Whether ``path`` is 0600 and no temporary file of its rewrite is left beside it."""
    leftovers = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    return stat.S_IMODE(path.stat().st_mode) == 0o600 and leftovers == []


async def test_a_rotated_refresh_token_is_written_back_0600_and_used_next(
    config: Config, tokens: Path, provider: FakeProvider
) -> None:
    provider.rotate = True
    old = refresh_token(tokens)
    async with opened_store(config) as store:
        fetcher = Fetcher(given(store), clock=utc_now, tokens=TokenCache())
        with trio.fail_after(TEST_DEADLINE_SECONDS):
            (first,) = await poll_all(config, fetcher)
            assert first.result is PollResult.OK, first
            rotated = refresh_token(tokens)
            assert rotated != old and provider.refresh_tokens.get(rotated) is not None
            assert old not in provider.refresh_tokens
            assert written_alone_0600(tokens)
            # The provider ends the access token early: the next login is refused with
            # invalid_token, refreshed once with the rotated token, and retried.
            provider.expire_access_tokens()
            before = provider.refreshes
            (second,) = await poll_all(config, fetcher)
            assert second.result is PollResult.OK, second
            assert provider.refreshes == before + 1
            assert refresh_token(tokens) not in (old, rotated)


async def first_report(config: Config) -> tuple[PollReport, Backoff]:
    """Run a scheduler over ``config`` until its first poll has ended: the report and the
    source's backoff after it."""
    got: list[tuple[PollReport, Backoff]] = []
    async with opened_store(config) as store:
        fetcher = Fetcher(given(store), clock=utc_now, tokens=TokenCache())
        with trio.fail_after(TEST_DEADLINE_SECONDS):
            async with trio.open_nursery() as nursery:

                def on_report(report: PollReport, backoff: Backoff) -> None:
                    got.append((report, backoff))
                    nursery.cancel_scope.cancel()

                scheduler = Scheduler(
                    fetcher, lambda: config, on_report=on_report, rng=random.Random(0)
                )
                nursery.start_soon(scheduler.run)
    return got[0]


def logged(caplog: pytest.LogCaptureFixture, msg: str) -> list[dict[str, object]]:
    return [r.fields for r in caplog.records if r.getMessage() == msg]  # type: ignore[attr-defined]


async def test_a_revoked_refresh_token_backs_off_as_a_refused_login_and_deletes_nothing(  # noqa: PLR0917 (fixtures)
    config: Config,
    tokens: Path,
    provider: FakeProvider,
    mailbox: DovecotUser,
    corpus: Corpus,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "popproxy")
    provider.revoke(refresh_token(tokens))
    report, backoff = await first_report(config)
    assert report.result is PollResult.AUTH_FAILED, report
    assert "popproxy oauth-login" in report.reason
    assert backoff.auth and backoff.delay(config.gateway, 0.0) == AUTH_BACKOFF_SECONDS
    assert mailbox.count() == len(corpus.small), "nothing deleted upstream"
    mail = config.users[LOCAL].maildir
    assert mail is not None and local_files(mail) == {}
    [revoked] = logged(caplog, "oauth2_refresh_token_revoked")
    assert "popproxy oauth-login" in str(revoked["action"]) and revoked["session"]
    [poll] = logged(caplog, "gateway_poll")
    assert poll["result"] == "auth_failed" and poll["session"] == revoked["session"]
    assert refresh_token(tokens) not in caplog.text


async def test_a_token_endpoint_that_is_down_is_a_temporary_failure(
    config: Config,
    provider: FakeProvider,
    mailbox: DovecotUser,
    corpus: Corpus,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "popproxy")
    provider.down = True
    report, backoff = await first_report(config)
    assert report.result is PollResult.UPSTREAM_ERROR, report
    assert report.reason.startswith("token_unavailable: ")
    assert not backoff.auth and backoff.delay(config.gateway, 0.0) == BACKOFF_SECONDS
    assert mailbox.count() == len(corpus.small)
    assert logged(caplog, "oauth2_refresh_failed")


def metric_samples(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scrape(server).decode())
        for s in family.samples
    }


def reload(server: ServerProcess) -> None:
    done = len(server.records("reloaded"))
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log(
        lambda rs: sum(r.get("msg") == "reloaded" for r in rs) > done,
        timeout=RELOAD_DEADLINE_SECONDS,
        what="a reloaded line",
    )


def test_run_fetches_with_the_process_token_cache_kept_across_a_reload(  # noqa: PLR0917 (fixtures)
    start: StartServer,
    oauth_dovecot: DovecotServer,
    provider: FakeProvider,
    mailbox: DovecotUser,
    tokens: Path,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    before = provider.refreshes
    # A proxy-mode user of the same account: its sessions share the process's tokens.
    proxied = ProxyUser(f"local-{mailbox.name}", PASSWORD, UPSTREAM, mailbox.name, "", tokens)
    server = start(
        users=[token_gateway_user(tmp_path, mailbox, tokens), proxied],
        listeners=["none"],
        upstreams={UPSTREAM: oauth_upstream(oauth_dovecot, provider)},
        gateway=GATEWAY,
        metrics={"address": LOOPBACK, "port": 0},
    )
    (first,) = wait_polls(server, 1)
    assert (first["result"], first["fetched"]) == ("ok", str(len(corpus.small))), first
    assert provider.refreshes == before + 1
    assert test_oauth2.login(server, mailbox) == (0, 0), "fetched and deleted"
    assert provider.refreshes == before + 1, "the proxy session used the poll's token"
    reload(server)
    mailbox.deliver(b"Subject: after the reload\r\n\r\nbody\r\n")
    os.kill(server.pid, signal.SIGUSR1)
    second = wait_polls(server, 2)[1]
    assert (second["result"], second["fetched"]) == ("ok", "1"), second
    assert provider.refreshes == before + 1, "the reload kept the access token"
    provider.expire_access_tokens()  # refused upstream: one refresh, one retry
    os.kill(server.pid, signal.SIGUSR1)
    assert wait_polls(server, 3)[2]["result"] == "ok"
    assert provider.refreshes == before + 2
    samples = metric_samples(server)
    refreshed = (("result", "ok"), ("upstream", UPSTREAM))
    assert samples["popproxy_oauth2_token_refreshes_total", refreshed] == 2
    assert samples["popproxy_gateway_polls_total", refreshed] == 3
    log = server.log_text()
    assert "Bearer" not in log and refresh_token(tokens) not in log


def test_a_revoked_source_polled_hourly_counts_as_failing_until_oauth_login(  # noqa: PLR0917 (fixtures)
    start: StartServer,
    oauth_dovecot: DovecotServer,
    provider: FakeProvider,
    mailbox: DovecotUser,
    tokens: Path,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    """popproxy_oauth2_accounts_failing, which PopproxyOAuth2RefreshFailing reads: a source
    polled once an hour (GATEWAY) whose refresh token was revoked counts as failing from
    its poll on, while its refresh counter moves once an hour at most, and stops counting
    at the first poll after `popproxy oauth-login` wrote a new refresh token."""
    provider.revoke(refresh_token(tokens))
    server = start(
        users=[token_gateway_user(tmp_path, mailbox, tokens)],
        listeners=["none"],
        upstreams={UPSTREAM: oauth_upstream(oauth_dovecot, provider)},
        gateway=GATEWAY,
        metrics={"address": LOOPBACK, "port": 0},
    )
    (first,) = wait_polls(server, 1)
    assert first["result"] == "auth_failed", first
    revoked = (("result", "revoked"), ("upstream", UPSTREAM))
    samples = metric_samples(server)
    assert samples["popproxy_oauth2_accounts_failing", revoked] == 1
    assert samples["popproxy_oauth2_token_refreshes_total", revoked] == 1
    tokens.write_text(provider.grant(mailbox.name) + "\n")  # what oauth-login writes
    # Polled now (SIGUSR1), again until a poll runs past the token cache's backoff
    # (its first is BACKOFF_INITIAL_SECONDS, 1 s): within it the revoked answer stands.
    deadline = time.monotonic() + TEST_DEADLINE_SECONDS
    polls = 1
    while True:
        polls += 1
        os.kill(server.pid, signal.SIGUSR1)
        last = wait_polls(server, polls)[-1]
        if last["result"] == "ok":
            break
        assert last["result"] == "auth_failed", last
        assert time.monotonic() < deadline, server.log_text()
    assert last["fetched"] == str(len(corpus.small)), last
    samples = metric_samples(server)
    for result in ("revoked", "rejected", "unavailable"):
        assert samples["popproxy_oauth2_accounts_failing", (("result", result), revoked[1])] == 0
    assert samples["popproxy_oauth2_token_refreshes_total", revoked] == 1


def popproxy(config: Path, *arguments: str) -> tuple[int, str, str]:
    result = run_client([sys.executable, "-m", "popproxy", *arguments, "-c", str(config)])
    assert result.returncode in (0, 1), describe(result)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def test_explain_and_fetch_once_log_in_with_the_refresh_token(  # noqa: PLR0917 (fixtures)
    config_file: Path,
    tokens: Path,
    provider: FakeProvider,
    mailbox: DovecotUser,
    corpus: Corpus,
    tmp_path: Path,
) -> None:
    code, out, err = popproxy(config_file, "explain", "--user", LOCAL)
    assert code == 0, err
    assert f"source {UPSTREAM}/{mailbox.name}: {len(corpus.small)} messages" in out
    assert out.count("fetch, then delete upstream at QUIT [default]") == len(corpus.small)
    assert mailbox.count() == len(corpus.small), "a dry run changes nothing"

    code, _, err = popproxy(config_file, "fetch", "--once")
    assert code == 0, err
    assert "msg=gateway_poll" in err and "result=ok" in err
    assert digests(list(local_files(tmp_path / "carol-mail").values())) == corpus_digests(corpus)

    provider.revoke(refresh_token(tokens))
    code, _, err = popproxy(config_file, "fetch", "--once")
    assert code == 1
    assert "result=auth_failed" in err and "msg=oauth2_refresh_token_revoked" in err
    assert refresh_token(tokens) not in err
