"""popproxy's metrics, live (issue 5, "What it must show").

A popproxy subprocess with its exporter on a dynamic loopback port serves real
sessions: a local Maildir user over plain and implicit-TLS listeners (USER/PASS and
AUTH PLAIN, a wrong password, a session that ends without QUIT) and a user proxied to
the real Dovecot (tests/integration/dovecot.py). Then:

1. a scrape of ``/metrics`` piped into ``promtool check metrics`` prints nothing and
   exits 0;
2. a real Prometheus server (Debian's ``prometheus`` package) on loopback scrapes the
   exporter every second, with grafana/alerts.yaml loaded as its rule file; the test
   polls its HTTP API until the target is up, then checks counter values with PromQL
   and that every alert rule evaluates without error. Prometheus is always stopped
   (SIGTERM, a bounded wait, then SIGKILL).

Every wait is bounded by a named deadline; polls pause ``POLL_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import StartServer
from .dovecot import DovecotServer, DovecotUser
from .harness import (
    LOOPBACK,
    PASSWORD,
    USER,
    Corpus,
    Pop3Error,
    ServerProcess,
    StreamingPop3,
    TlsFiles,
    User,
)
from .test_proxy import UPSTREAM, local_name, local_user, upstream_for

ROOT = Path(__file__).resolve().parents[2]
ALERT_RULES = ROOT / "grafana" / "alerts.yaml"

# Prometheus scrapes and evaluates the rules this often (its default is 1m).
SCRAPE_INTERVAL = "1s"
# From exec to /-/ready (a cold TSDB start takes about a second).
PROMETHEUS_START_DEADLINE_SECONDS = 30.0
# From ready to the expected values: a few scrape intervals, with room for a slow machine.
PROMETHEUS_DATA_DEADLINE_SECONDS = 30.0
# From SIGTERM to exit, before SIGKILL.
PROMETHEUS_STOP_DEADLINE_SECONDS = 15.0
# Starts tried when the port picked was taken in between (as the Dovecot harness does).
PROMETHEUS_START_ATTEMPTS = 3
# A promtool run.
PROMTOOL_TIMEOUT_SECONDS = 60.0
# One HTTP request to the exporter or to Prometheus.
HTTP_TIMEOUT_SECONDS = 10.0
# The pause between two polls of a condition that has a deadline.
POLL_INTERVAL_SECONDS = 0.2
# Prometheus's own output kept for a failure message.
LOG_TAIL_CHARS = 4000


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is missing: install Debian's prometheus package"
    return path


# Loopback only, and never through an HTTP proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with _HTTP.open(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def free_port() -> int:
    """A loopback port free now (the kernel's pick; Prometheus binds it right after)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def poll(check: Callable[[], Any], *, deadline_seconds: float, what: str) -> Any:
    """Call ``check`` until it returns something truthy; AssertionError after the deadline."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {deadline_seconds:g} s: {what}")
        time.sleep(POLL_INTERVAL_SECONDS)


class Prometheus:
    """A Prometheus server on loopback scraping one popproxy exporter (job ``popproxy``)."""

    def __init__(self, workdir: Path, target_port: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.config = workdir / "prometheus.yml"
        config = {
            "global": {
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "evaluation_interval": SCRAPE_INTERVAL,
            },
            "rule_files": [str(ALERT_RULES)],
            "scrape_configs": [
                {
                    "job_name": "popproxy",
                    "static_configs": [{"targets": [f"{LOOPBACK}:{target_port}"]}],
                }
            ],
        }
        self.config.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        checked = subprocess.run(
            [binary("promtool"), "check", "config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=PROMTOOL_TIMEOUT_SECONDS,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.log_path = workdir / "prometheus.log"
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={LOOPBACK}:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=env,
            )

    def log_tail(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]

    def wait_ready(self) -> bool:
        """Wait until it answers /-/ready; False if it exited because its port was taken."""

        def ready() -> bool | None:
            if self.proc.poll() is not None:
                if "address already in use" in self.log_tail():
                    return None
                raise AssertionError(f"prometheus exited\n{self.log_tail()}")
            try:
                return http_get(self.url + "/-/ready")[0] == 200
            except OSError:
                return False

        def settled() -> bool:
            state = ready()
            return state is None or state

        poll(settled, deadline_seconds=PROMETHEUS_START_DEADLINE_SECONDS, what="prometheus ready")
        return self.proc.poll() is None

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful Prometheus HTTP API call."""
        query = urllib.parse.urlencode(params)
        status, body = http_get(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: each element has ``metric`` (labels) and ``value``."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of an instant query; None when it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL: never left running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(PROMETHEUS_STOP_DEADLINE_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(PROMETHEUS_STOP_DEADLINE_SECONDS)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """Start Prometheus servers scraping a port; each is stopped at the end of the test."""
    started: list[Prometheus] = []

    def start(target_port: int) -> Prometheus:
        for _ in range(PROMETHEUS_START_ATTEMPTS):
            server = Prometheus(tmp_path / f"prometheus{len(started)}", target_port)
            started.append(server)
            if server.wait_ready():
                return server
        raise AssertionError(f"no free port in {PROMETHEUS_START_ATTEMPTS} attempts")

    yield start
    for server in started:
        server.stop()
        assert server.proc.returncode is not None  # never left running


def scrape(server: ServerProcess) -> bytes:
    assert server.metrics_port is not None, "no msg=metrics_listening line"
    status, body = http_get(f"http://{LOOPBACK}:{server.metrics_port}/metrics")
    assert status == 200
    return body


def run_sessions(
    server: ServerProcess, tls_files: TlsFiles, corpus: Corpus, proxied_user: str
) -> int:
    """The sessions whose counts the test checks; returns how many ended with QUIT."""
    ended = 0

    def finished(count: int = 1) -> None:
        # The Maildir lock is released after the QUIT reply: wait before the next login.
        nonlocal ended
        ended += count
        server.wait_sessions_ended(ended)

    plain = StreamingPop3(server.port("none"))
    plain.login(USER, PASSWORD)
    assert plain.multiline_digest("RETR 1") == (corpus.messages[0].size, corpus.messages[0].sha256)
    plain.command("QUIT")
    plain.close()
    finished()

    with StreamingPop3(server.port("implicit"), tls=tls_files.client_context()) as implicit:
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        implicit.command(f"AUTH PLAIN {token}")
        implicit.command("STAT")
        implicit.command("QUIT")
    finished()

    with StreamingPop3(server.port("none")) as wrong:
        wrong.command(f"USER {USER}")
        with pytest.raises(Pop3Error, match=r"\[AUTH\]"):
            wrong.command("PASS not-the-password")
        wrong.command("QUIT")
    finished()

    with StreamingPop3(server.port("none")) as proxied:
        proxied.login(proxied_user, PASSWORD)
        proxied.multiline_digest("RETR 1")
        proxied.command("QUIT")
    finished()

    with StreamingPop3(server.port("starttls")) as dropped:
        dropped.login(USER, PASSWORD)  # plaintext auth is allowed in the test config
        dropped.command("NOOP")
    # closed without QUIT: an "eof" session
    finished()
    return ended - 1


@pytest.fixture
def served(
    start: StartServer, maildir: Path, dovecot: DovecotServer, dovecot_user: DovecotUser
) -> tuple[ServerProcess, str]:
    """popproxy with its exporter, serving USER from a Maildir and a user proxied to
    Dovecot (over STLS); the server and the proxied user's local name."""
    server = start(
        users=[
            User(USER, PASSWORD, maildir),
            local_user(dovecot_user),
        ],
        upstreams={UPSTREAM: upstream_for(dovecot, "starttls")},
        metrics={"address": LOOPBACK, "port": 0},
    )
    return server, local_name(dovecot_user)


def test_promtool_and_prometheus_see_what_popproxy_served(
    served: tuple[ServerProcess, str],
    corpus: Corpus,
    tls_files: TlsFiles,
    prometheus: Callable[[int], Prometheus],
) -> None:
    server, proxied_user = served
    quit_sessions = run_sessions(server, tls_files, corpus, proxied_user)
    assert quit_sessions == 4

    # 1. promtool on a live scrape: clean, not a word.
    body = scrape(server)
    checked = subprocess.run(
        [binary("promtool"), "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=PROMTOOL_TIMEOUT_SECONDS,
        check=False,
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, b"", b""), checked
    assert b'popproxy_upstream_logins_total{result="ok",upstream="dovecot"} 1.0' in body
    assert b"_created" not in body  # prometheus_client's _created series are off

    # 2. A real Prometheus scraping the exporter.
    assert server.metrics_port is not None
    prom = prometheus(server.metrics_port)

    def target_up() -> bool:
        targets = prom.api("targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    poll(target_up, deadline_seconds=PROMETHEUS_DATA_DEADLINE_SECONDS, what="the target up")
    expr = 'sum(popproxy_sessions_ended_total{result="quit"})'
    poll(
        lambda: prom.value(expr) == quit_sessions,
        deadline_seconds=PROMETHEUS_DATA_DEADLINE_SECONDS,
        what=f"{expr} == {quit_sessions}\n{prom.log_tail()}",
    )
    expected = {
        'up{job="popproxy"}': 1,
        'sum(popproxy_logins_total{result="ok"})': 4,
        'popproxy_logins_total{mechanism="user",result="ok"}': 3,
        'popproxy_logins_total{mechanism="plain",result="ok"}': 1,
        'popproxy_logins_total{mechanism="user",result="failed"}': 1,
        'popproxy_commands_total{verb="RETR",result="ok"}': 2,
        'popproxy_commands_total{verb="PASS",result="err"}': 1,
        'popproxy_tls_handshakes_total{listener="implicit",result="ok"}': 1,
        'popproxy_sessions_ended_total{listener="starttls",result="eof"}': 1,
        "sum(popproxy_sessions_started_total)": 5,
        "sum(popproxy_sessions_active)": 0,
        f'popproxy_upstream_logins_total{{upstream="{UPSTREAM}",result="ok"}}': 1,
        f'popproxy_upstream_logins_total{{upstream="{UPSTREAM}",result="failed"}}': 0,
        f'sum(popproxy_upstream_errors_total{{upstream="{UPSTREAM}"}})': 0,
        f'popproxy_upstream_sessions_active{{upstream="{UPSTREAM}"}}': 0,
        f'popproxy_upstream_command_duration_seconds_count{{verb="RETR",upstream="{UPSTREAM}"}}': 1,
        f'popproxy_upstream_command_duration_seconds_count{{verb="QUIT",upstream="{UPSTREAM}"}}': 1,
        f'popproxy_upstream_login_duration_seconds_count{{upstream="{UPSTREAM}"}}': 1,
        "popproxy_config_last_reload_successful": 1,
        "popproxy_sessions_limit": 1000,
    }
    got = {expr: prom.value(expr) for expr in expected}
    assert got == expected
    positive = (
        'popproxy_client_sent_bytes_total{listener="none"}',
        'popproxy_client_received_bytes_total{listener="none"}',
        f'popproxy_upstream_received_bytes_total{{upstream="{UPSTREAM}"}}',
    )
    sent_none = prom.value(positive[0])
    assert sent_none is not None and sent_none > corpus.messages[0].size
    for expr in positive[1:]:
        value = prom.value(expr)
        assert value is not None and value > 0, expr
    # Every series carries the job and instance labels the dashboard and alerts filter on.
    for series in prom.query('{__name__=~"popproxy_.*"}'):
        assert series["metric"]["job"] == "popproxy"
        assert series["metric"]["instance"] == f"{LOOPBACK}:{server.metrics_port}"

    # The real alert rules, evaluated on the real series: every one without an error.
    def rules_evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else []

    rules = poll(
        rules_evaluated,
        deadline_seconds=PROMETHEUS_DATA_DEADLINE_SECONDS,
        what="every alert rule evaluated with health ok",
    )
    names = {rule["name"] for rule in rules}
    assert {"PopproxyExporterDown", "PopproxySessionsNearLimit"} <= names
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert firing == []
