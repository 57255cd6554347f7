"""Bench: RETR throughput and RSS growth of the embedded default (a local Maildir).

Usage (from the repository root, after ./scripts/test or ./scripts/demo made .venv):

    .venv/bin/python bench/maildir_retr.py [--mbytes 50] [--runs 5]

It writes a Maildir with one message of about ``--mbytes`` MB in a temporary
directory, starts ``python -m popproxy run`` on a free loopback port, logs in over
a raw socket and RETRs the message ``--runs`` times on one connection, reading with
large reads. Content is checked (size and sha256) outside the timed part. It prints
the median and every run in MB/s, the server's RSS growth (VmHWM) during the runs,
and the client's own CPU time, so a saturated load generator shows.

This is the foundation's figure only; the harness comparing popproxy with a direct
Dovecot connection in the same run is bench work of its own (issue 7).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from popproxy.auth.passwords import hash_password
from popproxy.secret import Secret

READ_BYTES = 1 << 20
START_DEADLINE_SECONDS = 20.0
IO_TIMEOUT_SECONDS = 60.0


def write_message(path: Path, mbytes: int) -> tuple[int, str]:
    """A deterministic message of printable lines (some starting with a dot); returns
    its CRLF size and sha256."""
    rng = random.Random(1)
    digest = hashlib.sha256()
    size = 0
    with path.open("wb") as out:
        header = b"Subject: bench\n\n"
        out.write(header)
        digest.update(header.replace(b"\n", b"\r\n"))
        size += len(header) + header.count(b"\n")
        lines = [bytes(rng.randrange(32, 127) for _ in range(75)) + b"\n" for _ in range(512)]
        lines[::17] = [b"." + line for line in lines[::17]]
        block = b"".join(lines)
        for _ in range(mbytes * 1_000_000 // len(block) + 1):
            out.write(block)
            crlf = block.replace(b"\n", b"\r\n")
            digest.update(crlf)
            size += len(crlf)
    return size, digest.hexdigest()


def start_server(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    config = workdir / "bench.yaml"
    config.write_text(
        "listen:\n  - {address: 127.0.0.1, port: 0, tls: none}\n"
        "allow_plaintext_auth: true\n"
        f"users:\n  bench:\n    password_hash: '{hash_password(Secret(b'bench'), ln=4)}'\n"
        f"    maildir: {workdir / 'Maildir'}\n"
    )
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "popproxy", "run", "-c", str(config)], stderr=log, cwd=workdir
    )
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        text = (workdir / "server.log").read_text()
        if "msg=ready" in text:
            port = re.search(r"msg=listening .*port=(\d+)", text)
            assert port is not None, text
            return proc, int(port.group(1))
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"server did not start:\n{(workdir / 'server.log').read_text()}")


def vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def retr(sock: socket.socket, expect_size: int) -> tuple[float, float, bytes]:
    """One timed RETR 1: wall seconds, this client's CPU seconds, the raw (stuffed) body."""
    chunks: list[bytes] = []
    tail = b""
    cpu = cpu_seconds()
    start = time.perf_counter()
    sock.sendall(b"RETR 1\r\n")
    while not tail.endswith(b"\r\n.\r\n"):
        data = sock.recv(READ_BYTES)
        if not data:
            raise SystemExit("server closed during RETR")
        chunks.append(data)
        tail = (tail + data)[-5:]
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    body = b"".join(chunks)  # outside the timed part
    assert body.startswith(b"+OK %d octets\r\n" % expect_size), body[:80]
    return elapsed, cpu, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mbytes", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for sub in ("new", "cur", "tmp"):
            (workdir / "Maildir" / sub).mkdir(parents=True)
        size, sha = write_message(
            workdir / "Maildir" / "new" / "1700000000.bench.host", args.mbytes
        )
        proc, port = start_server(workdir)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_SECONDS) as sock:
                sock.recv(512)
                sock.sendall(b"USER bench\r\nPASS bench\r\n")
                replies = b""
                while replies.count(b"\r\n") < 2:
                    replies += sock.recv(512)
                assert b"+OK Logged in" in replies, replies
                retr(sock, size)  # warm-up: size scan cached, buffers allocated
                before = vm_kib(proc.pid, "VmRSS")
                rates, loads = [], []
                for _ in range(args.runs):
                    elapsed, cpu, raw = retr(sock, size)
                    rates.append(size / elapsed / 1e6)
                    loads.append(cpu / elapsed)
                    payload = raw[raw.index(b"\r\n") + 2 : -3].replace(b"\r\n..", b"\r\n.")
                    assert len(payload) == size and hashlib.sha256(payload).hexdigest() == sha
                peak = vm_kib(proc.pid, "VmHWM")
                sock.sendall(b"QUIT\r\n")
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    print(f"message: {size} octets (CRLF form), {args.runs} RETRs on one connection")
    print(
        f"throughput MB/s: median {statistics.median(rates):.0f}  runs "
        + " ".join(f"{r:.0f}" for r in rates)
    )
    print(f"server RSS growth over the runs (VmHWM - VmRSS before): {peak - before} KiB")
    print(f"load generator CPU while timed: median {statistics.median(loads):.0%} of one core")


if __name__ == "__main__":
    main()
