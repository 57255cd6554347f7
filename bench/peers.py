"""Other POP3 proxies as peers in the harness: nginx's mail proxy and perdition, and
two byte relays in Python as floors.

Each peer runs in front of the bench's Dovecot, as popproxy does, and appears in the
same alternating run as another side, with its ratio to direct. A peer that is not
installed is skipped with a line that says what to install; the run goes on without
its column.

- nginx (Debian: ``nginx-full`` and ``libnginx-mod-mail``): its mail proxy, started
  with a prefix and config of its own in the run's temporary directory (``-p``,
  ``-c``, ``-e``, ``-g 'daemon off;'``), on free loopback ports, plain and implicit
  TLS (``listen ... ssl``). nginx authenticates nothing itself: it asks an
  ``auth_http`` endpoint, which the harness serves (``bench/auth_http.py``), and
  which maps popproxy's users to their Dovecot accounts as popproxy does. One
  worker process unless ``--nginx-workers`` says otherwise (popproxy is one process).
- perdition (Debian: ``perdition``): one forked process per connection, every login
  passed through as is to the Dovecot (``--outgoing_server``, no user map), so its
  clients log in with the Dovecot account's own name and password; implicit TLS with
  ``--ssl_mode ssl_listen``.
- ``trio-relay`` and ``epoll-relay`` (``bench/relay.py``, always there): octets copied
  both ways and nothing else, on trio's streams or one ``select.epoll``; logins pass
  through as through perdition. Not proxies: what Python (with trio, or without)
  costs before any POP3 is done, so that a figure popproxy misses can be set against
  what its language and stack allow. Not in the default ``--peers``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from integration.dovecot import free_port, session_pids
from integration.harness import LOOPBACK, TlsFiles

from bench.stats import parse_proc_stat_ticks

PEERS = ("nginx", "perdition")
# The Python relay floors (bench/relay.py), run only when --peers names them.
RELAY_FLOORS = ("trio-relay", "epoll-relay")
# How long a peer (or the auth endpoint) may take to listen, and how often to look.
START_DEADLINE_SECONDS = 15.0
START_POLL_SECONDS = 0.02
# How long a peer may take to exit after SIGTERM.
STOP_DEADLINE_SECONDS = 15.0
# nginx: connections per worker (each session holds two, and one to auth_http while
# it logs in; the bench runs at most a few hundred sessions at once through a peer).
NGINX_WORKER_CONNECTIONS = 4096
# Where Debian's nginx keeps its dynamic modules, if `nginx -V` does not say.
NGINX_MODULES_DIR = "/usr/lib/nginx/modules"
NGINX_INSTALL = "apt-get install nginx-full libnginx-mod-mail"
PERDITION_INSTALL = "apt-get install perdition"
# What `nginx -V` may take.
VERSION_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class PeerUser:
    """A login through a peer: what the client sends, and the Dovecot account behind it."""

    user: str
    password: str
    upstream_user: str
    upstream_password: str


@dataclass(frozen=True, slots=True)
class Installed:
    """Whether a peer can run here: its command and how it was found, or why not."""

    name: str
    command: str | None  # None: not available
    note: str  # the version, or what to install
    load_module: Path | None = None  # nginx's dynamic mail module, when it is one
    tls: bool = True  # whether it can listen with implicit TLS


@dataclass(frozen=True, slots=True)
class Peer:
    """A running peer: its ports per client leg and its processes."""

    name: str
    ports: dict[bool, int]  # implicit TLS? -> port on LOOPBACK
    proxy_logins: bool  # clients log in with popproxy's users (nginx) or Dovecot's
    pids: Callable[[], list[int]]

    def address(self, tls: bool) -> tuple[str, int]:
        return LOOPBACK, self.ports[tls]

    def cpu_seconds(self) -> float:
        """CPU time of every process of the peer so far, exited children included."""
        ticks = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                ticks += parse_proc_stat_ticks(Path(f"/proc/{pid}/stat").read_text(), children=True)
        return ticks / os.sysconf("SC_CLK_TCK")


def find(name: str) -> Installed:
    """Whether peer ``name`` is installed, and how to run it."""
    match name:
        case "nginx":
            return _find_nginx()
        case "perdition":
            command = shutil.which("perdition.pop3") or shutil.which("perdition")
            if command is None:
                return Installed(name, None, f"perdition is not installed ({PERDITION_INSTALL})")
            return Installed(name, command, "perdition")
        case "trio-relay":
            return Installed(name, sys.executable, f"trio {trio.__version__}, no POP3")
        case "epoll-relay":
            return Installed(name, sys.executable, "select.epoll, no POP3", tls=False)
        case _:
            raise ValueError(name)


def _find_nginx() -> Installed:
    command = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if command is None:
        return Installed("nginx", None, f"nginx is not installed ({NGINX_INSTALL})")
    built = subprocess.run(
        [command, "-V"],
        capture_output=True,
        text=True,
        timeout=VERSION_TIMEOUT_SECONDS,
        check=False,
    ).stderr
    return nginx_build(command, built, Path.exists)


def nginx_build(command: str, built: str, exists: Callable[[Path], bool]) -> Installed:
    """What ``nginx -V`` (``built``) says of its mail module: built in, a dynamic module
    (which ``exists`` or not: Debian's ``libnginx-mod-mail``), or missing."""
    version = built.splitlines()[0].removeprefix("nginx version: ") if built else "nginx"
    flags = built.split()
    tls = "--with-mail_ssl_module" in flags
    if "--with-mail" in flags:
        return Installed("nginx", command, version, tls=tls)
    if "--with-mail=dynamic" not in flags:
        return Installed("nginx", None, f"{version} was built without its mail module")
    modules = re.search(r"--modules-path=(\S+)", built)
    module = Path(modules.group(1) if modules else NGINX_MODULES_DIR) / "ngx_mail_module.so"
    if not exists(module):
        return Installed("nginx", None, f"{version} has no mail module ({NGINX_INSTALL})")
    return Installed("nginx", command, version, load_module=module, tls=tls)


@contextlib.contextmanager
def running_peer(
    found: Installed,
    workdir: Path,
    tls: TlsFiles,
    upstream: tuple[str, int],
    users: Sequence[PeerUser],
    *,
    nginx_workers: int = 1,
) -> Iterator[Peer]:
    """Run ``found`` in front of the Dovecot at ``upstream`` until the block ends."""
    assert found.command is not None, found.note
    root = workdir / found.name
    root.mkdir(parents=True, exist_ok=True)
    if found.name == "nginx":
        with _nginx(found, root, tls, upstream, users, workers=nginx_workers) as peer:
            yield peer
    elif found.name in RELAY_FLOORS:
        with _relay(found, root, tls, upstream) as peer:
            yield peer
    else:
        with _perdition(found.command, root, tls, upstream) as peer:
            yield peer


_NGINX_CONF = """\
{load_module}
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{
    worker_connections {connections};
}}
mail {{
    server_name localhost;
    auth_http {loopback}:{auth_port}/auth;
    proxy_pass_error_message on;
    pop3_auth plain;
    {ssl}
    server {{
        listen {loopback}:{plain};
        protocol pop3;
        proxy on;
    }}
    {tls_server}
}}
"""

_NGINX_TLS_SERVER = """server {{
        listen {loopback}:{port} ssl;
        protocol pop3;
        proxy on;
    }}"""


@contextlib.contextmanager
def _nginx(
    found: Installed,
    root: Path,
    tls: TlsFiles,
    upstream: tuple[str, int],
    users: Sequence[PeerUser],
    *,
    workers: int,
) -> Iterator[Peer]:
    assert found.command is not None
    credentials = root / "auth.json"
    credentials.touch(0o600)
    credentials.write_text(
        json.dumps(
            {
                u.user: {
                    "password": u.password,
                    "server": upstream[0],
                    "port": upstream[1],
                    "upstream_user": u.upstream_user,
                    "upstream_password": u.upstream_password,
                }
                for u in users
            }
        )
    )
    with _process(
        [sys.executable, str(Path(__file__).with_name("auth_http.py")), str(credentials)],
        stdout=subprocess.PIPE,
    ) as auth:
        auth_port = _first_line_port(auth)
        ports = {False: free_port(LOOPBACK)}
        if found.tls:
            ports[True] = free_port(LOOPBACK)
        conf = root / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(
                load_module=f"load_module {found.load_module};" if found.load_module else "",
                workers=workers,
                root=root,
                connections=NGINX_WORKER_CONNECTIONS,
                loopback=LOOPBACK,
                auth_port=auth_port,
                ssl=(
                    f"ssl_certificate {tls.server_cert};\n    ssl_certificate_key {tls.server_key};"
                    if found.tls
                    else ""
                ),
                plain=ports[False],
                tls_server=(
                    _NGINX_TLS_SERVER.format(loopback=LOOPBACK, port=ports[True])
                    if found.tls
                    else ""
                ),
            )
        )
        command = [found.command, "-e", str(root / "error.log"), "-p", str(root), "-c", str(conf)]
        with _process([*command, "-g", "daemon off;"]) as nginx:
            for port in ports.values():
                wait_listening(port, nginx, "nginx", root / "error.log")

            def pids() -> list[int]:
                return [*session_pids(nginx.pid), auth.pid]

            yield Peer("nginx", ports, proxy_logins=True, pids=pids)


@contextlib.contextmanager
def _perdition(
    command: str, root: Path, tls: TlsFiles, upstream: tuple[str, int]
) -> Iterator[Peer]:
    common = [
        command,
        "--no_daemon",
        "--bind_address",
        LOOPBACK,
        "--outgoing_server",
        f"{upstream[0]}:{upstream[1]}",
        "--pid_file",
        "",
        "--server_resp_line",
    ]
    ports = {False: free_port(LOOPBACK), True: free_port(LOOPBACK)}
    plain = [*common, "--protocol", "POP3", "--listen_port", str(ports[False])]
    implicit = [
        *common,
        "--protocol",
        "POP3S",
        "--listen_port",
        str(ports[True]),
        "--ssl_mode",
        "ssl_listen",
        "--ssl_cert_file",
        str(tls.server_cert),
        "--ssl_key_file",
        str(tls.server_key),
    ]
    log = root / "perdition.log"
    with _process(plain, log=log) as first, _process(implicit, log=log) as second:
        wait_listening(ports[False], first, "perdition", log)
        wait_listening(ports[True], second, "perdition", log)

        def pids() -> list[int]:
            return [*session_pids(first.pid), *session_pids(second.pid)]

        yield Peer("perdition", ports, proxy_logins=False, pids=pids)


@contextlib.contextmanager
def _relay(
    found: Installed, root: Path, tls: TlsFiles, upstream: tuple[str, int]
) -> Iterator[Peer]:
    assert found.command is not None
    kind = found.name.removesuffix("-relay")
    ports = {False: free_port(LOOPBACK)}
    argv = [found.command, "-m", "bench.relay", kind, f"{upstream[0]}:{upstream[1]}"]
    argv.append(str(ports[False]))
    if found.tls:
        ports[True] = free_port(LOOPBACK)
        argv += [str(ports[True]), str(tls.server_cert), str(tls.server_key)]
    log = root / "relay.log"
    with _process(argv, log=log) as proc:
        for port in ports.values():
            wait_listening(port, proc, found.name, log)
        yield Peer(found.name, ports, proxy_logins=False, pids=lambda: [proc.pid])


@contextlib.contextmanager
def _process(
    argv: Sequence[str], *, stdout: int = subprocess.DEVNULL, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in a session of its own (so that its children can be found), stopped
    with SIGTERM at the end (SIGKILL after STOP_DEADLINE_SECONDS)."""
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("ab")) if log else subprocess.DEVNULL
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(STOP_DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_DEADLINE_SECONDS)
            if proc.stdout is not None:
                proc.stdout.close()


def _first_line_port(proc: subprocess.Popen[bytes]) -> int:
    """The port a child prints as its first line, within START_DEADLINE_SECONDS."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_DEADLINE_SECONDS)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        raise RuntimeError(f"the auth_http endpoint did not start (exit {proc.poll()})")
    return int(line)


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], name: str, log: Path | None = None
) -> None:
    """Return once LOOPBACK:``port`` accepts a connection; fail if ``proc`` (``name``)
    exits first or START_DEADLINE_SECONDS pass (with the tail of ``log``, if given)."""
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while True:
        try:
            socket.create_connection((LOOPBACK, port), START_DEADLINE_SECONDS).close()
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
                raise RuntimeError(
                    f"{name} is not listening on {port} (exit {proc.poll()})"
                    + (f": {tail}" if tail else "")
                ) from None
            time.sleep(START_POLL_SECONDS)
        else:
            return
