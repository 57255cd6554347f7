"""The servers under test: a Dovecot tuned for throughput and a popproxy in front of it.

Dovecot is the test suite's (tests/integration/dovecot.py: its own config in a
temporary directory, loopback, free ports), with the settings its documentation
gives for throughput appended: long-lived login *and* mail processes, loopback
trusted, an auth cache. popproxy is ``python -m popproxy run`` with a config written
by the suite's harness (tests/integration/harness.py): a plain and an implicit-TLS
listener, proxy mode, every local user mapped to its own Dovecot account over the
plain upstream leg. Peers (bench/peers.py: nginx's mail proxy, perdition) run in
front of the same Dovecot when asked for, as further sides.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from integration.dovecot import DovecotServer, DovecotUser, free_port
from integration.harness import (
    LOOPBACK,
    PASSWORD,
    Corpus,
    CorpusMessage,
    ProxyUser,
    ServerProcess,
    TlsFiles,
    Upstream,
    write_config,
)

from bench.peers import Installed, Peer, PeerUser, running_peer, wait_listening
from bench.stats import parse_proc_stat_ticks, parse_smaps_rollup

REPO = Path(__file__).resolve().parent.parent
# File descriptors popproxy needs besides two per session (client and upstream leg):
# listeners, epoll, trio's wake-up pair, stdio, the state store; counted with room.
PROXY_SPARE_FDS = 64
# Dovecot's limit on connections per service process, for its log, anvil and stats
# services too, each of which holds a connection per mail process.
DOVECOT_CLIENT_LIMIT = 30_000
# How long popproxy may take to exit after SIGTERM in the bench: with 10,000 sessions
# open it logs and closes each one (the suite's 15 s is for a few sessions).
PROXY_STOP_DEADLINE_SECONDS = 120.0
# Sessions popproxy accepts at once in the bench (the default, 1000, is below the
# idle scenario's 10,000).
PROXY_MAX_SESSIONS = 25_000

# Appended to the suite's Dovecot config (repeated settings and sections override it).
# login_processes.rst (high-performance mode: service_count = 0, process_min_avail =
# the number of cores); service_configuration.rst: service_count = 0 for mail
# processes reuses them, which is safe here because every user has the same uid;
# client_limit above 1 is not recommended for mail processes (they block on disk),
# so it is 1 except for the idle scenario, whose sessions do no disk I/O.
_TUNING = """
# --- bench/servers.py: tuned for throughput ---
login_trusted_networks = 127.0.0.0/8
auth_cache_size = 10M
auth_cache_ttl = 1 hour
default_client_limit = {client_limit}
mail_max_userip_connections = 100000
service pop3-login {{
  service_count = 0
  process_min_avail = {cores}
  client_limit = {client_limit}
}}
service pop3 {{
  service_count = 0
  process_min_avail = {cores}
  client_limit = {pop3_clients}
  process_limit = {pop3_processes}
}}
"""


def raise_fd_limit() -> int:
    """Raise this process's RLIMIT_NOFILE to its hard limit and return it; the servers
    started afterwards inherit it.

    Raising the hard limit itself needs CAP_SYS_RESOURCE, which a container may not
    grant: then the hard limit bounds the idle scenario (see ``max_idle_sessions``).
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def max_idle_sessions(fd_limit: int) -> int:
    """How many sessions popproxy can hold at once under ``fd_limit`` (two fds each)."""
    return (fd_limit - PROXY_SPARE_FDS) // 2


def tuned_dovecot(tls: TlsFiles, *, pop3_clients: int = 1, cores: int = 2) -> DovecotServer:
    """Start the suite's Dovecot with the throughput settings; ``pop3_clients`` sessions
    per mail process (1 but for the idle scenario)."""
    extra = _TUNING.format(
        client_limit=DOVECOT_CLIENT_LIMIT,
        cores=cores,
        pop3_clients=pop3_clients,
        pop3_processes=max(64, 12_000 // pop3_clients),
    )
    return DovecotServer.start(tls, extra_config=extra)


# A Dovecot account to create: its name, and the corpus messages its Maildir holds.
Mailbox = tuple[str, Corpus, Sequence[CorpusMessage]]

# The sides every scenario has; peers add theirs (their names, bench/peers.py).
DIRECT = "direct"
POPPROXY = "popproxy"
# popproxy from another checkout (``--baseline``), a side of its own beside popproxy.
BASELINE = "baseline"


@dataclass(frozen=True, slots=True)
class Account:
    """One mailbox, reachable directly (Dovecot) and through popproxy."""

    dovecot: DovecotUser
    proxy_user: str  # popproxy's local user mapped to it; its password is PASSWORD

    def login(self, proxy_user: bool) -> tuple[str, str]:
        """(user, password): popproxy's user, or the Dovecot account's own."""
        if proxy_user:
            return self.proxy_user, PASSWORD
        return self.dovecot.name, self.dovecot.password


class Bench:
    """A running Dovecot, popproxy and peers, and the accounts all of them serve."""

    def __init__(
        self,
        dovecot: DovecotServer,
        proxy: ServerProcess,
        accounts: list[Account],
        peers: Sequence[Peer] = (),
        baseline: ServerProcess | None = None,
    ):
        self.dovecot = dovecot
        self.proxy = proxy
        self.accounts = accounts
        self.peers = {peer.name: peer for peer in peers}
        self.baseline = baseline

    def sides(self, tls: bool) -> tuple[str, ...]:
        """direct, popproxy, the baseline if any, then every peer that listens on this
        client leg."""
        baseline = (BASELINE,) if self.baseline else ()
        peers = (n for n, p in self.peers.items() if tls in p.ports)
        return (DIRECT, POPPROXY, *baseline, *peers)

    def popproxy(self, side: str) -> ServerProcess:
        """The popproxy process of a side: popproxy's or the baseline's."""
        if side == BASELINE and self.baseline is not None:
            return self.baseline
        if side == POPPROXY:
            return self.proxy
        raise ValueError(f"{side} is not a popproxy")

    def address(self, side: str, tls: bool) -> tuple[str, int]:
        """Where a client connects: Dovecot's plain-only or pop3s listener, popproxy's
        (or the baseline's), or a peer's."""
        if side == DIRECT:
            return self.dovecot.endpoint("implicit" if tls else "none")
        if side in self.peers:
            return self.peers[side].address(tls)
        return LOOPBACK, self.popproxy(side).port("implicit" if tls else "none")

    def login(self, account: int, side: str) -> tuple[str, str]:
        """(user, password) of ``accounts[account]`` on ``side``."""
        proxy_user = self.peers[side].proxy_logins if side in self.peers else side != DIRECT
        return self.accounts[account % len(self.accounts)].login(proxy_user)

    def proxy_pss_kib(self, side: str = POPPROXY) -> int:
        """popproxy's proportional set size (its own share of shared pages), in KiB."""
        return pss_kib(self.popproxy(side).pid)

    def proxy_cpu_seconds(self, side: str = POPPROXY) -> float:
        """CPU time popproxy (or a peer) has used so far (user and system)."""
        if side in self.peers:
            return self.peers[side].cpu_seconds()
        text = Path(f"/proc/{self.popproxy(side).pid}/stat").read_text()
        return parse_proc_stat_ticks(text) / os.sysconf("SC_CLK_TCK")

    def dovecot_pss_kib(self) -> int:
        """The PSS of all of Dovecot's processes, in KiB."""
        return sum(pss_kib(pid) for pid in self.dovecot.pids())


def pss_kib(pid: int) -> int:
    """A process's PSS from /proc/PID/smaps_rollup (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return parse_smaps_rollup(text).get("Pss", 0)


def _default_cost_hash() -> str:
    from popproxy.auth.passwords import hash_password
    from popproxy.secret import Secret

    return hash_password(Secret.from_str(PASSWORD))


@contextlib.contextmanager
def running(
    workdir: Path,
    tls: TlsFiles,
    mailboxes: Sequence[Mailbox],
    *,
    pop3_clients: int = 1,
    default_hash_cost: bool = False,
    peers: Sequence[Installed] = (),
    nginx_workers: int = 1,
    baseline: Path | None = None,
) -> Iterator[Bench]:
    """Dovecot with one account per ``(name, corpus, messages)``, popproxy in front,
    and each of ``peers`` in front as well; with ``baseline``, a second popproxy from
    that checkout, with a config and state store of its own.

    popproxy's users are ``p-NAME``, password ``PASSWORD``; their hashes are the
    suite's cheap ones (scrypt ln=4) unless ``default_hash_cost``.
    """
    dovecot = tuned_dovecot(tls, pop3_clients=pop3_clients)
    proxy: ServerProcess | None = None
    before: ServerProcess | None = None
    try:
        accounts = []
        for name, corpus, messages in mailboxes:
            user = dovecot.add_user(name, f"pw-{name}", corpus=corpus, messages=messages)
            accounts.append(Account(user, f"p-{name}"))
        proxy = _start_popproxy(workdir, tls, dovecot, accounts, default_hash_cost)
        if baseline is not None:
            with _python_path(baseline):
                before = _start_popproxy(
                    workdir / BASELINE, tls, dovecot, accounts, default_hash_cost
                )
        users = [
            PeerUser(a.proxy_user, PASSWORD, a.dovecot.name, a.dovecot.password) for a in accounts
        ]
        with contextlib.ExitStack() as stack:
            running_peers = [
                stack.enter_context(
                    running_peer(
                        found,
                        workdir,
                        tls,
                        dovecot.endpoint("none"),
                        users,
                        nginx_workers=nginx_workers,
                    )
                )
                for found in peers
            ]
            yield Bench(dovecot, proxy, accounts, running_peers, before)
    finally:
        for name, server in ((POPPROXY, proxy), (BASELINE, before)):
            if server is not None:
                stopping = time.monotonic()
                server.stop(PROXY_STOP_DEADLINE_SECONDS)
                print(f"   {name} exited {time.monotonic() - stopping:.1f} s after SIGTERM")
        dovecot.stop(check=False)


@contextlib.contextmanager
def _python_path(checkout: Path) -> Iterator[None]:
    """Processes started in the block import popproxy from ``checkout`` (first on
    PYTHONPATH, ahead of the venv's editable install)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(checkout), *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def _start_popproxy(
    workdir: Path,
    tls: TlsFiles,
    dovecot: DovecotServer,
    accounts: Sequence[Account],
    default_hash_cost: bool,
) -> ServerProcess:
    """``popproxy run`` in ``workdir`` (its config and sqlite store there), ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir / "popproxy.yaml",
        users=[
            ProxyUser(a.proxy_user, PASSWORD, "dovecot", a.dovecot.name, a.dovecot.password)
            for a in accounts
        ],
        tls=tls,
        listeners=["none", "implicit"],
        # Every load generator connection comes from 127.0.0.1.
        limits={"max_sessions": PROXY_MAX_SESSIONS, "max_sessions_per_ip": PROXY_MAX_SESSIONS},
        # Many sessions of one account at once (idle: 50 per account), as Dovecot
        # itself allows them (pop3_lock_session = no).
        upstreams={
            "dovecot": Upstream(*dovecot.endpoint("none"), settings={"exclusive_sessions": False})
        },
    )
    if default_hash_cost:
        data = yaml.safe_load(config.read_text())
        phc = _default_cost_hash()
        for entry in data["users"].values():
            entry["password_hash"] = phc
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    proxy = ServerProcess(config, listeners=["none", "implicit"], cwd=workdir)
    try:
        proxy.wait_ready()
    except BaseException:
        proxy.stop(PROXY_STOP_DEADLINE_SECONDS)
        raise
    return proxy


# socat as the relay floor: how long socat may take to exit.
RELAY_STOP_DEADLINE_SECONDS = 10.0


@contextlib.contextmanager
def socat_relay(target: tuple[str, int]) -> Iterator[tuple[str, int]]:
    """A plain TCP relay (socat, one forked process per connection) in front of
    ``target``; yields its address. The floor any one-hop relay starts from."""
    port = free_port(LOOPBACK)
    relay = subprocess.Popen(
        [
            "socat",
            f"TCP-LISTEN:{port},bind={LOOPBACK},reuseaddr,fork",
            f"TCP:{target[0]}:{target[1]},nodelay",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, relay, "socat")
        yield LOOPBACK, port
    finally:
        relay.terminate()
        relay.wait(RELAY_STOP_DEADLINE_SECONDS)
