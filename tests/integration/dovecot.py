"""A real Dovecot POP3 server as the upstream of the proxy tests (issue 3).

Debian's `dovecot-pop3d` (Dovecot 2.3) runs as `dovecot -F -c CONF` with a config written
here into a temporary directory: nothing is read from /etc/dovecot, nothing goes through
systemd. Everything it writes (sockets, state, log, users' homes) stays under that directory,
which is removed when the server stops.

- Listeners, all on loopback with ports picked by the kernel:
  `127.0.0.1` plain with STLS (`ssl = yes`, not required), `127.0.0.1` implicit TLS, and
  `127.0.0.2` plain without STLS (a `local 127.0.0.2 { ssl = no }` filter: Dovecot has no
  per-listener switch for STLS, only per local address).
- Users: a passwd-file per user for passdb ({PLAIN} passwords) and userdb; all mail is
  `maildir:~/Maildir` and runs as the unprivileged `popproxy-test` account, which is
  created (`useradd --system`) when missing. The suite runs as root (CI does); Dovecot
  needs root to switch to that uid.
- Users are added while the server runs (a new passwd-file each), each with
  a Maildir seeded by copying corpus messages and chown'd to the mail uid.

The temporary directory is made with `tempfile.mkdtemp`, not under pytest's basetemp:
pytest's `/tmp/pytest-of-root` is mode 0700, and Dovecot's login (`dovenull`) and mail
(`popproxy-test`) processes must reach their sockets and Maildirs. The short path also keeps
Dovecot's unix socket paths under the 108-octet limit.

What Dovecot 2.3 does that tests must know (test_dovecot_harness.py shows those not
marked otherwise):
- UIDL is the Maildir unique name (`pop3_uidl_format = %g`); messages are numbered in
  unique-name order.
- LIST and STAT count a file without a final newline without the CRLF that RETR adds
  before the terminator: 2 octets short for such a message (the corpus has two).
- QUIT's +OK comes after the expunge (the files are gone), but before the mail process has
  finished writing its index files, and so does the "Disconnected" log line: wait for
  `wait_sessions_ended` (the mail process's exit) before looking at anything but message
  files, and before looking at a Maildir after a session ended without QUIT.
- By default a session moves new/ files to cur/, and RETR adds the Seen flag (`:2,S`).
- Sessions of one user are not locked (`pop3_lock_session = no`): each logs in, and the
  listing is taken just after "+OK Logged in."; RETR of a message another session
  expunged meanwhile gets "-ERR Message N expunged.". With `pop3_lock_session = yes` a
  second login waits 10 s (fixed in Dovecot) and then gets "-ERR [IN-USE] ..." (seen by
  hand, not tested: too slow).
- The autologout is fixed at 10 minutes ("-ERR Disconnected for inactivity."; from
  Dovecot's source, not tested).
- A failed login is answered within about 0.5 s, every time (see the config).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import grp
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .harness import (
    LISTENER_KINDS,
    LOOPBACK,
    Corpus,
    CorpusMessage,
    TlsFiles,
    crlf_digest_of_file,
)

DOVECOT_BINARY = Path("/usr/sbin/dovecot")
# The unprivileged account every user's mail process runs as and every Maildir belongs to.
MAIL_ACCOUNT = "popproxy-test"
# The plain listener without STLS lives on its own loopback address (see the module doc).
PLAIN_ONLY_HOST = "127.0.0.2"

# From exec to a greeting on every listener, per attempt.
DOVECOT_START_DEADLINE_SECONDS = 20.0
# Attempts at starting when a port picked as free was taken before Dovecot bound it.
DOVECOT_START_ATTEMPTS = 5
# How long Dovecot may take to exit after SIGTERM (it takes about a second), and how long
# a process may take to disappear once killed.
DOVECOT_STOP_DEADLINE_SECONDS = 15.0
DOVECOT_KILL_DEADLINE_SECONDS = 5.0
# How long the master's children may outlive it (they exit on their own, at once).
DOVECOT_CHILDREN_EXIT_DEADLINE_SECONDS = 5.0
# Pause between two readiness or process-exit polls.
POLL_INTERVAL_SECONDS = 0.02
# Socket timeout of one readiness probe (bounded by what is left of the start deadline).
PROBE_TIMEOUT_SECONDS = 2.0
# How long a line may take to reach Dovecot's log (it goes through Dovecot's log process).
LOG_WAIT_DEADLINE_SECONDS = 10.0
# useradd must finish within this.
USERADD_TIMEOUT_SECONDS = 30.0
# Taken (flock) around looking the account up and creating it, so that the suite's
# parallel workers (pytest-xdist, docs/testing.md) do not run useradd at once: a second
# useradd fails on /etc/passwd's lock while the first still holds it.
MAIL_ACCOUNT_LOCK = Path(tempfile.gettempdir()) / "popproxy-test-useradd.lock"


class DovecotFailed(AssertionError):
    """Dovecot did not start, did not stop, or left processes; the message holds its log."""


# ---------------------------------------------------------------------------------------------
# The unprivileged mail account


@dataclass(frozen=True, slots=True)
class MailAccount:
    """The system account mail processes run as."""

    name: str
    uid: int
    gid: int


def ensure_mail_account(name: str = MAIL_ACCOUNT) -> MailAccount:
    """The account `name`, created as a system user (no home, no login shell) if missing.

    A dedicated account rather than `nobody`: nothing else runs as it, so a file it owns
    was written by Dovecot's mail process or by this harness.
    """
    with contextlib.suppress(KeyError):
        pw = pwd.getpwnam(name)
        return MailAccount(name, pw.pw_uid, pw.pw_gid)
    with MAIL_ACCOUNT_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        return _create_mail_account(name)


def _create_mail_account(name: str) -> MailAccount:
    """`ensure_mail_account`'s creation, under its lock: another worker may have
    created the account while this one waited."""
    with contextlib.suppress(KeyError):
        pw = pwd.getpwnam(name)
        return MailAccount(name, pw.pw_uid, pw.pw_gid)
    try:
        grp.getgrnam(name)
        group_args = ["--gid", name]
    except KeyError:
        group_args = ["--user-group"]
    argv = [
        *("useradd", "--system", "--no-create-home"),
        *("--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"),
        *group_args,
        name,
    ]
    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=USERADD_TIMEOUT_SECONDS,
        check=False,
    )
    try:
        pw = pwd.getpwnam(name)  # also when another process created it meanwhile
    except KeyError:
        raise DovecotFailed(
            f"{' '.join(argv)}: exit {result.returncode}\n"
            + result.stderr.decode("utf-8", "replace")
        ) from None
    return MailAccount(name, pw.pw_uid, pw.pw_gid)


# ---------------------------------------------------------------------------------------------
# Users and their Maildirs


@dataclass(frozen=True, slots=True)
class DovecotUser:
    """A Dovecot user: its login, its home, and the Maildir Dovecot serves it."""

    name: str
    password: str
    home: Path
    account: MailAccount
    settings: tuple[tuple[str, str], ...] = ()  # per-user Dovecot settings (userdb fields)

    @property
    def maildir(self) -> Path:
        """`~/Maildir` (the server's `mail_location`)."""
        return self.home / "Maildir"

    def files(self) -> dict[str, Path]:
        """The message files now in new/ and cur/, by unique name (the part before ':').

        Dovecot moves files from new/ to cur/ and appends flags (`:2,S`) when a session
        ends, so a message is found by its unique name, never by its path.
        """
        found: dict[str, Path] = {}
        for sub in ("new", "cur"):
            for path in sorted((self.maildir / sub).iterdir()):
                key = path.name.split(":", 1)[0]
                assert key not in found, f"{key} twice in {self.maildir}"
                found[key] = path
        return found

    def keys(self) -> set[str]:
        """Unique names of the messages now in the Maildir."""
        return set(self.files())

    def count(self) -> int:
        """How many message files new/ and cur/ hold now."""
        return len(self.files())

    def digests(self) -> dict[str, tuple[int, str]]:
        """(size, sha256) of each message's CRLF form, by unique name (read in chunks)."""
        return {key: crlf_digest_of_file(path) for key, path in self.files().items()}

    def deliver(self, data: bytes, *, key: str | None = None) -> str:
        """Deliver a message the Maildir way (write in tmp/, rename into new/); its key.

        The file belongs to the mail account, as one from a delivery agent would.
        """
        key = key or f"{time.time_ns() // 1_000_000_000}.M{next(_delivery_ids)}P{os.getpid()}.t"
        tmp = self.maildir / "tmp" / key
        tmp.write_bytes(data)
        os.chown(tmp, self.account.uid, self.account.gid)
        tmp.chmod(0o600)
        tmp.rename(self.maildir / "new" / key)
        return key


_delivery_ids = itertools.count(1)
_USERNAME = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9.@_-]*")


def expected_digests(messages: Iterable[CorpusMessage]) -> dict[str, tuple[int, str]]:
    """What `DovecotUser.digests()` must give for a Maildir seeded with these messages."""
    return {m.key: (m.size, m.sha256) for m in messages}


def _seed_maildir(
    user: DovecotUser, corpus: Corpus | None, messages: Iterable[CorpusMessage]
) -> None:
    """Make ~/Maildir (new/, cur/, tmp/) and copy the messages in, all owned by the account.

    Copied, not hard-linked: the owner is a property of the inode, so chowning a link
    would change the corpus file (and every other user's link to it) too.
    """
    uid, gid = user.account.uid, user.account.gid
    for directory in (user.home, user.maildir, *(user.maildir / s for s in ("new", "cur", "tmp"))):
        directory.mkdir(mode=0o700)
        os.chown(directory, uid, gid)
    for m in messages:
        assert corpus is not None
        dest = user.maildir / m.relpath
        shutil.copy2(corpus.root / m.relpath, dest)  # keeps the mtime: the same order
        os.chown(dest, uid, gid)
        dest.chmod(0o600)


# ---------------------------------------------------------------------------------------------
# Processes


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid` (`pgrep -s`, without procps)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return sorted(pids)


def process_uid(pid: int) -> int:
    """The real uid of a process (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise KeyError("Uid")


def process_name(pid: int) -> str:
    """The process's comm (Dovecot's children are "pop3", "pop3-login", "auth", ...)."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


def free_port(host: str) -> int:
    """A port the kernel considers free on `host` now (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Ports:
    """The three listener ports of one start attempt."""

    starttls: int  # on LOOPBACK
    implicit: int  # on LOOPBACK
    plain: int  # on PLAIN_ONLY_HOST


def pick_free_ports() -> Ports:
    """Three ports free now (see `free_port`); distinct on LOOPBACK."""
    starttls = free_port(LOOPBACK)
    implicit = free_port(LOOPBACK)
    while implicit == starttls:
        implicit = free_port(LOOPBACK)
    return Ports(starttls, implicit, free_port(PLAIN_ONLY_HOST))


# ---------------------------------------------------------------------------------------------
# Config

_CONFIG = """\
# Written by tests/integration/dovecot.py for one test run; nothing else is read.
base_dir = {run}
state_dir = {root}/state
instance_name = popproxy-test
log_path = {root}/dovecot.log
log_timestamp = "%Y-%m-%d %H:%M:%S "
protocols = pop3
listen = {loopback}
shutdown_clients = yes

ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}

# Plaintext USER/PASS and AUTH PLAIN without TLS (the plain upstream mode is tested).
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Failed logins are answered at once: no failure delay (Dovecot still answers failures on
# its 0.5 s flush tick) and no per-IP penalty. Dovecot 2.3 applies the penalty even to
# login_trusted_networks; it is off only when auth cannot reach anvil's penalty socket,
# so that listener is disabled (mode 0) below. Every client here is 127.0.0.1, and a
# growing penalty (2, 4, 8, 15 s) would make the wrong-password tests slow and order-dependent.
auth_failure_delay = 0
# Many concurrent sessions of one user from 127.0.0.1 (the default is 10).
mail_max_userip_connections = 10000

# Mail runs only as the unprivileged account.
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
mail_location = maildir:~/Maildir
# The UIDL is the Maildir unique name (the file name up to ':'), as popproxy's own Maildir
# mode gives it: stable whatever Dovecot's index files hold.
pop3_uidl_format = %g

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}

default_process_limit = 2000
default_client_limit = 4000

service pop3-login {{
  inet_listener pop3 {{
    address = {loopback}
    port = {port_starttls}
  }}
  inet_listener pop3s {{
    address = {loopback}
    port = {port_implicit}
    ssl = yes
  }}
  inet_listener pop3-plain-only {{
    address = {plain_host}
    port = {port_plain}
  }}
  # Long-lived login processes, each serving many clients (and proxying their TLS).
  service_count = 0
  process_min_avail = {login_processes}
}}

service pop3 {{
  process_limit = 2000
}}

service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

local {plain_host} {{
  ssl = no
}}
{extra}"""


# ---------------------------------------------------------------------------------------------
# The server


class DovecotServer:
    """A running Dovecot with the three listeners, its users and its log.

    Start with `DovecotServer.start(tls)`; stop with `stop()` (or use it as a context
    manager). Users are added with `add_user` at any time.
    """

    host = LOOPBACK  # of the STLS and implicit listeners
    plain_host = PLAIN_ONLY_HOST  # of the plain listener without STLS

    def __init__(
        self,
        root: Path,
        *,
        tls: TlsFiles,
        account: MailAccount,
        extra_config: str = "",
    ) -> None:
        self.root = root
        self.tls = tls
        self.ca_file = tls.ca_cert
        self.account = account
        self.extra_config = extra_config
        self.config = root / "dovecot.conf"
        self.passwd_dir = root / "passwd.d"
        self.homes = root / "users"
        self.log_path = root / "dovecot.log"
        self.stderr_path = root / "dovecot.stderr"
        self.ports = Ports(0, 0, 0)
        self.proc: subprocess.Popen[bytes] | None = None
        self.users: dict[str, DovecotUser] = {}
        self._lock = threading.Lock()
        self._user_ids = itertools.count(1)

    # -- start and stop

    @classmethod
    def start(
        cls,
        tls: TlsFiles,
        *,
        extra_config: str = "",
        pick_ports: Callable[[], Ports] = pick_free_ports,
        attempts: int = DOVECOT_START_ATTEMPTS,
    ) -> DovecotServer:
        """Start Dovecot on free ports and wait until every listener greets.

        `extra_config` is appended to the config (e.g. "pop3_lock_session = yes").
        A start that fails because a port was taken meanwhile is retried with new ports,
        `attempts` times in all; any other failure raises DovecotFailed with the log.
        """
        if os.geteuid() != 0:
            raise DovecotFailed(
                "the Dovecot harness runs as root (as CI does): Dovecot switches to the"
                f" {MAIL_ACCOUNT} account, and the harness creates it and chowns Maildirs"
            )
        account = ensure_mail_account()
        root = Path(tempfile.mkdtemp(prefix="popproxy-dovecot-"))
        root.chmod(0o755)  # the login and mail processes pass through it
        server = cls(root, tls=tls, account=account, extra_config=extra_config)
        try:
            server._prepare()
            server._start_with_retries(pick_ports, attempts)
        except BaseException:
            server.stop(check=False)
            raise
        # A script that dies of an exception before stop() would leave Dovecot running
        # with no parent (a killed interpreter still does: nothing runs then).
        atexit.register(server._stop_at_exit)
        return server

    def _stop_at_exit(self) -> None:
        self.stop(check=False)

    def _prepare(self) -> None:
        self.homes.mkdir(mode=0o755)
        (self.root / "state").mkdir(mode=0o755)
        self.passwd_dir.mkdir(mode=0o750)
        with contextlib.suppress(KeyError):
            os.chown(self.passwd_dir, 0, grp.getgrnam("dovecot").gr_gid)

    def _start_with_retries(self, pick_ports: Callable[[], Ports], attempts: int) -> None:
        attempt = 1
        while not self._start_once(pick_ports(), attempt, last=attempt >= attempts):
            attempt += 1

    def _start_once(self, ports: Ports, attempt: int, *, last: bool) -> bool:
        """One start; True when ready, False when a port was in use (and not `last`)."""
        self.ports = ports
        # A fresh base_dir each attempt: a failed master may leave its pid file and sockets.
        run = self.root / f"run{attempt}"
        self.config.write_text(
            _CONFIG.format(
                run=run,
                root=self.root,
                loopback=LOOPBACK,
                plain_host=PLAIN_ONLY_HOST,
                cert=self.tls.server_cert,
                key=self.tls.server_key,
                uid=self.account.uid,
                gid=self.account.gid,
                passwd=self.passwd_dir / "%u",
                port_starttls=ports.starttls,
                port_implicit=ports.implicit,
                port_plain=ports.plain,
                login_processes=min(max(os.cpu_count() or 1, 1), 4),
                extra=self.extra_config,
            )
        )
        with self.stderr_path.open("ab") as stderr:
            # A new session: Dovecot's master and all its children share its id, so every
            # process of this instance can be found (session_pids) and none is missed at stop.
            self.proc = subprocess.Popen(
                [str(DOVECOT_BINARY), "-F", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.root,
                start_new_session=True,
            )
        try:
            self._wait_ready(DOVECOT_START_DEADLINE_SECONDS)
        except DovecotFailed:
            in_use = "Address already in use" in self.log_text()
            self._terminate()
            if in_use and not last:
                with self.stderr_path.open("a") as f:
                    f.write(f"--- attempt {attempt}: a port was in use; new ports ---\n")
                return False
            raise
        return True

    def _wait_ready(self, timeout: float) -> None:
        """Poll every listener until it greets with +OK; DovecotFailed with the log if not."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        pending = list(LISTENER_KINDS)
        last_error = "no attempt"
        while pending:
            if self.proc.poll() is not None:
                raise DovecotFailed(
                    f"dovecot exited with {self.proc.returncode} before it was ready\n"
                    + self._log_dump()
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DovecotFailed(
                    f"no greeting on {pending} within {timeout:g} s ({last_error})\n"
                    + self._log_dump()
                )
            try:
                greeting = self.probe(pending[0], timeout=min(PROBE_TIMEOUT_SECONDS, remaining))
            except OSError as exc:
                last_error = f"{pending[0]}: {exc!r}"
                time.sleep(POLL_INTERVAL_SECONDS)
                continue
            if not greeting.startswith(b"+OK"):
                raise DovecotFailed(f"greeting {greeting!r} on {pending[0]}\n" + self._log_dump())
            pending.pop(0)

    def probe(self, kind: str, *, timeout: float = PROBE_TIMEOUT_SECONDS) -> bytes:
        """Connect to one listener (TLS for implicit), read the greeting line, close."""
        host, port = self.endpoint(kind)
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock: socket.socket = raw
            if kind == "implicit":
                sock = self.ssl_context().wrap_socket(raw, server_hostname=host)
            with sock, sock.makefile("rb") as f:
                line: bytes = f.readline()
                return line

    def stop(self, *, check: bool = True) -> None:
        """SIGTERM, wait, then SIGKILL; check no process of this instance is left; clean up.

        DovecotFailed (with the log) when it did not exit within the deadline after SIGTERM
        or left a process behind, unless `check` is false. The temporary directory is
        removed either way.
        """
        atexit.unregister(self._stop_at_exit)
        try:
            problem = self._terminate()
            if problem and check:
                raise DovecotFailed(problem + "\n" + self._log_dump())
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _terminate(self) -> str:
        """Stop the current master and all its session; '' or what went wrong."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        problem = ""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DOVECOT_STOP_DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                problem = (
                    f"dovecot did not exit within {DOVECOT_STOP_DEADLINE_SECONDS:g} s of SIGTERM"
                )
                proc.kill()
                proc.wait(DOVECOT_KILL_DEADLINE_SECONDS)
        sid = proc.pid  # start_new_session: the master's pid is the session id
        # Children get SIGTERM from the master and may outlive it by a moment.
        deadline = time.monotonic() + DOVECOT_CHILDREN_EXIT_DEADLINE_SECONDS
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_SECONDS)
        left = session_pids(sid)
        if left:
            names = [f"{pid} {_safe_name(pid)}" for pid in left]
            problem = (problem + "\n" if problem else "") + (
                f"processes left {DOVECOT_CHILDREN_EXIT_DEADLINE_SECONDS:g} s after the"
                f" master exited: {names}; killed"
            )
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + DOVECOT_KILL_DEADLINE_SECONDS
            while session_pids(sid) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL_SECONDS)
            if session_pids(sid):
                problem += f"; still there after SIGKILL: {session_pids(sid)}"
        return problem

    def __enter__(self) -> DovecotServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- where to connect

    @property
    def port_starttls(self) -> int:
        """Plain POP3 with STLS offered (on `host`)."""
        return self.ports.starttls

    @property
    def port_implicit(self) -> int:
        """POP3 over implicit TLS (pop3s, on `host`)."""
        return self.ports.implicit

    @property
    def port_plain(self) -> int:
        """Plain POP3 without STLS (on `plain_host`, not `host`)."""
        return self.ports.plain

    def endpoint(self, kind: str) -> tuple[str, int]:
        """(host, port) of the listener of a kind: "none", "starttls" or "implicit"."""
        match kind:
            case "none":
                return self.plain_host, self.port_plain
            case "starttls":
                return self.host, self.port_starttls
            case "implicit":
                return self.host, self.port_implicit
        raise ValueError(kind)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only the test CA (the server's cert is for 127.0.0.1)."""
        return self.tls.client_context()

    @property
    def pid(self) -> int:
        """The master's pid (also the session id of all its processes)."""
        assert self.proc is not None, "not running"
        return self.proc.pid

    def pids(self) -> list[int]:
        """Every live process of this instance: the master and its children."""
        return session_pids(self.pid) if self.proc is not None else []

    # -- users

    def add_user(
        self,
        name: str | None = None,
        password: str | None = None,
        *,
        corpus: Corpus | None = None,
        messages: Iterable[CorpusMessage] | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> DovecotUser:
        """A new user whose Maildir holds copies of `messages` (default: all of `corpus`).

        `name` defaults to a fresh "userN", `password` to a random one. `settings` are
        Dovecot settings for this user's mail process only, returned as userdb fields
        (e.g. {"pop3_no_flag_updates": "yes"}). The user can log in as soon as this returns.
        """
        if messages is None:
            messages = corpus.messages if corpus is not None else ()
        messages = tuple(messages)
        if messages and corpus is None:
            raise ValueError("messages are copied from a corpus: pass corpus=")
        fields = tuple((settings or {}).items())
        for key, value in fields:
            if not key or any(c in key + value for c in " =:\r\n\t"):
                raise ValueError(f"setting {key}={value!r} cannot go into a passwd-file")
        if password is None:
            password = "pw-" + secrets.token_urlsafe(12)
        if not password or any(c in password for c in ":\r\n\t"):
            raise ValueError(f"password {password!r} cannot go into a passwd-file")
        with self._lock:
            if name is None:
                name = f"user{next(self._user_ids)}"
                while name in self.users:
                    name = f"user{next(self._user_ids)}"
            # Dovecot's default auth_username_chars; no leading dot (it names a file).
            if not _USERNAME.fullmatch(name):
                raise ValueError(f"user name {name!r}: letters, digits and .-_@ only")
            if name in self.users:
                raise ValueError(f"user {name} exists")
            user = DovecotUser(name, password, self.homes / name, self.account, fields)
            _seed_maildir(user, corpus, messages)
            self._write_passwd_file(user)
            self.users[name] = user
        return user

    def remove_user(self, user: DovecotUser | str) -> None:
        """Delete a user's passwd-file and home.

        Dovecot may go on accepting the password for up to a second (it re-checks a
        passwd-file at most once a second), but the Maildir is gone.
        """
        name = user if isinstance(user, str) else user.name
        with self._lock:
            removed = self.users.pop(name)
            (self.passwd_dir / name).unlink()
        shutil.rmtree(removed.home, ignore_errors=True)

    def user(self, name: str) -> DovecotUser:
        """A user added before."""
        return self.users[name]

    def maildir(self, user: DovecotUser | str) -> Path:
        """The Maildir Dovecot serves a user."""
        return (self.users[user] if isinstance(user, str) else user).maildir

    def _write_passwd_file(self, user: DovecotUser) -> None:
        """Write the user's own passwd-file, `passwd.d/NAME` (the passdb and userdb path is
        `passwd.d/%u`).

        One file per user, not one for all: Dovecot re-checks a passwd-file at most once
        a second, so a user added to a file it had just read would be refused for up to a
        second; a file it never looked at is read at the first lookup.

        The line: user:{PLAIN}password:uid:gid::home::extra (Dovecot's passwd-file format;
        the extra fields are userdb_KEY=VALUE, separated by spaces). Written aside and
        renamed into place; readable by root and the `dovecot` group (the auth process).
        """
        line = (
            f"{user.name}:{{PLAIN}}{user.password}:{self.account.uid}:{self.account.gid}"
            f"::{user.home}::" + " ".join(f"userdb_{k}={v}" for k, v in user.settings) + "\n"
        )
        tmp = self.passwd_dir / f".{user.name}.tmp"
        tmp.write_text(line)
        try:
            os.chown(tmp, 0, grp.getgrnam("dovecot").gr_gid)
            tmp.chmod(0o640)
        except KeyError:  # no dovecot group: Dovecot's auth must still read it
            tmp.chmod(0o644)
        tmp.replace(self.passwd_dir / user.name)

    # -- the log

    def log_text(self) -> str:
        """Dovecot's log file and anything it wrote to stdout/stderr (before logging started)."""
        parts = []
        for path in (self.stderr_path, self.log_path):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def wait_for_log(
        self, pattern: str, *, count: int = 1, timeout: float = LOG_WAIT_DEADLINE_SECONDS
    ) -> list[str]:
        """Wait until `count` log lines match the regex `pattern`; those lines.

        DovecotFailed with the log when they do not appear in time.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log_text().splitlines() if regex.search(line)]
            if len(lines) >= count:
                return lines
            if time.monotonic() >= deadline:
                raise DovecotFailed(
                    f"{len(lines)} of {count} log lines matching {pattern!r} within {timeout:g} s\n"
                    + self._log_dump()
                )
            time.sleep(POLL_INTERVAL_SECONDS)

    def wait_sessions_ended(
        self, user: DovecotUser | str, count: int = 1, *, timeout: float = LOG_WAIT_DEADLINE_SECONDS
    ) -> list[str]:
        """Wait until `count` POP3 sessions of a user are over, QUIT or not; their log lines.

        Over means: the session logged "Disconnected", and its mail process (one per
        session; its pid is in that line) has exited. Dovecot answers QUIT, and logs the
        line, before it has finished writing its index files in the Maildir; only the
        exit says it is done. A test that closed a connection without QUIT, or that looks
        at more than the message files after QUIT, waits for this first.
        """
        deadline = time.monotonic() + timeout
        name = user if isinstance(user, str) else user.name
        lines = self.wait_for_log(
            rf"pop3\({re.escape(name)}\)<\d+><[^>]*>: Info: Disconnected",
            count=count,
            timeout=timeout,
        )
        pids = set()
        for line in lines:
            mail_pid = re.search(r"\)<(\d+)>", line)
            assert mail_pid is not None, line
            pids.add(int(mail_pid[1]))
        while live := pids & set(self.pids()):
            if time.monotonic() >= deadline:
                raise DovecotFailed(
                    f"mail processes {sorted(live)} of {name} still there {timeout:g} s after"
                    " their sessions ended\n" + self._log_dump()
                )
            time.sleep(POLL_INTERVAL_SECONDS)
        return lines

    def _log_dump(self) -> str:
        return f"--- dovecot log ({self.root}) ---\n{self.log_text()}"


def _safe_name(pid: int) -> str:
    try:
        return process_name(pid)
    except OSError:
        return "?"


@contextlib.contextmanager
def running_dovecot(tls: TlsFiles, *, extra_config: str = "") -> Iterator[DovecotServer]:
    """A Dovecot for the duration of a `with` block; stopped (and checked) after it."""
    server = DovecotServer.start(tls, extra_config=extra_config)
    try:
        yield server
    finally:
        server.stop()
