"""scripts/demo, run as a user runs it: on other ports when asked, with a banner that
names them, serving the example's user `demo` until SIGTERM.

The script runs from this checkout and uses its `.venv` (as set up by scripts/test, so
`ensure_venv` has nothing to do). It serves `examples/maildir/demo`; the test only
reads it, so the checkout is left as it was, but for the config the script writes to
`var/` (git-ignored), which the test removes.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo"
EXAMPLE = REPO / "examples" / "popproxy.yaml"
EXAMPLE_MAILDIR = REPO / "examples" / "maildir" / "demo"
LOOPBACK = "127.0.0.1"
# Start-up is about a second; the bound also covers `ensure_venv` reinstalling popproxy
# into .venv when it was set up by hand rather than by scripts/test (about 15 s).
START_DEADLINE_SECONDS = 60.0
# Graceful shutdown of an idle server takes milliseconds.
STOP_DEADLINE_SECONDS = 15.0
CLIENT_TIMEOUT_SECONDS = 10.0
# Two free ports are picked, closed, then bound by the demo: another process may take
# one in between; each attempt that finds its port taken gets fresh ones.
PORT_ATTEMPTS = 3


class Demo:
    """A running scripts/demo, its standard error collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [str(DEMO)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self._lines.append(line)

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_for(self, pattern: str, deadline: float) -> bool:
        """True once a line matches `pattern`; False if the script exits first."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if re.search(pattern, self.text, flags=re.MULTILINE):
                return True
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                return re.search(pattern, self.text, flags=re.MULTILINE) is not None
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {deadline} s:\n{self.text}")

    def stop(self) -> int:
        """SIGTERM (the script exec'd popproxy, so this is popproxy's pid); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_DEADLINE_SECONDS)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def demo_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPPROXY_DEMO_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(overrides)
    return env


@contextlib.contextmanager
def running_demo() -> Iterator[tuple[Demo, int, int]]:
    """scripts/demo on free ports, until it is ready; stopped and its config removed after."""
    for _attempt in range(PORT_ATTEMPTS):
        port, metrics_port = free_ports(2)
        demo = Demo(
            demo_env(POPPROXY_DEMO_PORT=str(port), POPPROXY_DEMO_METRICS_PORT=str(metrics_port))
        )
        try:
            if demo.wait_for(r"msg=ready$", START_DEADLINE_SECONDS):
                yield demo, port, metrics_port
                return
            if "Address already in use" not in demo.text:
                raise AssertionError(f"scripts/demo exited {demo.proc.returncode}:\n{demo.text}")
        finally:
            demo.kill()
            (REPO / "var" / f"demo-{port}.yaml").unlink(missing_ok=True)
    raise AssertionError(f"no free ports in {PORT_ATTEMPTS} attempts")


def test_demo_runs_on_the_ports_it_is_given_and_says_so() -> None:
    with running_demo() as (demo, port, metrics_port):
        text = demo.text
        # The banner names the real ports, and the server listens on exactly those.
        assert f"POP3 on 127.0.0.1:{port}," in text
        assert f"curl pop3://demo:demo@127.0.0.1:{port}/1" in text
        assert f"curl http://127.0.0.1:{metrics_port}/metrics" in text
        assert re.search(
            rf"msg=listening listener=none address=127\.0\.0\.1 port={port}$", text, re.M
        )
        assert re.search(
            rf"msg=metrics_listening address=127\.0\.0\.1 port={metrics_port}$", text, re.M
        )

        client = poplib.POP3(LOOPBACK, port, timeout=CLIENT_TIMEOUT_SECONDS)
        try:
            client.user("demo")
            client.pass_("demo")
            count, _size = client.stat()
            lines = client.retr(1)[1]
        finally:
            client.quit()
        on_disk = [p for d in ("new", "cur") for p in (EXAMPLE_MAILDIR / d).iterdir()]
        assert count == len(on_disk) > 0
        assert any(line.startswith(b"Subject: ") for line in lines)

        url = f"http://{LOOPBACK}:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=CLIENT_TIMEOUT_SECONDS) as response:
            metrics = response.read().decode()
        assert re.search(
            r'^popproxy_sessions_started_total\{listener="none"\} 1\.0$', metrics, re.M
        )

        assert demo.stop() == 0
        assert re.search(r"msg=session_end .* user=demo .*result=quit", demo.text)
        # Nothing for a new user to wonder about (the state store's var/ exists).
        assert not re.search(r"level=(warning|error)", demo.text), demo.text


def test_demo_defaults_are_the_example_configs_ports() -> None:
    """Without the variables the demo runs examples/popproxy.yaml itself, whose ports the
    script names in its banner: the two must agree."""
    example = yaml.safe_load(EXAMPLE.read_text())
    script = DEMO.read_text()
    assert f"EXAMPLE_PORT={example['listen'][0]['port']}\n" in script
    assert f"EXAMPLE_METRICS_PORT={example['metrics']['port']}\n" in script
    assert len(example["listen"]) == 1


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"POPPROXY_DEMO_PORT": "pop"}, "POPPROXY_DEMO_PORT=pop: expected a TCP port number"),
        ({"POPPROXY_DEMO_PORT": "0"}, "POPPROXY_DEMO_PORT=0: expected a TCP port number"),
        ({"POPPROXY_DEMO_PORT": "65536"}, "POPPROXY_DEMO_PORT=65536: expected"),
        ({"POPPROXY_DEMO_METRICS_PORT": "0110"}, "POPPROXY_DEMO_METRICS_PORT=0110: expected"),
        (
            {"POPPROXY_DEMO_PORT": "2110", "POPPROXY_DEMO_METRICS_PORT": "2110"},
            "POPPROXY_DEMO_PORT and POPPROXY_DEMO_METRICS_PORT are both 2110: they must differ",
        ),
    ],
)
def test_demo_refuses_a_bad_port_before_doing_anything(
    variables: dict[str, str], message: str
) -> None:
    result = subprocess.run(
        [str(DEMO)],
        cwd=REPO,
        env=demo_env(**variables),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STOP_DEADLINE_SECONDS,
        check=False,
    )
    assert result.returncode == 1
    assert f"error: {message}" in result.stderr
    assert "==>" not in result.stderr  # no step ran: neither pip nor popproxy
