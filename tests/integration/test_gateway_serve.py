"""The gateway inside ``popproxy run`` and ``popproxy fetch --once``, against the real
Dovecot, with real clients (curl, fetchmail, getmail6) reading what it fetched through
popproxy's own POP3 listener (issue 17)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import StartServer
from .dovecot import DovecotServer, DovecotUser
from .harness import (
    LOOPBACK,
    PASSWORD,
    Corpus,
    ServerProcess,
    TlsFiles,
    describe,
    run_client,
    write_config,
)
from .test_fetchmail import FETCHMAIL_MAIL_RETRIEVED, FETCHMAIL_NO_MAIL, Fetchmail, match_delivered
from .test_fetchmail import TRANSPORTS as FETCHMAIL_TRANSPORTS
from .test_gateway import LOCAL, gateway_user
from .test_getmail import RETURN_PATH_LINE, getmailrc
from .test_metrics_live import scrape
from .test_proxy import UPSTREAM, upstream_for

# Long enough that no second scheduled poll runs during a test: polls come from the
# start, from SIGUSR1, or from fetch --once.
INTERVAL = {"interval_seconds": 3600, "jitter_seconds": 0}
POLL_WAIT_SECONDS = 60


@pytest.fixture
def start_gateway(
    start: StartServer, dovecot: DovecotServer, small_account: DovecotUser, tmp_path: Path
) -> StartServer:
    """Starts ``popproxy run`` with LOCAL fetching from ``small_account`` over Dovecot's
    ``leg`` (its one argument), polling at the start only (INTERVAL); keywords go to
    ``start``."""

    def _start(leg: str, **options: Any) -> ServerProcess:
        return start(
            users=[gateway_user(tmp_path, small_account)],
            upstreams={UPSTREAM: upstream_for(dovecot, leg)},
            gateway=INTERVAL,
            **options,
        )

    return _start


def wait_polls(server: ServerProcess, count: int) -> list[dict[str, str]]:
    server.wait_for_log(
        lambda rs: sum(r.get("msg") == "gateway_poll" for r in rs) >= count,
        timeout=POLL_WAIT_SECONDS,
        what=f"{count} gateway_poll lines",
    )
    return server.records("gateway_poll")


def curl(server: ServerProcess, path: str = "") -> bytes:
    url = f"pop3://{LOCAL}:{PASSWORD}@{LOOPBACK}:{server.port('none')}/{path}"
    result = run_client(["curl", "--silent", "--show-error", "--max-time", "60", url])
    assert result.returncode == 0, describe(result)
    return result.stdout


def curl_digests(server: ServerProcess) -> list[str]:
    numbers = [int(line.split()[0]) for line in curl(server).splitlines() if line.strip()]
    return sorted(hashlib.sha256(curl(server, str(n))).hexdigest() for n in numbers)


def test_run_polls_at_start_and_on_sigusr1_and_curl_reads_every_message_byte_exact(
    start_gateway: StartServer, dovecot: DovecotServer, small_account: DovecotUser, corpus: Corpus
) -> None:
    server = start_gateway("starttls", listeners=["none"], metrics={"address": LOOPBACK, "port": 0})
    (first,) = wait_polls(server, 1)
    assert first["result"] == "ok", first
    assert first["fetched"] == str(len(corpus.small))
    assert first["deleted"] == str(len(corpus.small)), "no rules: download and delete"
    assert first["user"] == LOCAL and first["source"] == f"{UPSTREAM}/{small_account.name}"
    dovecot.wait_sessions_ended(small_account, 1)
    assert small_account.count() == 0
    expected = sorted(m.sha256 for m in corpus.small)
    assert curl_digests(server) == expected

    small_account.deliver(b"Subject: later\r\n\r\nbody\r\n")
    os.kill(server.pid, signal.SIGUSR1)
    second = wait_polls(server, 2)[1]
    assert (second["result"], second["fetched"], second["deleted"]) == ("ok", "1", "1")
    later = hashlib.sha256(b"Subject: later\r\n\r\nbody\r\n").hexdigest()
    assert curl_digests(server) == sorted([*expected, later])

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scrape(server).decode())
        for s in family.samples
    }
    up = (("upstream", UPSTREAM),)
    assert samples["popproxy_gateway_polls_total", (("result", "ok"), *up)] == 2
    assert samples["popproxy_gateway_fetched_messages_total", up] == len(corpus.small) + 1
    deleted = (("rule", "default"), *up)
    assert samples["popproxy_gateway_deleted_messages_total", deleted] == len(corpus.small) + 1
    assert samples["popproxy_gateway_poll_duration_seconds_count", up] == 2
    assert samples["popproxy_gateway_last_success_timestamp_seconds", up] > 0
    assert samples["popproxy_gateway_sources_in_backoff", up] == 0
    assert samples["popproxy_gateway_poll_interval_seconds", ()] == INTERVAL["interval_seconds"]


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["stls"])
def test_fetchmail_reads_the_gateway_maildir_then_finds_nothing_new(
    start_gateway: StartServer, corpus: Corpus, tls_files: TlsFiles, tmp_path: Path, transport: str
) -> None:
    server = start_gateway("implicit")
    assert wait_polls(server, 1)[0]["result"] == "ok"
    kind, tls_options = FETCHMAIL_TRANSPORTS[transport]
    (tmp_path / "fm").mkdir()
    fetchmail = Fetchmail.setup(
        tmp_path / "fm",
        server.port(kind),
        LOCAL,
        PASSWORD,
        tls_options.format(ca=tls_files.ca_cert),
    )
    first = fetchmail.run()
    assert first.returncode == FETCHMAIL_MAIL_RETRIEVED, describe(first)
    got = match_delivered(fetchmail.delivered(), corpus.small)
    assert len(got) == len(corpus.small)
    second = fetchmail.run()
    assert second.returncode == FETCHMAIL_NO_MAIL, describe(second)


@pytest.mark.slow
def test_getmail_reads_the_gateway_maildir_byte_exact(
    start_gateway: StartServer, corpus: Corpus, tls_files: TlsFiles, tmp_path: Path
) -> None:
    getmail = shutil.which("getmail")
    assert getmail is not None, "getmail6 is not installed (scripts/test installs it)"
    server = start_gateway("none")
    assert wait_polls(server, 1)[0]["result"] == "ok"
    state, out = tmp_path / "getmaildir", tmp_path / "delivered"
    state.mkdir()
    out.mkdir()
    rc = tmp_path / "getmailrc"
    rc.write_text(getmailrc(server, "implicit-tls", tls_files, out, read_all=True, username=LOCAL))
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    result = run_client([getmail, f"--rcfile={rc}", f"--getmaildir={state}"], env=env)
    assert result.returncode == 0, describe(result)
    digests = set()
    for path in out.iterdir():
        data = path.read_bytes()
        assert data.startswith(RETURN_PATH_LINE)
        crlf = data[len(RETURN_PATH_LINE) :].replace(b"\n", b"\r\n")
        digests.add(hashlib.sha256(crlf).hexdigest())
    assert digests == {m.sha256 for m in corpus.small}


def fetch_once(config: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return run_client(
        [sys.executable, "-m", "popproxy", "fetch", "--once", "-c", str(config), *extra],
        cwd=config.parent,
    )


def test_fetch_once_exits_0_when_every_source_succeeds_and_1_when_one_fails(
    dovecot: DovecotServer,
    small_account: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    upstreams = {UPSTREAM: upstream_for(dovecot, "none")}
    good = write_config(
        tmp_path / "good.yaml",
        users=[gateway_user(tmp_path, small_account)],
        tls=tls_files,
        listeners=["none"],
        upstreams=upstreams,
    )
    explained = run_client(
        [sys.executable, "-m", "popproxy", "explain", "-c", str(good), "--user", LOCAL],
        cwd=good.parent,
    )
    assert explained.returncode == 0, describe(explained)
    assert f"source {UPSTREAM}/{small_account.name}: {len(corpus.small)} messages".encode() in (
        explained.stdout
    )
    assert explained.stdout.count(b"fetch, then delete upstream at QUIT [default]") == len(
        corpus.small
    )
    result = fetch_once(good, "--user", LOCAL)
    assert result.returncode == 0, describe(result)
    assert b"msg=gateway_poll" in result.stderr and b"result=ok" in result.stderr
    assert len(list((tmp_path / "carol-mail" / "new").iterdir())) == len(corpus.small)

    bad = write_config(
        tmp_path / "bad.yaml",
        users=[gateway_user(tmp_path, small_account, password="wrong")],
        tls=tls_files,
        listeners=["none"],
        upstreams=upstreams,
    )
    result = fetch_once(bad)
    assert result.returncode == 1, describe(result)
    assert b"result=auth_failed" in result.stderr
    assert b"wrong" not in result.stderr

    result = fetch_once(good, "--user", "nobody")
    assert result.returncode == 2, describe(result)


def test_a_reload_adds_a_source_and_polls_it_without_a_restart(  # noqa: PLR0917 (pytest passes fixtures positionally)
    start_gateway: StartServer,
    dovecot: DovecotServer,
    small_account: DovecotUser,
    corpus: Corpus,
    tmp_path: Path,
    tls_files: TlsFiles,
) -> None:
    second = dovecot.add_user(corpus=corpus, messages=corpus.small[:2])
    try:
        upstreams = {UPSTREAM: upstream_for(dovecot, "none")}
        server = start_gateway("none", listeners=["none"])
        (first,) = wait_polls(server, 1)
        assert first["source"] == f"{UPSTREAM}/{small_account.name}"
        write_config(
            server.config,
            users=[gateway_user(tmp_path, small_account, second)],
            tls=tls_files,
            listeners=["none"],
            upstreams=upstreams,
            gateway=INTERVAL,
        )
        server.proc.send_signal(signal.SIGHUP)
        polls = wait_polls(server, 2)
        assert polls[1]["source"] == f"{UPSTREAM}/{second.name}"
        assert (polls[1]["result"], polls[1]["fetched"]) == ("ok", "2")
        assert server.records("reloaded"), "the reload was applied"
    finally:
        dovecot.remove_user(second)
