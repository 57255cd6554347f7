"""Scale-out (issue 13, "What it must show"; docs/scaling.md): two popproxy processes
share one PostgreSQL store behind a real HAProxy (PROXY protocol v2, health checks)
in front of the suite's Dovecot.

The fleet: instances A and B (subprocesses, one config each but the same users,
rules and store), with `state.lease_seconds: 3` so the bound on a dead instance's
leases is short. HAProxy has a frontend for each instance alone (so a test knows
where a session lands) and one balancing over both with health checks. Each test
uses Dovecot accounts of its own; the SIGKILL test comes last (it kills A).

The PostgreSQL outage test runs its own throwaway cluster (initdb and pg_ctl in a
temporary directory, as scripts/with-postgres does), never the machine's server.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from state.state_backends import new_postgres_backend

from .dovecot import DovecotServer, DovecotUser
from .haproxy import HAProxy
from .harness import (
    LOOPBACK,
    MESSAGES,
    PASSWORD,
    SOCKET_TIMEOUT_SECONDS,
    Corpus,
    ProxyUser,
    ServerProcess,
    TlsFiles,
    poplib_connection,
    write_config,
)
from .test_proxy import UPSTREAM, local_user, upstream_for
from .test_retention import KEEP, stored, uidls

# state.lease_seconds of the fleet: the shortest allowed, so a dead instance's
# mailboxes are free again within about 3 s.
LEASE_SECONDS = 3
# limits.account_wait_seconds: how long a second session waits for the first.
ACCOUNT_WAIT_SECONDS = 1.0
# limits.auth_lockout_failures of the fleet (per user name).
LOCKOUT_FAILURES = 3
# Accounts the module's fleet serves, one (or two) per test.
ACCOUNTS = ("serial", "wait", "retention", "lockout", "balance", "kill")

FLEET_HAPROXY = """\
global
    maxconn 256

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend only_a
    bind fd@{a_fd}
    default_backend only_a

frontend only_b
    bind fd@{b_fd}
    default_backend only_b

frontend both
    bind fd@{both_fd}
    default_backend both

backend only_a
    server a {address}:{port_a} send-proxy-v2

backend only_b
    server b {address}:{port_b} send-proxy-v2

backend both
    balance roundrobin
    option tcp-check
    tcp-check expect string +OK
    server a {address}:{port_a} send-proxy-v2 check check-send-proxy inter 200
    server b {address}:{port_b} send-proxy-v2 check check-send-proxy inter 200
"""


def instance(
    workdir: Path,
    tls: TlsFiles,
    dovecot: DovecotServer,
    users: list[ProxyUser],
    state_url: str,
    *,
    trusted: str | None = "127.0.0.1/32",
    lease_seconds: float = LEASE_SECONDS,
) -> ServerProcess:
    """One popproxy of a fleet: a plain listener (PROXY headers from ``trusted``, or
    none), proxy users on Dovecot, keep rules, the shared store and short leases."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir / "popproxy.yaml",
        users=users,
        tls=tls,
        listeners=["none"],
        upstreams={UPSTREAM: upstream_for(dovecot, "none")},
        rules=KEEP,
        state=state_url,
        limits={
            "account_wait_seconds": ACCOUNT_WAIT_SECONDS,
            "auth_lockout_failures": LOCKOUT_FAILURES,
        },
    )
    data: dict[str, Any] = yaml.safe_load(config.read_text())
    if trusted is not None:
        data["listen"][0]["proxy_protocol"] = True
        data["trusted_proxies"] = [trusted]
    data["state"]["lease_seconds"] = lease_seconds
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    server = ServerProcess(config, listeners=["none"], cwd=workdir)
    server.wait_ready()
    return server


@dataclass
class Fleet:
    a: ServerProcess
    b: ServerProcess
    haproxy: HAProxy
    accounts: dict[str, DovecotUser]
    state_url: str

    def login(self, frontend: str, user: str, password: str = PASSWORD) -> poplib.POP3:
        pop = poplib_connection(self.haproxy.port(frontend))
        pop.user(user)
        pop.pass_(password)
        return pop


def users_of(account: DovecotUser, tag: str) -> list[ProxyUser]:
    """Two local users, phone and desk, on one Dovecot account."""
    return [local_user(account, f"{who}-{tag}") for who in ("phone", "desk")]


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    tls_files: TlsFiles,
    dovecot: DovecotServer,
    corpus: Corpus,
    pg_database: str,
) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    accounts = {
        tag: dovecot.add_user(corpus=corpus, messages=corpus.small[:MESSAGES]) for tag in ACCOUNTS
    }
    users = [u for tag, account in accounts.items() for u in users_of(account, tag)]
    url = new_postgres_backend(pg_database).url
    servers: list[ServerProcess] = []
    proxy: HAProxy | None = None
    try:
        for name in ("a", "b"):
            servers.append(instance(workdir / name, tls_files, dovecot, users, url))
        a, b = servers
        ports = {"port_a": a.port("none"), "port_b": b.port("none")}
        proxy = HAProxy(workdir, FLEET_HAPROXY, ("a", "b", "both"), **ports)
        yield Fleet(a, b, proxy, accounts, url)
    finally:
        if proxy is not None:
            proxy.stop()
        failures = []
        for server in servers:
            code = server.stop()
            if code != 0 and not server.crashed:
                failures.append(f"exit {code}\n{server.log_text()}")
        for account in accounts.values():
            dovecot.remove_user(account)
        assert not failures, failures


def logins(server: ServerProcess, user: str) -> int:
    """Sessions of ``user`` that ended with QUIT on ``server`` (its session_end lines)."""
    return sum(
        r.get("user") == user and r.get("result") == "quit" for r in server.records("session_end")
    )


def wait_logins(server: ServerProcess, user: str, count: int) -> None:
    """Wait until ``server`` has logged ``count`` sessions of ``user`` ended by QUIT."""
    server.wait_for_log(
        lambda records: (
            sum(
                r.get("msg") == "session_end"
                and r.get("user") == user
                and r.get("result") == "quit"
                for r in records
            )
            >= count
        ),
        timeout=SOCKET_TIMEOUT_SECONDS,
        what=f"{count} sessions of {user}",
    )


def test_sessions_of_one_account_on_two_instances_are_serialized(fleet: Fleet) -> None:
    """phone holds the account through A; desk through B waits, then gets [IN-USE];
    once phone has quit, desk gets in through B."""
    first = fleet.login("a", "phone-serial")
    second = poplib_connection(fleet.haproxy.port("b"))
    second.user("desk-serial")
    started = time.monotonic()
    with pytest.raises(poplib.error_proto) as refused:
        second.pass_(PASSWORD)
    waited = time.monotonic() - started
    assert refused.value.args[0].startswith(b"-ERR [IN-USE]")
    assert waited >= ACCOUNT_WAIT_SECONDS * 0.9
    assert first.quit().startswith(b"+OK")
    second.close()
    third = fleet.login("b", "desk-serial")
    assert len(uidls(third)) == MESSAGES
    assert third.quit().startswith(b"+OK")
    wait_logins(fleet.a, "phone-serial", 1)
    wait_logins(fleet.b, "desk-serial", 1)
    assert logins(fleet.a, "desk-serial") == logins(fleet.b, "phone-serial") == 0


def test_a_session_waiting_on_another_instance_gets_in_when_the_first_quits(
    fleet: Fleet,
) -> None:
    """While desk waits on B, phone quits on A: desk's login succeeds within its wait,
    and the two sessions never overlap (the second starts after the first ended)."""
    first = fleet.login("a", "phone-wait")
    result: list[object] = []

    def second() -> None:
        try:
            pop = fleet.login("b", "desk-wait")
            result.append(time.monotonic())
            pop.quit()
        except Exception as exc:  # collected: a thread's exception is not a failure
            result.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(ACCOUNT_WAIT_SECONDS / 4)
    assert first.quit().startswith(b"+OK")
    quit_done = time.monotonic()
    thread.join(SOCKET_TIMEOUT_SECONDS)
    assert not thread.is_alive()
    [got_in] = result
    assert isinstance(got_in, float), got_in
    assert got_in >= quit_done


def test_retention_written_through_one_instance_is_seen_by_the_other(fleet: Fleet) -> None:
    """keep: phone deletes message 1 through A (hidden for phone); through B phone no
    longer sees it, desk still does, and Dovecot still has every message."""
    account = fleet.accounts["retention"]
    pop = fleet.login("a", "phone-retention")
    listed = uidls(pop)
    pop.dele(1)
    assert pop.quit().startswith(b"+OK")
    again = fleet.login("b", "phone-retention")
    assert uidls(again) == listed[1:]
    again.quit()
    desk = fleet.login("b", "desk-retention")
    assert uidls(desk) == listed
    desk.quit()
    assert account.count() == MESSAGES
    rows = {
        row.uid: row for row in stored(fleet.state_url) if row.account.upstream_user == account.name
    }
    assert [user for user, _rule, _at in rows[listed[0]].hidden_for] == ["phone-retention"]


def test_a_user_locked_out_through_one_instance_is_locked_out_through_the_other(
    fleet: Fleet,
) -> None:
    """LOCKOUT_FAILURES wrong passwords for phone through A lock phone out: the right
    password through B is refused before any hash, and desk is not locked."""
    for n in range(LOCKOUT_FAILURES):
        pop = poplib_connection(fleet.haproxy.port("a"))
        pop.user("phone-lockout")
        with pytest.raises(poplib.error_proto) as failed:
            pop.pass_(f"wrong-guess-{n}")
        assert failed.value.args[0].startswith(b"-ERR [AUTH]")
        pop.close()
    fleet.a.wait_for_log(
        lambda records: any(
            r.get("msg") == "login_lockout" and r.get("user") == "phone-lockout" for r in records
        ),
        timeout=SOCKET_TIMEOUT_SECONDS,
        what="msg=login_lockout on A",
    )
    with pytest.raises(poplib.error_proto) as refused:
        fleet.login("b", "phone-lockout")
    assert refused.value.args[0].startswith(b"-ERR [AUTH]")
    fleet.b.wait_for_log(
        lambda records: any(
            r.get("msg") == "login_refused"
            and r.get("user") == "phone-lockout"
            and r.get("scope") == "user"
            for r in records
        ),
        timeout=SOCKET_TIMEOUT_SECONDS,
        what="msg=login_refused scope=user on B",
    )
    desk = fleet.login("b", "desk-lockout")  # another user of the same address and account
    assert desk.quit().startswith(b"+OK")


def test_health_checks_and_balancing_spread_logins_over_both_instances(fleet: Fleet) -> None:
    """Through the balancing frontend (PROXY v2, health checks), logins land on both
    instances; each is a whole session."""
    before = logins(fleet.a, "phone-balance") + logins(fleet.b, "phone-balance")
    for _ in range(4):
        pop = fleet.login("both", "phone-balance")
        assert len(uidls(pop)) == MESSAGES
        assert pop.quit().startswith(b"+OK")
    deadline = time.monotonic() + SOCKET_TIMEOUT_SECONDS
    while logins(fleet.a, "phone-balance") + logins(fleet.b, "phone-balance") < before + 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert logins(fleet.a, "phone-balance") >= 1
    assert logins(fleet.b, "phone-balance") >= 1
    for server in (fleet.a, fleet.b):
        assert not server.records("proxy_header_invalid"), server.log_text()


def test_sigkill_of_an_instance_mid_session_deletes_nothing_and_frees_its_lock_in_time(
    fleet: Fleet,
) -> None:
    """phone marks every message deleted through A, then A is killed (SIGKILL) before
    QUIT: Dovecot keeps every message, and desk gets the account through B within
    lease_seconds of the kill."""
    account = fleet.accounts["kill"]
    pop = fleet.login("a", "phone-kill")
    for n in range(1, MESSAGES + 1):
        pop.dele(n)
    fleet.a.crash()
    killed = time.monotonic()
    with contextlib.suppress(OSError, poplib.error_proto):
        pop.quit()
    assert account.count() == MESSAGES  # no deletion without QUIT (invariant 2)
    # Right after the kill the lease is still A's: B refuses after its wait ...
    second = poplib_connection(fleet.haproxy.port("b"))
    second.user("desk-kill")
    with pytest.raises(poplib.error_proto) as refused:
        second.pass_(PASSWORD)
    assert refused.value.args[0].startswith(b"-ERR [IN-USE]")
    second.close()
    # ... and within lease_seconds of the kill (plus a wait and a poll) it gets in.
    while True:
        try:
            desk = fleet.login("b", "desk-kill")
            break
        except poplib.error_proto as exc:
            assert exc.args[0].startswith(b"-ERR [IN-USE]")
            assert time.monotonic() - killed < LEASE_SECONDS + ACCOUNT_WAIT_SECONDS + 1
    freed_after = time.monotonic() - killed
    assert freed_after <= LEASE_SECONDS + ACCOUNT_WAIT_SECONDS + 1
    assert len(uidls(desk)) == MESSAGES
    assert desk.quit().startswith(b"+OK")
    assert account.count() == MESSAGES  # keep: nothing deleted


# -- PostgreSQL stopped in the middle of a run ------------------------------------------------


class OwnCluster:
    """A throwaway PostgreSQL cluster (initdb, pg_ctl) on a free loopback port, run as
    the postgres user when the tests run as root (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        assert bindirs, "no PostgreSQL under /usr/lib/postgresql (scripts/test installs it)"
        self.bindir = bindirs[-1]
        self.dir = Path(tempfile.mkdtemp(prefix="popproxy-pg-outage."))
        self.run_as: list[str] = []
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            self.port = probe.getsockname()[1]
        self._call(
            "initdb",
            *("-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8"),
            *("--locale=C", "--no-sync", "--no-instructions"),
        )
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def _call(self, tool: str, *args: str) -> None:
        proc = subprocess.run(
            [*self.run_as, str(self.bindir / tool), *args],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def start(self) -> None:
        options = f"-c listen_addresses={LOOPBACK} -p {self.port} -k {self.dir} -c fsync=off"
        self._call(
            "pg_ctl",
            *("-D", str(self.dir / "data"), "-l", str(self.dir / "server.log")),
            *("-w", "-t", "60", "-o", options, "start"),
        )

    def stop(self) -> None:
        self._call("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(AssertionError):
            self._call("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_cluster() -> Iterator[OwnCluster]:
    cluster = OwnCluster()
    try:
        yield cluster
    finally:
        cluster.remove()


# How long the outage test waits for logins to work again once PostgreSQL is back
# (the connection pools retry with a growing backoff).
RECOVERY_SECONDS = 20


def test_postgres_stopped_mid_run_refuses_logins_deletes_nothing_and_recovers(
    tmp_path: Path,
    tls_files: TlsFiles,
    dovecot: DovecotServer,
    corpus: Corpus,
    own_cluster: OwnCluster,
) -> None:
    account = dovecot.add_user(corpus=corpus, messages=corpus.small[:MESSAGES])
    server: ServerProcess | None = None
    try:
        users = users_of(account, "outage")
        server = instance(
            tmp_path / "popproxy", tls_files, dovecot, users, own_cluster.url, trusted=None
        )
        port = server.port("none")

        def login(user: str) -> poplib.POP3:
            pop = poplib_connection(port)
            pop.user(user)
            pop.pass_(PASSWORD)
            return pop

        running = login("phone-outage")
        listed = uidls(running)
        running.dele(1)
        own_cluster.stop()
        # The running session's QUIT cannot confirm its lock: nothing is deleted.
        with pytest.raises(poplib.error_proto) as failed:
            running.quit()
        assert failed.value.args[0].startswith(b"-ERR [SYS/TEMP]")
        assert account.count() == MESSAGES
        # New logins are refused for now, with a temporary error.
        with pytest.raises(poplib.error_proto) as refused:
            login("desk-outage")
        assert refused.value.args[0].startswith(b"-ERR [SYS/TEMP]")
        assert account.count() == MESSAGES
        own_cluster.start()
        # No restart of popproxy: logins work again by themselves.
        deadline = time.monotonic() + RECOVERY_SECONDS
        while True:
            try:
                back = login("phone-outage")
                break
            except poplib.error_proto as exc:
                assert exc.args[0].startswith(b"-ERR [SYS/TEMP]"), exc
                assert time.monotonic() < deadline, server.log_text()
                time.sleep(0.5)
        assert uidls(back) == listed  # the failed QUIT hid nothing
        back.dele(1)
        assert back.quit().startswith(b"+OK")
        assert account.count() == MESSAGES  # keep: hidden, not deleted upstream
        logged = {r.get("msg") for r in server.records()}
        assert {"lease_unconfirmed", "login_unavailable", "lease_renewal_failed"} <= logged
        again = login("phone-outage")
        assert uidls(again) == listed[1:]
        again.quit()
    finally:
        if server is not None:
            assert server.stop() == 0, server.log_text()
        dovecot.remove_user(account)
