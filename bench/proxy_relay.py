"""Bench: proxy mode against a direct connection to the same Dovecot, in one run.

Usage (from the repository root, as root, after ./scripts/test made .venv and installed
dovecot-pop3d):

    .venv/bin/python bench/proxy_relay.py [--rounds 5] [--bulk-runs 3] [--retrs 200]

It starts the test suite's Dovecot (tests/integration/dovecot.py: its own config in a
temporary directory, loopback, free ports) with one account holding the corpus's 50 MB
message and one holding a small message, and a `popproxy run` in front of it (plain
upstream leg, plain client listener). Then, for each round, alternating direct and
proxied on one connection each:

- bulk: RETR of the 50 MB message, ``--bulk-runs`` times, in MB/s;
- latency: ``--retrs`` RETRs of the small message, one at a time, in microseconds.

Reads are large (1 MiB) and the terminator is found without parsing lines, so the
load generator is not the bottleneck; it prints its own CPU use. It prints medians and
the proxied/direct ratios. A first look at proxy mode; the full harness (sessions/s,
idle memory, TLS) is the benchmarks issue's.
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from integration.dovecot import DovecotServer  # noqa: E402
from integration.harness import (  # noqa: E402
    LOOPBACK,
    PASSWORD,
    ProxyUser,
    ServerProcess,
    Upstream,
    make_corpus,
    make_tls_files,
    start_server,
)

READ_BYTES = 1 << 20
IO_TIMEOUT_SECONDS = 60.0
TERMINATOR = b"\r\n.\r\n"


class Client:
    """A raw POP3 client: one connection, logged in, large reads."""

    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        self.sock = socket.create_connection((host, port), IO_TIMEOUT_SECONDS)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.status()
        for line in (f"USER {user}", f"PASS {password}"):
            self.sock.sendall(line.encode() + b"\r\n")
            assert self.status().startswith(b"+OK")

    def status(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self.sock.recv(READ_BYTES)
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def retr(self) -> int:
        """RETR 1; the octets of the body, read until the terminator."""
        self.sock.sendall(b"RETR 1\r\n")
        assert self.status().startswith(b"+OK")
        total = len(self.buf)
        tail = self.buf[-5:]
        while not (b"\r\n" + tail).endswith(TERMINATOR):
            chunk = self.sock.recv(READ_BYTES)
            if not chunk:
                raise ConnectionError("closed inside a message")
            total += len(chunk)
            tail = (tail + chunk)[-5:]
        self.buf = b""
        return total

    def close(self) -> None:
        self.sock.sendall(b"QUIT\r\n")
        self.status()
        self.sock.close()


@contextmanager
def servers(tmp: Path) -> Iterator[tuple[DovecotServer, ServerProcess, dict[str, str]]]:
    tls = make_tls_files(tmp / "tls")
    corpus = make_corpus(tmp / "corpus" / "Maildir")
    big = max(corpus.messages, key=lambda m: m.size)
    dovecot = DovecotServer.start(tls)
    try:
        bulk = dovecot.add_user("bulk", "bulk-pw", corpus=corpus, messages=[big])
        small = dovecot.add_user("small", "small-pw", corpus=corpus, messages=corpus.small[:1])
        proxy = start_server(
            tmp / "popproxy",
            users=[
                ProxyUser("p-bulk", PASSWORD, "dovecot", bulk.name, bulk.password),
                ProxyUser("p-small", PASSWORD, "dovecot", small.name, small.password),
            ],
            tls=tls,
            listeners=["none"],
            upstreams={"dovecot": Upstream(*dovecot.endpoint("none"))},
        )
        try:
            yield dovecot, proxy, {"bulk": bulk.password, "small": small.password}
        finally:
            proxy.stop()
    finally:
        dovecot.stop()


def bulk_mbps(client: Client, runs: int) -> list[float]:
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        octets = client.retr()
        rates.append(octets / (time.perf_counter() - started) / 1e6)
    return rates


def latencies_us(client: Client, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        client.retr()
        out.append((time.perf_counter() - started) * 1e6)
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bulk-runs", type=int, default=3)
    parser.add_argument("--retrs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, servers(Path(tmp)) as (dovecot, proxy, pw):
        host, port = dovecot.endpoint("none")

        def connect(side: str, user: str) -> Client:
            if side == "direct":
                return Client(host, port, user, pw[user])
            return Client(LOOPBACK, proxy.port("none"), f"p-{user}", PASSWORD)

        bulk: dict[str, list[float]] = {"direct": [], "proxied": []}
        lat: dict[str, list[float]] = {"direct": [], "proxied": []}
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        wall_before = time.perf_counter()
        for _ in range(args.rounds):
            for side in ("direct", "proxied"):
                client = connect(side, "bulk")
                client.retr()  # warm-up: page cache, chunk buffers
                bulk[side] += bulk_mbps(client, args.bulk_runs)
                client.close()
                client = connect(side, "small")
                lat[side] += latencies_us(client, args.retrs)
                client.close()
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.perf_counter() - wall_before
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    d_bulk, p_bulk = statistics.median(bulk["direct"]), statistics.median(bulk["proxied"])
    print(
        f"bulk 50 MB RETR: direct {d_bulk:.0f} MB/s, proxied {p_bulk:.0f} MB/s, "
        f"ratio {p_bulk / d_bulk:.2f}"
    )
    for p in (0.5, 0.99):
        d, q = percentile(lat["direct"], p), percentile(lat["proxied"], p)
        print(
            f"small RETR p{int(p * 100)}: direct {d:.0f} us, proxied {q:.0f} us, ratio {q / d:.2f}"
        )
    print(f"load generator CPU: {100 * cpu / wall:.0f}% of one core over {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
