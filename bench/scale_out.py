"""Scale-out benchmark (issue 13): whole sessions per second through popproxy on sqlite,
on PostgreSQL, and as two processes sharing one port (reuse_port) on PostgreSQL, each
as a ratio to a direct connection to the same Dovecot, in one run.

Usage, from the repository root, as root (Dovecot needs it), with a PostgreSQL on
``POPPROXY_TEST_PG_URL`` (default the machine's, ``postgresql://postgres@127.0.0.1:5432/test``;
``scripts/with-postgres`` starts a throwaway one):

    PYTHONPATH=$PWD .venv/bin/python -m bench.scale_out [--rounds 3] [--sessions 600]
        [--users 200] [--concurrency 32] [--json results.json]

A session is the sessions scenario of bench/run.py: connect, USER, PASS, STAT, LIST,
UIDL, RETR 1, QUIT, over ``--users`` accounts, ``--concurrency`` at a time. popproxy
runs with its defaults that matter here: ``exclusive_sessions`` (so every session
takes its mailbox lock: in-process on sqlite, a lease row on PostgreSQL) and the
login throttle (in memory, or the shared counts), and the retention path: every login
reads its facts, and a QUIT that changes something records it (here each account's
first: the later ones retrieve the same message again, and write nothing). The
PostgreSQL store is a database of the run's own on that server, dropped at the end.
Each round runs every side once, in an order rotated from round to round; the figure
is the median over rounds. Beside each rate, the CPU time per
session of the side's popproxy processes and of the PostgreSQL server processes serving
the run's database (``/proc/PID/stat``; robust to a loaded machine where rates are not).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from integration.harness import (
    LOOPBACK,
    PASSWORD,
    Corpus,
    ProxyUser,
    ServerProcess,
    TlsFiles,
    Upstream,
    make_corpus,
    make_tls_files,
    write_config,
)
from state.state_backends import admin_connection, new_postgres_backend, run_database

from bench.loadgen import BenchError, Conn, Driver, close_all
from bench.servers import (
    PROXY_MAX_SESSIONS,
    PROXY_STOP_DEADLINE_SECONDS,
    raise_fd_limit,
    tuned_dovecot,
)
from bench.stats import median
from bench.wire import body_digest, first_error, session_steps

SIDES = ("direct", "sqlite x1", "postgres x1", "postgres x2 reuse_port")


@dataclass(frozen=True, slots=True)
class Options:
    rounds: int
    sessions: int
    users: int
    concurrency: int
    json: Path | None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def proxy_config(
    workdir: Path,
    tls: TlsFiles,
    users: list[ProxyUser],
    upstream: Upstream,
    state: str | Path,
    *,
    port: int | None = None,
) -> Path:
    """A popproxy config on one plain listener; with ``port``, that port with reuse_port."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir / "popproxy.yaml",
        users=users,
        tls=tls,
        listeners=["none"],
        limits={"max_sessions": PROXY_MAX_SESSIONS, "max_sessions_per_ip": PROXY_MAX_SESSIONS},
        upstreams={"dovecot": upstream},
        state=state,
    )
    if port is not None:
        data = yaml.safe_load(config.read_text())
        data["listen"][0].update(port=port, reuse_port=True)
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


@contextmanager
def instances(configs: Sequence[Path]) -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    try:
        for config in configs:
            server = ServerProcess(config, listeners=["none"], cwd=config.parent)
            servers.append(server)
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop(PROXY_STOP_DEADLINE_SECONDS)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User and system CPU time of ``pids`` so far (0 for one that is gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def database_pids(database_url: str) -> list[int]:
    """The PostgreSQL server processes of popproxy's connections to the run's database."""
    with admin_connection(database_url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'popproxy'"
        ).fetchall()
    return [int(row[0]) for row in rows]


def run_sessions(
    address: tuple[str, int],
    logins: Sequence[tuple[str, str]],
    o: Options,
    expected: tuple[int, str],
) -> float:
    """``o.sessions`` whole sessions at ``address``; sessions per second."""
    conns = [Conn(address, session_steps(*logins[i % len(logins)])) for i in range(o.sessions)]
    driver = Driver(None)
    started = time.perf_counter()
    driver.run(conns, concurrency=o.concurrency)
    wall = time.perf_counter() - started
    driver.close()
    close_all(conns)
    failed = [f for c in conns if (f := c.error or first_error(c.steps, c.replies))]
    if failed:
        raise BenchError(f"{address}: {len(failed)} sessions failed, first: {failed[0]}")
    for conn in conns:
        if body_digest(conn.replies[5]) != expected:
            raise BenchError(f"{address}: RETR 1 returned other content")
    return len(conns) / wall


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_out", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=600, help="sessions per round and side")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    o = Options(args.rounds, args.sessions, args.users, args.concurrency, args.json)
    raise_fd_limit()
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    # CPU ms per session: the side's popproxy processes, and PostgreSQL's for it.
    proxy_cpu: dict[str, list[float]] = {side: [] for side in SIDES[1:]}
    pg_cpu: dict[str, list[float]] = {side: [] for side in SIDES[1:]}
    with tempfile.TemporaryDirectory(prefix="popproxy-scale-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        tls = make_tls_files(tmp / "tls")
        corpus: Corpus = make_corpus(tmp / "small" / "Maildir", big_bytes=0)
        first = min(corpus.small, key=lambda m: m.key)  # Dovecot numbers by key
        expected = (first.size, first.sha256)
        dovecot = tuned_dovecot(tls)
        stack.callback(dovecot.stop, check=False)
        accounts = [
            dovecot.add_user(f"user{i}", f"pw-user{i}", corpus=corpus, messages=corpus.small)
            for i in range(o.users)
        ]
        users = [
            ProxyUser(f"p-{a.name}", PASSWORD, "dovecot", a.name, a.password) for a in accounts
        ]
        upstream = Upstream(*dovecot.endpoint("none"))
        database = run_database()
        pg_database = next(database)
        stack.callback(lambda: next(database, None))  # drops the run's database
        port = free_port()
        configs = {
            "sqlite x1": [proxy_config(tmp / "sqlite", tls, users, upstream, tmp / "state.db")],
            "postgres x1": [
                proxy_config(
                    tmp / "pg1", tls, users, upstream, new_postgres_backend(pg_database).url
                )
            ],
        }
        shared = new_postgres_backend(pg_database).url
        configs["postgres x2 reuse_port"] = [
            proxy_config(tmp / f"pg2-{n}", tls, users, upstream, shared, port=port) for n in (0, 1)
        ]
        direct = dovecot.endpoint("none")
        direct_logins = [(a.name, a.password) for a in accounts]
        proxy_logins = [(u.name, PASSWORD) for u in users]
        servers = {side: stack.enter_context(instances(cfgs)) for side, cfgs in configs.items()}
        addresses = {side: (LOOPBACK, s[0].port("none")) for side, s in servers.items()}
        for side in SIDES[1:]:  # warm-up: logins cached, upstream CAPA known, pools open
            run_sessions(addresses[side], proxy_logins, Options(1, 64, 0, 16, None), expected)
        for r in range(o.rounds):
            order = SIDES[r % len(SIDES) :] + SIDES[: r % len(SIDES)]
            for side in order:
                load = os.getloadavg()[0]
                if side == "direct":
                    rate = run_sessions(direct, direct_logins, o, expected)
                    cpu = ""
                else:
                    proxies = [server.pid for server in servers[side]]
                    backends = database_pids(pg_database) if "postgres" in side else []
                    before = (cpu_seconds(proxies), cpu_seconds(backends))
                    rate = run_sessions(addresses[side], proxy_logins, o, expected)
                    proxy_cpu[side].append((cpu_seconds(proxies) - before[0]) * 1000 / o.sessions)
                    pg_cpu[side].append((cpu_seconds(backends) - before[1]) * 1000 / o.sessions)
                    cpu = f", CPU/session proxy {proxy_cpu[side][-1]:.2f} ms"
                    cpu += f" postgres {pg_cpu[side][-1]:.2f} ms"
                rates[side].append(rate)
                print(
                    f"round {r + 1} {side:24} {rate:8.1f} sessions/s{cpu} (load {load:.1f})",
                    flush=True,
                )
    base = median(rates["direct"])
    print(
        f"\n{'side':24} {'sessions/s':>10} {'ratio to direct':>16}"
        f" {'proxy CPU ms/session':>21} {'postgres CPU ms/session':>24}"
    )
    for side in SIDES:
        value = median(rates[side])
        cpus = ""
        if side in proxy_cpu:
            cpus = f" {median(proxy_cpu[side]):21.2f} {median(pg_cpu[side]):24.2f}"
        print(f"{side:24} {value:10.1f} {value / base:16.2f}{cpus}")
    if o.json is not None:
        o.json.write_text(
            json.dumps(
                {
                    "rounds": rates,
                    "median": {side: median(rates[side]) for side in SIDES},
                    "ratio": {side: median(rates[side]) / base for side in SIDES},
                    "proxy_cpu_ms_per_session": proxy_cpu,
                    "postgres_cpu_ms_per_session": pg_cpu,
                    "options": {
                        "sessions": o.sessions,
                        "users": o.users,
                        "concurrency": o.concurrency,
                        "rounds": o.rounds,
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
