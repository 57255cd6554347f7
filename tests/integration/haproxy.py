"""A real HAProxy in TCP mode in front of popproxy (test_haproxy, test_scale_out).

Debian's `haproxy` (installed by scripts/test) runs in the foreground (``-db``) with a
configuration written from a template. Its frontends listen on sockets this process
binds and hands over (``bind fd@N``): dynamic ports, and no race for them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .harness import LOOPBACK, SERVER_STOP_DEADLINE_SECONDS, SOCKET_TIMEOUT_SECONDS

# Connections a frontend socket queues before HAProxy accepts them.
LISTEN_BACKLOG = 16


class HAProxy:
    """`haproxy -db -f CONFIG`, CONFIG being ``template`` formatted with ``address``
    (LOOPBACK), ``NAME_fd`` for each of ``frontends`` and ``values``; checked with
    ``haproxy -c`` before it starts."""

    def __init__(
        self, workdir: Path, template: str, frontends: Sequence[str], **values: object
    ) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        assert Path(haproxy).exists(), "haproxy is not installed (scripts/test installs it)"
        self.frontends = {name: listening_socket() for name in frontends}
        fds = {f"{name}_fd": sock.fileno() for name, sock in self.frontends.items()}
        config = workdir / "haproxy.cfg"
        config.write_text(template.format(address=LOOPBACK, **fds, **values))
        pass_fds = [sock.fileno() for sock in self.frontends.values()]
        check = subprocess.run(
            [haproxy, "-c", "-f", str(config)],
            capture_output=True,
            timeout=SOCKET_TIMEOUT_SECONDS,
            check=False,
            pass_fds=pass_fds,
        )
        assert check.returncode == 0, check.stderr.decode(errors="replace")
        self.log_path = workdir / "haproxy.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
        )

    def port(self, frontend: str) -> int:
        port: int = self.frontends[frontend].getsockname()[1]
        return port

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SERVER_STOP_DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(SERVER_STOP_DEADLINE_SECONDS)
        for sock in self.frontends.values():
            sock.close()
        self._log.close()


def listening_socket() -> socket.socket:
    """A TCP socket listening on LOOPBACK at a free port, inheritable by HAProxy."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock
