"""The benchmark harness (issue 7): popproxy against direct Dovecot, in one run.

Usage, from the repository root, as root (Dovecot needs it), with the repository
first on the path so that the popproxy under test is this checkout's:

    PYTHONPATH=$PWD .venv/bin/python -m bench.run [--scenarios bulk,sessions,...]
        [--tls plain,implicit] [--rounds 3] [--json results.json] [--profile DIR]

Scenarios (each alternates direct and proxied within every round, the order
rotated from one round to the next, and reports proxied/direct ratios):

- bulk: RETR of a 10 MiB message, repeated on one connection, in MB/s;
- sessions: whole sessions (connect, USER, PASS, STAT, LIST, UIDL, RETR 1, QUIT)
  over 200 users at concurrency 32: sessions/s, p50 and p99 in ms;
- latency: RETR round trips of a small message within one session, p50/p99 in µs;
- idle: 1,000 and 10,000 logged-in idle sessions: memory per session (popproxy's
  PSS, Dovecot's for the direct side), then a NOOP on every one that must answer;
- big: popproxy's RSS growth while relaying a 50 MB message (VmHWM), and MB/s;
- mailbox: a mailbox of 100,000 messages (``--mailbox-messages``): login and a QUIT after
  one RETR, in ms.

Peers (``--peers``, bench/peers.py): nginx's mail proxy and perdition, when installed,
run in front of the same Dovecot and take their turn in the bulk, sessions, latency,
big and mailbox scenarios as further sides, with their ratios to direct; a peer that
is not installed is skipped with a line saying what to install. The Python relay
floors (bench/relay.py: ``trio-relay``, ``epoll-relay``) take part the same way when
``--peers`` names them.

The load generator (bench/loadgen.py) uses raw sockets and 1 MiB reads, checks
replies (status lines, sha256 of every body) after the timed part, and its own CPU
use is reported. With ``--profile DIR`` py-spy samples popproxy during every
proxied phase (``py-spy record -f raw``, written to DIR) and the hottest functions
are printed; figures from a profiled run are slower and not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from integration.harness import Corpus, CorpusMessage, TlsFiles, make_corpus, make_tls_files

from bench.loadgen import BenchError
from bench.peers import PEERS, RELAY_FLOORS, find
from bench.scenarios import (
    Case,
    Meter,
    Options,
    big,
    bulk,
    floor,
    idle,
    latency,
    mailbox,
    seed_mailbox,
    sessions,
)
from bench.servers import REPO, Bench, Mailbox, max_idle_sessions, raise_fd_limit, running
from bench.stats import Figure, format_table, results_json

SCENARIOS = ("bulk", "sessions", "latency", "idle", "big", "floor", "mailbox")
BULK_BYTES = 10 * 1024 * 1024  # issue 7: "a 10 MiB message"
BIG_BYTES = 50 * 1024 * 1024  # issue 7: "a 50 MB message" (the suite's big message)
# Sessions mail processes serve at once in the idle scenario's Dovecot (see servers.py).
IDLE_POP3_CLIENTS = 100
# The scenarios peers take part in (idle measures memory the peers do not report
# alike; floor is socat's).
PEER_SCENARIOS = frozenset({"bulk", "sessions", "latency", "big", "mailbox"})


def _expected(message: CorpusMessage) -> tuple[int, str]:
    return message.size, message.sha256


def run_scenario(
    name: str, o: Options, tmp: Path, tls: TlsFiles, corpora: dict[str, Corpus]
) -> list[Figure]:
    """One scenario, on each client leg asked for; each with servers of its own."""
    figures: list[Figure] = []
    small = corpora["small"]
    first_small = min(small.small, key=lambda m: m.key)  # Dovecot numbers in key order
    peers = o.installed if name in PEER_SCENARIOS else []

    def start(
        work: Path, boxes: Sequence[Mailbox], pop3_clients: int = 1
    ) -> contextlib.AbstractContextManager[Bench]:
        return running(
            work,
            tls,
            boxes,
            pop3_clients=pop3_clients,
            default_hash_cost=o.default_hash_cost,
            peers=peers,
            nginx_workers=o.nginx_workers,
            baseline=o.baseline if name != "floor" else None,
        )

    for use_tls in o.tls:
        meter = Meter()
        context = tls.client_context() if use_tls else None
        label = f"{name}-{'tls' if use_tls else 'plain'}"
        o.load[label] = os.getloadavg()[0]
        print(f"\n== {label} (load average {o.load[label]:.1f})", flush=True)
        work = tmp / label
        try:
            match name:
                case "bulk":
                    message = corpora["bulk"].by_kind("big")
                    boxes: list[Mailbox] = [("bulk", corpora["bulk"], [message])]
                    with start(work, boxes) as bench:
                        figures += bulk(Case(bench, o, context, meter), _expected(message))
                case "latency":
                    with start(work, [("small", small, [first_small])]) as bench:
                        figures += latency(Case(bench, o, context, meter), _expected(first_small))
                case "sessions":
                    boxes = [(f"user{i}", small, small.small) for i in range(o.users)]
                    with start(work, boxes) as bench:
                        figures += sessions(Case(bench, o, context, meter), _expected(first_small))
                case "idle":
                    boxes = [(f"user{i}", small, [first_small]) for i in range(o.users)]
                    for count in o.idle:
                        with start(work / str(count), boxes, IDLE_POP3_CLIENTS) as bench:
                            figures += idle(Case(bench, o, context, meter), count)
                case "big":
                    corpus = corpora["big"]
                    message = corpus.by_kind("big")
                    # The small message sorts first (Dovecot numbers by key): RETR 1 warms
                    # up, RETR 2 is the 50 MB one.
                    warm_up = min(corpus.small, key=lambda m: m.key)
                    with start(work, [("big", corpus, [warm_up, message])]) as bench:
                        figures += big(Case(bench, o, context, meter), _expected(message))
                case "mailbox":
                    with start(work, [("mailbox", small, [])]) as bench:
                        seed_mailbox(bench.accounts[0].dovecot, o.mailbox_messages)
                        figures += mailbox(Case(bench, o, context, meter), o.mailbox_messages)
                case "floor":
                    if use_tls:
                        continue  # the relay floor is about the hop, measured in clear
                    message = corpora["bulk"].by_kind("big")
                    boxes = [("floor", corpora["bulk"], [first_small, message])]
                    with start(work, boxes) as bench:
                        figures += floor(
                            Case(bench, o, context, meter),
                            _expected(first_small),
                            _expected(message),
                        )
                case _:
                    raise ValueError(name)
        except BenchError as exc:  # a wrong or missing reply: the other legs still run
            o.failed[label] = str(exc)
            print(f"   FAILED: {exc}", flush=True)
        o.cpu[label] = meter.share
        print(f"   load generator CPU: {meter.share:.0%} of one core over {meter.wall:.1f} s")
        print(format_table(f for f in figures if f.tls == use_tls))
    return figures


def _revision(checkout: Path) -> str:
    """``checkout`` and the commit it has checked out."""
    head = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    return f"{checkout} at {head or 'an unknown commit'}"


def machine_facts() -> dict[str, object]:
    """What the figures were measured on (docs/benchmarks.md prints these)."""
    cpu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    dovecot = subprocess.run(
        ["/usr/sbin/dovecot", "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
    import trio

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "dovecot": dovecot,
    }


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated, of: " + ", ".join(SCENARIOS),
    )
    parser.add_argument(
        "--tls",
        default="plain,implicit",
        help="client legs to run: plain, implicit or both (comma-separated)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns of every side per scenario")
    parser.add_argument("--bulk-retrs", type=int, default=5, help="timed RETRs per bulk round")
    parser.add_argument("--latency-retrs", type=int, default=500, help="RETRs per latency round")
    parser.add_argument("--users", type=int, default=200, help="accounts of the sessions scenario")
    parser.add_argument("--concurrency", type=int, default=32, help="sessions at once")
    parser.add_argument("--sessions", type=int, default=1000, help="sessions per round and side")
    parser.add_argument("--idle", default="1000,10000", help="idle session counts")
    parser.add_argument(
        "--mailbox-messages", type=int, default=100_000, help="messages of the mailbox scenario"
    )
    parser.add_argument(
        "--default-hash-cost",
        action="store_true",
        help="popproxy users get scrypt at the default cost (else ln=4)",
    )
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="other proxies run beside popproxy when installed (comma-separated, of: "
        + ", ".join((*PEERS, *RELAY_FLOORS))
        + "; empty for none; the Python relay floors only when named)",
    )
    parser.add_argument(
        "--nginx-workers", type=int, default=1, help="nginx worker processes (popproxy has one)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of popproxy (such as a git worktree of an older commit), run"
        " as the side 'baseline' beside this one in every scenario but floor",
    )
    parser.add_argument("--profile", type=Path, help="py-spy every popproxy phase into this dir")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    tls_modes = [t for t in args.tls.split(",") if t]
    if unknown := [s for s in scenarios if s not in SCENARIOS]:
        parser.error(f"unknown scenarios: {unknown}")
    if unknown := [t for t in tls_modes if t not in ("plain", "implicit")]:
        parser.error(f"unknown TLS modes: {unknown}")
    peers = [p for p in args.peers.split(",") if p]
    if unknown := [p for p in peers if p not in (*PEERS, *RELAY_FLOORS)]:
        parser.error(f"unknown peers: {unknown}")
    options = Options(
        scenarios=scenarios,
        tls=[t == "implicit" for t in tls_modes],
        rounds=args.rounds,
        bulk_retrs=args.bulk_retrs,
        latency_retrs=args.latency_retrs,
        users=args.users,
        concurrency=args.concurrency,
        sessions=args.sessions,
        idle=[int(n) for n in args.idle.split(",") if n],
        mailbox_messages=args.mailbox_messages,
        default_hash_cost=args.default_hash_cost,
        profile=args.profile,
        json=args.json,
        peers=peers,
        nginx_workers=args.nginx_workers,
        baseline=args.baseline.resolve() if args.baseline else None,
    )
    return options


def main(argv: Sequence[str] | None = None) -> int:
    o = parse_args(argv)
    fd_limit = raise_fd_limit()
    if "idle" in o.scenarios and max(o.idle, default=0) > max_idle_sessions(fd_limit):
        print(
            f"the fd limit is {fd_limit} (the hard limit; raising it needs CAP_SYS_RESOURCE):"
            f" popproxy can hold at most {max_idle_sessions(fd_limit)} sessions, each with an"
            " upstream connection; pass a lower --idle count",
            file=sys.stderr,
        )
        return 2
    if o.profile is not None:
        o.profile.mkdir(parents=True, exist_ok=True)
    peers = {name: find(name) for name in o.peers}
    for found in peers.values():
        if found.command is None:
            print(f"peer {found.name} skipped: {found.note}", flush=True)
        else:
            print(f"peer {found.name}: {found.note}", flush=True)
            if not found.tls:
                print(f"peer {found.name}: no implicit-TLS listener, plain only", flush=True)
    o.installed = [found for found in peers.values() if found.command is not None]
    if o.baseline is not None:
        if not (o.baseline / "popproxy" / "__main__.py").exists():
            print(f"--baseline {o.baseline}: no popproxy checkout there", file=sys.stderr)
            return 2
        print(f"baseline: popproxy from {_revision(o.baseline)}", flush=True)
    figures: list[Figure] = []
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="popproxy-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tls = make_tls_files(tmp / "tls")
        corpora = {"small": make_corpus(tmp / "small" / "Maildir", big_bytes=0)}
        if "bulk" in o.scenarios or "floor" in o.scenarios:
            corpora["bulk"] = make_corpus(tmp / "bulk" / "Maildir", big_bytes=BULK_BYTES)
        if "big" in o.scenarios:
            corpora["big"] = make_corpus(tmp / "big" / "Maildir", big_bytes=BIG_BYTES)
        for name in o.scenarios:
            figures += run_scenario(name, o, tmp, tls, corpora)
    print("\n" + format_table(figures))
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(
            [Path(sys.executable).name, "-m", "bench.run", *(argv or sys.argv[1:])]
        ),
        "machine": machine_facts(),
        "load_generator_cpu_share": o.cpu,
        "load_average_at_start": o.load,
        "fd_limit": fd_limit,
        "hash_cost": "default" if o.default_hash_cost else "scrypt ln=4",
        "profiled": o.profile is not None,
        "peers": {f.name: f.note if f.command else f"skipped: {f.note}" for f in peers.values()},
        "nginx_workers": o.nginx_workers,
        "baseline": _revision(o.baseline) if o.baseline else None,
        "failed": o.failed,
        "repo": str(REPO),
    }
    print("load generator CPU (cores): " + ", ".join(f"{k} {v:.2f}" for k, v in o.cpu.items()))
    if o.json is not None:
        o.json.write_text(results_json(figures, meta) + "\n")
        print(f"results: {o.json}")
    for label, error in o.failed.items():
        print(f"{label} FAILED (no figures): {error}", file=sys.stderr)
    return 1 if o.failed else 0


if __name__ == "__main__":
    sys.exit(main())
