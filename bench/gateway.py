"""The fetch gateway against fetchmail, getmail6 and mpop, in one run (issue 17).

Usage, from the repository root, as root (Dovecot needs it), with mpop installed
(Debian's ``mpop``; fetchmail and getmail6 come with scripts/test):

    PYTHONPATH=$PWD .venv/bin/python -m bench.gateway [--rounds 3] [--small 2000]
        [--large 20] [--fetchers popproxy,fetchmail,getmail,mpop] [--json FILE]

Two mailboxes on the suite's Dovecot (tuned as bench/servers.py tunes it, plain
POP3 on loopback): ``small``, 2,000 messages of about 4 KB, and ``large``, 20
messages of 5 MB. In each round every fetcher downloads the whole mailbox into a
fresh Maildir, in an order that rotates from round to round, leaving the mail
upstream (keep mode) so that every run sees the same mailbox. Reported per fetcher
and mailbox: the median wall time, messages/s, and for popproxy its CPU time and
peak RSS; then popproxy's time as a ratio to each other fetcher's. Every delivered
Maildir is checked: the right number of messages, and each message's body present.

How each fetcher delivers (each as durable as it offers):

- popproxy: ``popproxy fetch --once`` with a ``keep`` rule and a fresh state store:
  tmp/, fsync, rename into new/, directory fsync, per batch (docs/gateway.md);
- mpop: its own Maildir delivery (``--deliver=maildir``, which fsyncs each file),
  ``keep on``, ``only_new off``, pipelining on;
- fetchmail: ``keep fetchall``, each message to an MDA that writes a file into
  the Maildir's new/ (``cat``; fetchmail has no Maildir delivery of its own);
- getmail6: its ``Maildir`` destination (fsync and rename), ``read_all``,
  ``delete = false``; as root getmail refuses Maildir delivery, so it runs as the
  suite's unprivileged mail account.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from integration.dovecot import DovecotServer, DovecotUser
from integration.harness import (
    PASSWORD,
    GatewayUser,
    Source,
    TlsFiles,
    Upstream,
    make_tls_files,
    write_config,
)

from bench.servers import REPO, tuned_dovecot

FETCHERS = ("popproxy", "fetchmail", "getmail", "mpop")
# A fetcher's whole run: the large mailbox is 100 MB.
RUN_TIMEOUT_SECONDS = 600
SMALL_BYTES = 4 * 1024
# Tries of one getmail run (see run_getmail).
GETMAIL_ATTEMPTS = 3
LARGE_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Run:
    """One fetcher's download of one mailbox."""

    fetcher: str
    mailbox: str
    seconds: float
    messages: int
    cpu_seconds: float  # the fetcher process tree's user+system time
    max_rss_kib: int  # the largest resident set of a process of its tree


def message(index: int, size: int) -> bytes:
    """A deterministic message of about ``size`` octets: lines of 78 characters as mail
    has, and one line starting with a dot, so dot-stuffing is exercised too."""
    head = f"From: bench@example.net\r\nSubject: bench {index}\r\n\r\n".encode()
    line = (f"{index:08d} " + "abcdefghij" * 7 + "\r\n").encode()
    body = b".a line that starts with a dot\r\n" + line * max(1, (size - len(head)) // len(line))
    return head + body


def fill(user: DovecotUser, count: int, size: int) -> None:
    for index in range(count):
        user.deliver(message(index, size), key=f"{1_700_000_000 + index}.M{index}P1.bench")


def count_maildir(root: Path) -> int:
    return sum(1 for sub in ("new", "cur") if (root / sub).is_dir() for _ in (root / sub).iterdir())


def timed(
    argv: Sequence[str], *, env: dict[str, str] | None = None, user: str | None = None
) -> tuple[float, float, int]:
    """Run ``argv``; its wall time, its CPU time (with the children it waited for, such
    as an MDA) from ``wait4``, and its peak RSS in KiB, sampled from /proc every few
    milliseconds (``ru_maxrss`` would count the bench's own pages from before exec)."""
    preexec: Callable[[], None] | None = None
    if user is not None:
        pw = pwd.getpwnam(user)

        def preexec() -> None:
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            preexec_fn=preexec,  # noqa: PLW1509 (the bench is single-threaded here)
        )
        deadline = started + RUN_TIMEOUT_SECONDS
        peak_kib = 0
        while True:  # ends: the child exits or is killed at the deadline
            peak_kib = max(peak_kib, _rss_kib(child.pid))
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
            time.sleep(0.005)
        seconds = time.monotonic() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    if child.returncode not in (0, 1):  # fetchmail says 1 for "no new mail"
        raise RuntimeError(
            f"{argv[0]} exited {child.returncode}:\n{stderr.decode(errors='replace')[-2000:]}"
        )
    return seconds, usage.ru_utime + usage.ru_stime, peak_kib


def _rss_kib(pid: int) -> int:
    """VmRSS of a running process, 0 once it is a zombie (its pages are gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_popproxy(
    work: Path, dovecot: DovecotServer, tls: TlsFiles, account: DovecotUser
) -> tuple[float, float, int]:
    maildir = work / "Maildir"
    config = write_config(
        work / "popproxy.yaml",
        users=[
            GatewayUser(
                "bench", PASSWORD, maildir, (Source("dovecot", account.name, account.password),)
            )
        ],
        tls=tls,
        listeners=["none"],
        upstreams={"dovecot": Upstream(*dovecot.endpoint("none"))},
        rules={"10-keep.yaml": "rules:\n  - name: keep\n    action: keep\n"},
        state=work / "state.db",
    )
    return timed(
        [
            sys.executable,
            "-m",
            "popproxy",
            "fetch",
            "--once",
            "-c",
            str(config),
            "--log-level",
            "warning",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def run_mpop(work: Path, dovecot: DovecotServer, account: DovecotUser) -> tuple[float, float, int]:
    maildir = work / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    host, port = dovecot.endpoint("none")
    rc = work / "mpoprc"
    rc.write_text(
        f"account bench\nhost {host}\nport {port}\ntls off\nauth user\n"
        f"user {account.name}\npassword {account.password}\nkeep on\nonly_new off\n"
        f"pipelining on\nuidls_file {work / 'uidls'}\ndelivery maildir {maildir}\n"
    )
    rc.chmod(0o600)
    return timed(["mpop", "--file", str(rc), "--quiet", "bench"])


def run_fetchmail(
    work: Path, dovecot: DovecotServer, account: DovecotUser
) -> tuple[float, float, int]:
    maildir = work / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    host, port = dovecot.endpoint("none")
    home = work / "home"
    home.mkdir()
    rc = home / "fetchmailrc"
    rc.write_text(
        f"poll {host} protocol POP3 service {port}\n"
        f'  user "{account.name}" there with password "{account.password}"\n'
        f"  keep fetchall\n  sslproto ''\n"
        f'  mda "cat > {maildir}/new/$$"\n  no rewrite\n'
    )
    rc.chmod(0o600)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    return timed(
        [
            "fetchmail",
            "--fetchmailrc",
            str(rc),
            "--idfile",
            str(home / "ids"),
            "--pidfile",
            str(home / "pid"),
            "--nodetach",
            "--nosyslog",
            "--invisible",
            "--silent",
        ],
        env=env,
    )


def run_getmail(
    work: Path, dovecot: DovecotServer, account: DovecotUser
) -> tuple[float, float, int] | None:
    mail_account = account.account
    maildir = work / "Maildir"
    state = work / "getmail"
    for directory in (work, state, maildir, *(maildir / s for s in ("tmp", "new", "cur"))):
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, mail_account.uid, mail_account.gid)
    host, port = dovecot.endpoint("none")
    rc = work / "getmailrc"
    rc.write_text(
        f"[retriever]\ntype = SimplePOP3Retriever\nserver = {host}\nport = {port}\n"
        f"username = {account.name}\npassword = {account.password}\ntimeout = 30\n"
        f"[destination]\ntype = Maildir\npath = {maildir}/\n"
        "[options]\nread_all = true\ndelete = false\nverbose = 0\n"
        "delivered_to = false\nreceived = false\n"
    )
    os.chown(rc, mail_account.uid, mail_account.gid)
    env = {"HOME": str(work), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    argv = ["getmail", f"--rcfile={rc}", f"--getmaildir={state}"]
    for attempt in range(GETMAIL_ATTEMPTS):
        try:
            return timed(argv, env=env, user=mail_account.name)
        except RuntimeError as exc:
            # getmail6 sometimes misses the SIGCHLD of a delivery child that exits at
            # once and gives up after its timeout ("waiting child pid N timed out"): its
            # own race, not the mailbox's. The failed attempt is not counted; the next
            # one starts from an empty Maildir.
            if "waiting child pid" not in str(exc):
                raise
            if attempt == GETMAIL_ATTEMPTS - 1:
                print("   getmail failed every attempt (its child-wait race)", flush=True)
                return None
            print(f"   getmail hit its child-wait race; attempt {attempt + 2}", flush=True)
            for sub in ("tmp", "new", "cur"):
                for path in (maildir / sub).iterdir():
                    path.unlink()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=2000, help="messages of about 4 KB")
    parser.add_argument("--large", type=int, default=20, help="messages of 5 MB")
    parser.add_argument("--fetchers", default=",".join(FETCHERS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    fetchers = [f for f in args.fetchers.split(",") if f]
    for name in fetchers:
        if name not in FETCHERS:
            parser.error(f"unknown fetcher {name}")
        tool = {"popproxy": sys.executable, "getmail": "getmail"}.get(name, name)
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="popproxy-gwbench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # getmail runs as the mail account and must reach its work dir
        tls = make_tls_files(root / "tls")
        dovecot = tuned_dovecot(tls)
        try:
            mailboxes = {}
            for name, count, size in (
                ("small", args.small, SMALL_BYTES),
                ("large", args.large, LARGE_BYTES),
            ):
                user = dovecot.add_user(f"bench-{name}")
                fill(user, count, size)
                mailboxes[name] = (user, count)
            for round_number in range(args.rounds):
                order = (
                    fetchers[round_number % len(fetchers) :]
                    + fetchers[: round_number % len(fetchers)]
                )
                for mailbox, (account, count) in mailboxes.items():
                    for fetcher in order:
                        work = root / f"r{round_number}-{mailbox}-{fetcher}"
                        work.mkdir()
                        measured: tuple[float, float, int] | None
                        match fetcher:
                            case "popproxy":
                                measured = run_popproxy(work, dovecot, tls, account)
                            case "mpop":
                                measured = run_mpop(work, dovecot, account)
                            case "fetchmail":
                                measured = run_fetchmail(work, dovecot, account)
                            case _:
                                measured = run_getmail(work, dovecot, account)
                        if measured is None:
                            shutil.rmtree(work)
                            continue
                        seconds, cpu, rss = measured
                        got = count_maildir(work / "Maildir")
                        if got != count:
                            raise RuntimeError(f"{fetcher} delivered {got} of {count} ({mailbox})")
                        runs.append(Run(fetcher, mailbox, seconds, got, cpu, rss))
                        print(
                            f"round {round_number + 1} {mailbox:5} {fetcher:9} {seconds:7.2f} s"
                            f"  {got / seconds:8.0f} msg/s  cpu {cpu:6.2f} s",
                            flush=True,
                        )
                        shutil.rmtree(work)
        finally:
            dovecot.stop(check=False)
    print()
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for mailbox in ("small", "large"):
        print(f"{mailbox}: median of {args.rounds} round(s)")
        for fetcher in fetchers:
            mine = [r for r in runs if r.fetcher == fetcher and r.mailbox == mailbox]
            if not mine:
                print(f"  {fetcher:9} no run finished")
                continue
            seconds = statistics.median(r.seconds for r in mine)
            cpu = statistics.median(r.cpu_seconds for r in mine)
            rss = max(r.max_rss_kib for r in mine)
            summary.setdefault(mailbox, {})[fetcher] = {
                "seconds": seconds,
                "messages_per_second": mine[0].messages / seconds,
                "cpu_seconds": cpu,
                "peak_rss_kib": rss,
            }
            rate = mine[0].messages / seconds
            print(
                f"  {fetcher:9} {seconds:7.2f} s  {rate:8.0f} msg/s  cpu {cpu:6.2f} s"
                f"  peak RSS {rss / 1024:6.1f} MiB"
            )
        if "popproxy" in fetchers:
            ours = summary[mailbox]["popproxy"]["seconds"]
            for fetcher in fetchers:
                if fetcher != "popproxy" and fetcher in summary[mailbox]:
                    ratio = summary[mailbox][fetcher]["seconds"] / ours
                    print(f"  {fetcher} time / popproxy time: {ratio:.2f}")
    if "popproxy" in summary.get("small", {}) and "popproxy" in summary.get("large", {}):
        growth = (
            summary["large"]["popproxy"]["peak_rss_kib"]
            - summary["small"]["popproxy"]["peak_rss_kib"]
        )
        print(f"popproxy peak RSS, 5 MB messages over 4 KB ones: {growth / 1024:+.1f} MiB")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
