"""The popproxy command: exit codes, check-config output, hash-password, version."""

from __future__ import annotations

import getpass
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from state.state_backends import BACKENDS, new_postgres_backend

from popproxy import __version__, cli
from popproxy.auth.passwords import hash_password, parse_hash, verify_password
from popproxy.commands import check_config
from popproxy.commands import hash_password as hash_command
from popproxy.config import StateConfig
from popproxy.secret import Secret
from popproxy.state import open_store
from popproxy.state.base import (
    AccountKey,
    Disposal,
    PollSummary,
    SeenMessage,
    SessionRecord,
    SourceKey,
    StagedMessage,
)

REPO = Path(__file__).resolve().parent.parent
HASH = hash_password(Secret.from_str("pw"), ln=4)

# How long `popproxy run` may take to log msg=ready before the test kills it.
READY_DEADLINE_SECONDS = 20.0


def run_popproxy(
    *args: str, stdin: bytes | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """Run `python -m popproxy` as a separate process (stdin is a pipe, never a tty)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "popproxy", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


class FakeStdin(io.TextIOWrapper):
    def __init__(self, data: bytes, *, tty: bool = False) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- version / usage --------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out == f"popproxy {__version__}\n"


def test_python_dash_m_version() -> None:
    proc = run_popproxy("version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"popproxy {__version__}\n"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve-forever"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_config_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config"]) == 2
    assert "-c/--config" in capsys.readouterr().err


# -- check-config -----------------------------------------------------------------------


def test_check_config_on_the_example(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = run_popproxy("check-config", "-c", "examples/popproxy.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert out.startswith("examples/popproxy.yaml: ok\n")
    assert "127.0.0.1:1110 tls=none" in out
    assert f"demo: maildir {REPO / 'examples/maildir/demo'}" in out
    assert "allow_plaintext_auth: true" in out
    assert f"state: sqlite:///{REPO}/var/popproxy-state.db" in out
    assert "idle_timeout_seconds=600" in out


def test_check_config_prints_every_error_and_exits_2(in_tmp: Path) -> None:
    """issue 2: check-config on a broken config prints every error with file and key path."""
    Path("broken.yaml").write_text(
        textwrap.dedent(f"""\
        listen:
          - {{address: 127.0.0.1, port: 22:22, tls: starttls}}
        allow_plaintext_auth: on
        upstreams:
          prov: {{host: pop.example.net}}
        users:
          alice:
            password_hash: "not-a-hash"
            upstream: provider
            upstream_password: hunter2
          demo:
            password_hash: "{HASH}"
            maildir: m
            maildir: n
        limits: {{idle_timout_seconds: 5}}
        """)
    )
    proc = run_popproxy("check-config", "-c", "broken.yaml", cwd=in_tmp)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    expected_paths = [
        "users.demo.maildir",  # duplicate key
        "listen[0].port",
        "listen[0].tls",
        "allow_plaintext_auth",
        "users.alice.upstream_password",
        "users.alice.password_hash",
        "users.alice.upstream",
        "users.alice.upstream_password_file",
        "limits.idle_timout_seconds",
    ]
    assert [line.split(": ")[1] for line in lines[:-1]] == expected_paths
    for line in lines[:-1]:
        assert line.startswith("broken.yaml: ")
    assert lines[-1] == f"broken.yaml: {len(expected_paths)} problem(s) found"
    assert "users.alice.password_hash: expected a PHC hash string" in proc.stderr
    assert "did you mean 'idle_timeout_seconds'?" in proc.stderr
    assert "write true or false" in proc.stderr
    assert "hunter2" not in proc.stderr


def test_check_config_missing_file(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "-c", "nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nope.yaml: (file): cannot read the config file")


def test_check_config_summary_lists_upstreams_and_tls(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("c.pem").write_text("x")
    Path("k.pem").write_text("x")
    monkeypatch.setenv("PW", "secret-value")
    Path("cfg.yaml").write_text(
        textwrap.dedent(f"""\
        listen:
          - {{address: "::1", port: 995, tls: implicit}}
        tls: {{cert_file: c.pem, key_file: k.pem}}
        upstreams:
          prov: {{host: pop.example.net, verify: false}}
        users:
          alice: {{password_hash: "{HASH}", upstream: prov, upstream_password_env: PW}}
        """)
    )
    assert cli.main(["check-config", "-c", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    assert "[::1]:995 tls=implicit" in out
    assert f"tls: cert_file={in_tmp / 'c.pem'}" in out
    assert "prov: pop.example.net:995 tls=implicit verify=false" in out
    assert "alice: upstream prov as alice" in out
    assert "secret-value" not in out


def rules_config(rules: dict[str, str]) -> None:
    """cfg.yaml with two users on one upstream and a Maildir user, and rules/ as given."""
    Path("rules").mkdir()
    for name, text in rules.items():
        Path("rules", name).write_text(textwrap.dedent(text))
    Path("cfg.yaml").write_text(
        textwrap.dedent(f"""\
        listen: [{{address: 127.0.0.1, port: 0, tls: none}}]
        upstreams: {{prov: {{host: pop.example.net}}}}
        users:
          alice: {{password_hash: "{HASH}", upstream: prov, upstream_password_env: PW}}
          scanner: {{password_hash: "{HASH}", upstream: prov, upstream_password_env: PW}}
          demo: {{password_hash: "{HASH}", maildir: m}}
        rules_dir: rules
        """)
    )


def test_check_config_prints_the_effective_policy_of_each_user(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PW", "secret-value")
    rules_config(
        {
            "10-scanner.yaml": """\
            rules:
              - {name: scanner-keep, match: {users: [scanner]}, action: keep, expire_after_days: 30}
            """,
            "50-all.yaml": """\
            rules:
              - {name: no-big, max_size_bytes: 5000000, continue: true}
              - name: spam
                match: {headers: {X-Spam-Flag: "^YES$"}}
                action: hide
                expire_after_days: 7
            """,
        }
    )
    assert cli.main(["check-config", "-c", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    policy = out[out.index("rules: 3 in 2 file(s)") : out.index("limits:")]
    assert policy == textwrap.dedent("""\
        rules: 3 in 2 file(s)
          10-scanner.yaml: scanner-keep
          50-all.yaml: no-big, spam
        policy: EXPIRE before login: 7 USER
          alice (upstream prov):
            rules, in order:
              no-big (50-all.yaml): every message -> max_size_bytes=5000000 continue
              spam (50-all.yaml): x-spam-flag=/^YES$/ -> action=hide expire_after_days=7
            DELE: deletes upstream [default]
            RETR without DELE: left upstream [default]
            expiry: never [default]; after 7 days [spam]
            not shown: hide [spam]; over 5000000 bytes [no-big]
            headers read at login (TOP n 0): yes
            EXPIRE 7
          scanner (upstream prov):
            rules, in order:
              scanner-keep (10-scanner.yaml): users=scanner -> action=keep expire_after_days=30
            DELE: hides it for this user [scanner-keep]
            RETR without DELE: left upstream [scanner-keep]
            expiry: after 30 days [scanner-keep]
            not shown: none
            headers read at login (TOP n 0): no
            EXPIRE 30
          demo: maildir, no rules; DELE deletes; EXPIRE NEVER
        """)
    assert "secret-value" not in out


def test_check_config_without_rules_says_so(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("cfg.yaml").write_text(
        f"listen: [{{address: 127.0.0.1, port: 0, tls: none}}]\n"
        f'users: {{demo: {{password_hash: "{HASH}", maildir: m}}}}\n'
    )
    assert cli.main(["check-config", "-c", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    assert "rules: 0 in 0 file(s)\npolicy: EXPIRE before login: NEVER\n" in out


def test_a_bad_rule_fails_check_config_and_run_with_exit_2(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PW", "secret-value")
    rules_config({"10-x.yaml": "rules:\n  - {name: x, action: kep}\n"})
    expected = (
        "rules/10-x.yaml: rules[0] (x).action: expected one of keep, delete,"
        " delete_after_retrieve, hide, got the string 'kep'; did you mean 'keep'?\n"
        "cfg.yaml: 1 problem(s) found\n"
    )
    check = run_popproxy("check-config", "-c", "cfg.yaml", cwd=in_tmp)
    assert (check.returncode, check.stdout, check.stderr) == (2, "", expected)
    # The server does not start with part of the rules: nothing is logged, it exits 2.
    run = run_popproxy("run", "-c", "cfg.yaml", cwd=in_tmp)
    assert (run.returncode, run.stdout, run.stderr) == (2, "", expected)


def test_check_config_summary_shows_proxy_protocol_listeners(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("cfg.yaml").write_text(
        textwrap.dedent(f"""\
        listen:
          - {{address: 10.0.0.5, port: 1110, tls: none, proxy_protocol: true}}
          - {{address: 127.0.0.1, port: 1111, tls: none}}
        trusted_proxies: [10.0.0.2, 10.1.0.0/16]
        users:
          demo: {{password_hash: "{HASH}", maildir: m}}
        """)
    )
    assert cli.main(["check-config", "-c", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    assert "10.0.0.5:1110 tls=none proxy_protocol=true\n" in out
    assert "127.0.0.1:1111 tls=none\n" in out
    assert "trusted_proxies: 10.0.0.2/32 10.1.0.0/16\n" in out
    assert "max_sessions_per_ip=50" in out


# -- hash-password ----------------------------------------------------------------------


def test_hash_password_from_a_pipe() -> None:
    proc = run_popproxy("hash-password", "--ln", "4", stdin=b"s3cret pw\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert verify_password(lines[0], Secret.from_str("s3cret pw"))
    assert "s3cret" not in proc.stdout + proc.stderr


def test_hash_password_default_cost() -> None:
    proc = run_popproxy("hash-password", stdin=b"demo\n")
    assert proc.returncode == 0, proc.stderr
    assert dict(parse_hash(proc.stdout.strip()).params) == {"ln": 15, "r": 8, "p": 1}


@pytest.mark.parametrize(
    ("data", "password"),
    [
        (b"pw", b"pw"),  # no newline at EOF
        (b"pw\r\n", b"pw"),
        (b" spaced pw \n", b" spaced pw "),  # only the newline is stripped
        (b"first\nsecond\n", b"first"),  # one line only
        ("pässwörd\n".encode(), "pässwörd".encode()),
        (b"\xff\xfe\n", b"\xff\xfe"),  # octets as given, not decoded
    ],
)
def test_hash_password_reads_one_line(
    data: bytes, password: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hash_command.hash_from(4, FakeStdin(data), sys.stdout, sys.stderr) == 0
    phc = capsys.readouterr().out.strip()
    assert verify_password(phc, Secret(password))


@pytest.mark.parametrize("data", [b"", b"\n", b"\r\n"])
def test_hash_password_refuses_an_empty_password(
    data: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hash_command.hash_from(4, FakeStdin(data), sys.stdout, sys.stderr) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "empty password" in captured.err


def test_hash_password_refuses_a_huge_password(capsys: pytest.CaptureFixture[str]) -> None:
    data = b"x" * (hash_command.MAX_PASSWORD_BYTES + 1) + b"\n"
    assert hash_command.hash_from(4, FakeStdin(data), sys.stdout, sys.stderr) == 2
    assert "longer than" in capsys.readouterr().err


def test_hash_password_refuses_a_bad_cost() -> None:
    proc = run_popproxy("hash-password", "--ln", "40", stdin=b"pw\n")
    assert proc.returncode == 2
    assert "ln must be" in proc.stderr


def test_hash_password_on_a_tty_asks_twice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["tty-pw", "tty-pw"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert hash_command.hash_from(4, FakeStdin(b"", tty=True), sys.stdout, sys.stderr) == 0
    assert verify_password(capsys.readouterr().out.strip(), Secret.from_str("tty-pw"))


def test_hash_password_on_a_tty_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["one", "two"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert hash_command.hash_from(4, FakeStdin(b"", tty=True), sys.stdout, sys.stderr) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "do not match" in captured.err


# -- run --------------------------------------------------------------------------------


def test_run_with_config_errors_exits_2(in_tmp: Path) -> None:
    Path("bad.yaml").write_text("listen: []\nusers: {}\nbogus: 1\n")
    proc = run_popproxy("run", "-c", "bad.yaml", cwd=in_tmp)
    assert proc.returncode == 2
    assert "bad.yaml: listen: expected a list of listeners" in proc.stderr
    assert "bad.yaml: bogus: unknown key" in proc.stderr


def test_run_with_missing_config_exits_2(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "-c", "missing.yaml"]) == 2
    assert "missing.yaml: (file): cannot read" in capsys.readouterr().err


def test_run_rejects_bad_log_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "-c", "x.yaml", "--log-format", "xml"]) == 2
    assert cli.main(["run", "-c", "x.yaml", "--log-level", "loud"]) == 2


def test_configure_logging_logfmt_and_json() -> None:
    import json
    import logging

    stream = io.StringIO()
    logger = logging.getLogger("popproxy")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        cli.configure_logging("logfmt", "warning", stream)
        logging.getLogger("popproxy.x").info("hidden")
        logging.getLogger("popproxy.x").warning("shown", extra={"fields": {"k": "v w"}})
        assert stream.getvalue().endswith('level=warning logger=popproxy.x msg=shown k="v w"\n')
        assert "hidden" not in stream.getvalue()
        stream.truncate(0)
        stream.seek(0)
        cli.configure_logging("json", "debug", stream)
        logging.getLogger("popproxy.x").debug("dbg", extra={"fields": {"n": 1}})
        assert json.loads(stream.getvalue())["n"] == 1
        assert len(logger.handlers) == 1
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def _serving_config(directory: Path, extra: str = "") -> Path:
    (directory / "mail" / "demo").mkdir(parents=True)
    for sub in ("new", "cur", "tmp"):
        (directory / "mail" / "demo" / sub).mkdir()
    path = directory / "serve.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        listen:
          - {{address: 127.0.0.1, port: 0, tls: none}}
        allow_plaintext_auth: true
        users:
          demo: {{password_hash: "{HASH}", maildir: mail/demo}}
        """)
        + extra
    )
    return path


def test_run_serves_until_sigterm(in_tmp: Path) -> None:
    """`popproxy run` logs the bound port, serves, and exits 0 after SIGTERM."""
    import re
    import signal
    import socket

    _serving_config(in_tmp)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "popproxy", "run", "-c", "serve.yaml"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=in_tmp,
        env=env,
    )
    try:
        assert proc.stderr is not None
        port = None
        seen: list[bytes] = []
        # A server that never gets ready is killed, which ends the read with EOF.
        watchdog = threading.Timer(READY_DEADLINE_SECONDS, proc.kill)
        watchdog.start()
        for raw in iter(proc.stderr.readline, b""):
            seen.append(raw)
            match = re.search(rb"msg=listening listener=none address=127\.0\.0\.1 port=(\d+)", raw)
            if match:
                port = int(match.group(1))
            if b"msg=ready" in raw:
                break
        watchdog.cancel()
        assert port, b"".join(seen)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert sock.recv(512).startswith(b"+OK")
            sock.sendall(b"QUIT\r\n")
            assert sock.recv(512).startswith(b"+OK")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert b"msg=signal signal=SIGTERM action=shutdown" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        if proc.stdout is not None:
            proc.stdout.close()


# -- run, with a stand-in for popproxy.serve ----------------------------------------------
# These pin down cli.py's own part of `run` (exit codes, signals, logging) whatever
# serve.py does; the real server is exercised above and in tests/integration.


class StandInServeError(Exception):
    pass


@pytest.fixture
def fake_serve(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Callable[..., Awaitable[None]]], Path]]:
    """Install a stand-in popproxy.serve; return a function taking its serve()."""
    import logging
    import types

    import popproxy

    logger = logging.getLogger("popproxy")
    saved = (list(logger.handlers), logger.level, logger.propagate)

    def install(serve: Callable[..., Awaitable[None]]) -> Path:
        module = types.ModuleType("popproxy.serve")
        setattr(module, "serve", serve)  # noqa: B010
        setattr(module, "ServeError", StandInServeError)  # noqa: B010
        monkeypatch.setitem(sys.modules, "popproxy.serve", module)
        monkeypatch.setattr(popproxy, "serve", module, raising=False)
        path = in_tmp / "c.yaml"
        path.write_text(
            "listen: [{address: 127.0.0.1, port: 0, tls: none}]\n"
            f"users: {{demo: {{password_hash: '{HASH}', maildir: m}}}}\n"
        )
        return path

    yield install
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_run_first_signal_shuts_down_gracefully(
    fake_serve: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    seen: list[str] = []

    async def serve(config: object, *, shutdown: trio.Event, **_: object) -> None:
        signal.raise_signal(signal.SIGTERM)
        await shutdown.wait()
        seen.append("drained")

    path = fake_serve(serve)
    assert cli.main(["run", "-c", str(path)]) == 0
    assert seen == ["drained"]
    assert "msg=signal signal=SIGTERM action=shutdown" in capsys.readouterr().err


def test_run_second_signal_cancels(
    fake_serve: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    import trio

    async def serve(config: object, *, shutdown: trio.Event, **_: object) -> None:
        signal.raise_signal(signal.SIGINT)
        await shutdown.wait()
        signal.raise_signal(signal.SIGINT)
        await trio.sleep_forever()  # a drain that never ends

    path = fake_serve(serve)
    assert cli.main(["run", "-c", str(path), "--log-format", "json"]) == 0
    err = capsys.readouterr().err
    assert '"action":"shutdown"' in err
    assert '"action":"cancel"' in err


def test_run_startup_failure_exits_1(
    fake_serve: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:

    async def serve(config: object, *, shutdown: trio.Event, **_: object) -> None:
        raise StandInServeError("cannot listen on 127.0.0.1:1: permission denied")

    path = fake_serve(serve)
    assert cli.main(["run", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert 'msg=startup_failed reason="cannot listen on 127.0.0.1:1: permission denied"' in err


def test_run_crash_exits_1(
    fake_serve: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:

    async def serve(config: object, *, shutdown: trio.Event, **_: object) -> None:
        raise RuntimeError("bug")

    path = fake_serve(serve)
    assert cli.main(["run", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "msg=crashed" in err
    assert "RuntimeError" in err
    assert len(err.splitlines()) == 1  # the traceback is escaped onto the one line


# -- reload (SIGHUP) and check-config --against -------------------------------------------


def test_run_sighup_hands_the_server_a_loader_for_the_same_file(
    fake_serve: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    import trio
    import trio.testing

    from popproxy.config import Config
    from popproxy.reload import ConfigLoader

    reloaded: list[Config] = []

    async def serve(
        config: Config,
        *,
        shutdown: trio.Event,
        reloads: trio.abc.ReceiveChannel[ConfigLoader],
        **_: object,
    ) -> None:
        signal.raise_signal(signal.SIGHUP)
        load = await reloads.receive()
        reloaded.append(await trio.to_thread.run_sync(load))
        signal.raise_signal(signal.SIGTERM)
        await shutdown.wait()
        signal.raise_signal(signal.SIGHUP)  # while shutting down: not a reload
        await trio.testing.wait_all_tasks_blocked()

    path = fake_serve(serve)
    assert cli.main(["run", "-c", str(path)]) == 0
    assert [c.source for c in reloaded] == [path]
    err = capsys.readouterr().err
    assert "msg=signal signal=SIGHUP action=reload" in err
    assert "msg=signal signal=SIGHUP action=ignored_shutting_down" in err


def test_run_metrics_port_overrides_the_config_at_start_and_at_every_reload(
    fake_serve: Callable[..., Path],
) -> None:
    """One config file for several instances (popproxy@.service): each gets its own
    exporter port from --metrics-port, and a reload keeps it."""
    import signal

    import trio

    from popproxy.config import Config
    from popproxy.reload import ConfigLoader

    seen: list[Config] = []

    async def serve(
        config: Config,
        *,
        shutdown: trio.Event,
        reloads: trio.abc.ReceiveChannel[ConfigLoader],
        **_: object,
    ) -> None:
        seen.append(config)
        signal.raise_signal(signal.SIGHUP)
        seen.append(await trio.to_thread.run_sync(await reloads.receive()))
        signal.raise_signal(signal.SIGTERM)
        await shutdown.wait()

    path = fake_serve(serve)
    assert cli.main(["run", "-c", str(path), "--metrics-port", "9112"]) == 0
    assert [(c.metrics.address, c.metrics.port) for c in seen if c.metrics] == [
        ("127.0.0.1", 9112)
    ] * 2
    assert cli.main(["run", "-c", str(path), "--metrics-port", "70000"]) == 2


def test_run_folds_a_sighup_into_a_reload_already_waiting(
    fake_serve: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    import trio
    import trio.testing

    from popproxy.reload import ConfigLoader

    async def serve(
        config: object,
        *,
        shutdown: trio.Event,
        reloads: trio.abc.ReceiveChannel[ConfigLoader],
        **_: object,
    ) -> None:
        signal.raise_signal(signal.SIGHUP)
        await trio.testing.wait_all_tasks_blocked()
        signal.raise_signal(signal.SIGHUP)
        await trio.testing.wait_all_tasks_blocked()
        await reloads.receive()
        signal.raise_signal(signal.SIGTERM)
        await shutdown.wait()

    path = fake_serve(serve)
    assert cli.main(["run", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert "action=reload\n" in err
    assert "action=reload_already_pending" in err


def test_run_passes_a_notifier_for_notify_socket(
    fake_serve: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:

    from popproxy.sdnotify import Notifier

    seen: list[Notifier] = []

    async def serve(
        config: object, *, shutdown: trio.Event, notifier: Notifier, **_: object
    ) -> None:
        seen.append(notifier)

    path = fake_serve(serve)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    assert cli.main(["run", "-c", str(path)]) == 0
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert cli.main(["run", "-c", str(path)]) == 0
    assert [n.enabled for n in seen] == [True, False]


def _two_configs(directory: Path) -> None:
    """serve.yaml, and new.yaml with a user added, a new port and a lower session limit."""
    old = _serving_config(directory)
    (directory / "mail" / "bob").mkdir()
    new = directory / "new.yaml"
    new.write_text(
        old.read_text()
        .replace("port: 0", "port: 1110")
        .replace("users:\n", f"users:\n  bob: {{password_hash: '{HASH}', maildir: mail/bob}}\n")
        + "limits: {max_sessions: 5}\n"
    )


def test_check_config_against_the_running_file(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _two_configs(in_tmp)
    assert cli.main(["check-config", "-c", "new.yaml"]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["check-config", "-c", "new.yaml", "--against", "serve.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(plain)  # the usual summary first, unchanged
    assert out[len(plain) :] == textwrap.dedent("""\
        against serve.yaml:
          applied by a reload (SIGHUP):
            users.bob (added)
            limits.max_sessions
          restart required (a reload logs these and leaves them as they run):
            listen[0].port
        restart required: yes
        """)


def test_check_config_against_the_same_file_has_no_changes(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _serving_config(in_tmp)
    assert cli.main(["check-config", "-c", "serve.yaml", "--against", "serve.yaml"]) == 0
    assert capsys.readouterr().out.endswith("\nagainst serve.yaml: no changes\n")


def test_check_config_against_a_broken_file_exits_2(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _serving_config(in_tmp)
    Path("old.yaml").write_text("listen: []\n")
    assert cli.main(["check-config", "-c", "serve.yaml", "--against", "old.yaml"]) == 2
    assert "old.yaml: listen: expected a list of listeners" in capsys.readouterr().err


def test_check_config_against_only_reloadable_changes_needs_no_restart() -> None:
    from popproxy.reload import ConfigChanges, NamedChanges

    changes = ConfigChanges(
        reloadable=("users.carol", "tls.cert_file"),
        users=NamedChanges(removed=("carol",)),
    )
    assert check_config.describe_changes(changes, "old.yaml").splitlines() == [
        "against old.yaml:",
        "  applied by a reload (SIGHUP):",
        "    users.carol (removed)",
        "    tls.cert_file",
        "restart required: no",
    ]


# -- state show / prune ----------------------------------------------------------------


STATE_T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=BACKENDS)
def state_url(request: pytest.FixtureRequest, in_tmp: Path) -> str:
    """The state.url of an empty store: a sqlite file in the test's directory, or a
    schema of its own in the run's PostgreSQL database (tests/state/state_backends.py)."""
    match request.param:
        case "sqlite":
            return f"sqlite:///{in_tmp}/state.db"
        case "postgres":
            return new_postgres_backend(request.getfixturevalue("pg_database")).url
        case other:
            raise AssertionError(f"unknown backend {other}")


def state_config(directory: Path, url: str | None = None) -> Path:
    """A config whose state store is ``url`` (default directory/state.db)."""
    path = directory / "state.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        listen:
          - {{address: 127.0.0.1, port: 0, tls: none}}
        users:
          demo: {{password_hash: "{HASH}", maildir: m}}
        state: {{url: "{url or f"sqlite:///{directory}/state.db"}"}}
        """)
    )
    return path


def fill_state(url: str, *records: SessionRecord) -> None:
    async def write() -> None:
        store = await open_store(StateConfig(url=url))
        try:
            for record in records:
                await store.record(record)
        finally:
            await store.aclose()

    trio.run(write)


def state_session(
    account: AccountKey,
    at: datetime,
    sizes: dict[str, int],
    *,
    user: str = "alice",
    session_id: str = "s1",
    retrieved: frozenset[str] = frozenset(),
    hidden: tuple[Disposal, ...] = (),
    deleted_upstream: tuple[Disposal, ...] = (),
) -> SessionRecord:
    return SessionRecord(
        account,
        user,
        session_id,
        at,
        seen=tuple(SeenMessage(u, s) for u, s in sizes.items()),
        retrieved=retrieved,
        hidden=hidden,
        deleted_upstream=deleted_upstream,
    )


ALICE_ACCOUNT = AccountKey("provider", "alice@example.net")
TEAM_ACCOUNT = AccountKey("other", "team@example.net")


def test_state_show_prints_a_table_per_account(
    in_tmp: Path, state_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_state(
        state_url,
        state_session(
            ALICE_ACCOUNT,
            STATE_T0,
            {"uid-1": 1234, "uid-2": 5},
            retrieved=frozenset({"uid-1"}),
            hidden=(Disposal("uid-1", "keep-all"),),
            deleted_upstream=(Disposal("uid-2", "old-mail"),),
        ),
        state_session(TEAM_ACCOUNT, STATE_T0 + timedelta(days=1), {"t": 9}, user="bob"),
    )
    assert cli.main(["state", "show", "-c", str(state_config(in_tmp, state_url))]) == 0
    out = capsys.readouterr().out
    assert out == textwrap.dedent("""\
        other team@example.net: 1 UIDL(s), last listed 2024-05-02 12:00:00Z
          UIDL  SIZE  FIRST SEEN            LAST SEEN             RETRIEVED BY  HIDDEN FOR  DELETED UPSTREAM
          t        9  2024-05-02 12:00:00Z  2024-05-02 12:00:00Z  -             -           -

        provider alice@example.net: 2 UIDL(s), last listed 2024-05-01 12:00:00Z
          UIDL   SIZE  FIRST SEEN            LAST SEEN             RETRIEVED BY                HIDDEN FOR                              DELETED UPSTREAM
          uid-1  1234  2024-05-01 12:00:00Z  2024-05-01 12:00:00Z  alice 2024-05-01 12:00:00Z  alice by keep-all 2024-05-01 12:00:00Z  -
          uid-2     5  2024-05-01 12:00:00Z  2024-05-01 12:00:00Z  -                           -                                       2024-05-01 12:00:00Z by old-mail
        """)  # noqa: E501


@pytest.mark.parametrize(
    ("filters", "accounts"),
    [
        (["--upstream", "provider"], ["provider alice@example.net"]),
        (["--upstream-user", "team@example.net"], ["other team@example.net"]),
        (
            ["--upstream", "other", "--upstream-user", "team@example.net"],
            ["other team@example.net"],
        ),
        (["--upstream", "other", "--upstream-user", "alice@example.net"], []),
    ],
)
def test_state_show_filters_accounts(
    in_tmp: Path,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    filters: list[str],
    accounts: list[str],
) -> None:
    fill_state(
        state_url,
        state_session(ALICE_ACCOUNT, STATE_T0, {"a": 1}),
        state_session(TEAM_ACCOUNT, STATE_T0, {"b": 2}),
    )
    assert cli.main(["state", "show", "-c", str(state_config(in_tmp, state_url)), *filters]) == 0
    out = capsys.readouterr().out
    headers = [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert [h for h in headers if h] == (accounts or ["no UIDLs stored"])


def test_state_prune_forgets_only_what_is_gone(
    in_tmp: Path, state_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    fill_state(
        state_url,
        state_session(ALICE_ACCOUNT, now - timedelta(days=40), {"gone": 1, "kept": 2}),
        state_session(ALICE_ACCOUNT, now - timedelta(days=1), {"kept": 2}, session_id="s2"),
        # An account nobody listed for 40 days keeps its UIDLs: they are still upstream.
        state_session(TEAM_ACCOUNT, now - timedelta(days=40), {"quiet": 3}),
    )
    config = str(state_config(in_tmp, state_url))
    assert cli.main(["state", "prune", "-c", config, "--gone-days", "30", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("would forget 1 UIDL(s) gone from their upstream")
    assert cli.main(["state", "prune", "-c", config, "--gone-days", "50"]) == 0
    assert capsys.readouterr().out.startswith("forgot 0 UIDL(s)")
    assert cli.main(["state", "prune", "-c", config, "--gone-days", "30"]) == 0
    assert capsys.readouterr().out.startswith("forgot 1 UIDL(s)")
    assert cli.main(["state", "show", "-c", config]) == 0
    out = capsys.readouterr().out
    assert "kept" in out
    assert "quiet" in out
    assert "gone" not in out


def test_state_prune_trims_the_audit_log_to_its_retention(
    in_tmp: Path, state_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    fill_state(
        state_url,
        state_session(
            ALICE_ACCOUNT, now - timedelta(days=45), {"old": 1}, hidden=(Disposal("old", "r"),)
        ),
        state_session(
            ALICE_ACCOUNT,
            now - timedelta(days=5),
            {"new": 2},
            session_id="s2",
            deleted_upstream=(Disposal("new", "r"),),
        ),
    )
    path = state_config(in_tmp, state_url)
    path.write_text(path.read_text().replace("state: {", "state: {audit_retention_days: 30, "))
    config = str(path)
    assert cli.main(["state", "prune", "-c", config, "--gone-days", "90", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("would delete 1 audit row(s) from before ")
    assert lines[1].endswith(" (state.audit_retention_days: 30)")
    assert cli.main(["state", "prune", "-c", config, "--gone-days", "90"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("deleted 1 audit row(s)")
    assert cli.main(["audit", "-c", config, "--json"]) == 0
    assert [json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()] == ["new"]
    assert cli.main(["state", "prune", "-c", config, "--gone-days", "90"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("deleted 0 audit row(s)")


def test_state_commands_need_an_existing_store(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(state_config(in_tmp))
    assert cli.main(["state", "show", "-c", config]) == 1
    assert f"no state store at {in_tmp}/state.db" in capsys.readouterr().err
    assert cli.main(["state", "prune", "-c", config, "--gone-days", "3"]) == 1
    assert not (in_tmp / "state.db").exists()


def test_state_command_errors(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(state_config(in_tmp))
    (in_tmp / "state.db").write_bytes(b"not a database\n" * 400)
    assert cli.main(["state", "show", "-c", config]) == 1
    err = capsys.readouterr().err
    assert err.startswith("popproxy: ")
    assert f"state store {in_tmp}/state.db: file is not a database" in err
    assert cli.main(["state", "prune", "-c", config, "--gone-days", "-1"]) == 2
    assert "--gone-days must be 0-36500" in capsys.readouterr().err
    assert cli.main(["state", "prune", "-c", config]) == 2  # --gone-days is required
    assert cli.main(["state", "-c", config]) == 2  # no action
    assert cli.main(["state", "show", "-c", "missing.yaml"]) == 2


def test_state_show_through_python_dash_m(in_tmp: Path) -> None:
    fill_state(f"sqlite:///{in_tmp}/state.db", state_session(ALICE_ACCOUNT, STATE_T0, {"a": 1}))
    proc = run_popproxy("state", "show", "-c", str(state_config(in_tmp)), cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("provider alice@example.net: 1 UIDL(s)")


def test_state_commands_report_a_postgres_server_they_cannot_reach(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(state_config(in_tmp, "postgresql://popproxy@127.0.0.1:1/popproxy"))
    assert cli.main(["state", "show", "-c", config]) == 1
    err = capsys.readouterr().err
    assert err.startswith("popproxy: cannot open the state store postgresql://127.0.0.1:1/")
    assert cli.main(["state", "prune", "-c", config, "--gone-days", "3"]) == 1


def test_state_show_lists_gateway_sources_with_their_last_poll(
    in_tmp: Path, state_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    carol = SourceKey("carol", "provider", "carol@example.net")

    async def write() -> None:
        store = await open_store(StateConfig(url=state_url))
        try:
            await store.gateway_listing(
                carol, [SeenMessage("a", 10), SeenMessage("b", 20)], STATE_T0
            )
            await store.gateway_stage(carol, [StagedMessage("a", 10, "n")], STATE_T0)
            await store.gateway_settle(carol, ["a"], (), STATE_T0)
            await store.gateway_poll_finished(
                carol, PollSummary(STATE_T0, "ok", fetched=1, skipped=1, fetched_bytes=10)
            )
        finally:
            await store.aclose()

    trio.run(write)
    assert cli.main(["state", "show", "-c", str(state_config(in_tmp, state_url))]) == 0
    out = capsys.readouterr().out
    assert out == textwrap.dedent("""\
        no UIDLs stored

        gateway sources:
          carol <- provider/carol@example.net: last poll 2024-05-01 12:00:00Z ok fetched=1 skipped=1 deleted=0 bytes=10; last success 2024-05-01 12:00:00Z; known UIDLs: 1 delivered, 1 not, 0 deleted upstream
        """)  # noqa: E501


def test_check_config_prints_gateway_sources_and_what_the_rules_do_to_them(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PW", "secret-value")
    (in_tmp / "rules").mkdir()
    (in_tmp / "rules" / "10-keep.yaml").write_text(
        "rules:\n  - {name: keep-gmail, match: {upstreams: [gmail]}, action: keep,"
        " expire_after_days: 30}\n"
    )
    (in_tmp / "cfg.yaml").write_text(
        textwrap.dedent(f"""\
        listen: [{{address: 127.0.0.1, port: 0, tls: none}}]
        upstreams:
          prov: {{host: pop.example.net}}
          gmail: {{host: pop.gmail.com}}
        users:
          carol:
            password_hash: "{HASH}"
            maildir: mail/carol
            fetch:
              - {{upstream: prov, upstream_user: carol@example.net, upstream_password_env: PW}}
              - {{upstream: gmail, upstream_user: carol@gmail.com, upstream_password_env: PW}}
        rules_dir: rules
        gateway: {{interval_seconds: 120}}
        """)
    )
    assert cli.main(["check-config", "-c", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    assert "    fetch: prov/carol@example.net\n    fetch: gmail/carol@gmail.com\n" in out
    assert "gateway: interval_seconds=120 jitter_seconds=30 max_concurrent_polls=4" in out
    expected = [
        "  carol: maildir, no rules; DELE deletes; EXPIRE NEVER",
        "    fetch prov/carol@example.net:",
        "      rules: none",
        "      after the download: deleted upstream at that poll's QUIT [default]",
        "      expiry: never [default]",
        "      left upstream unfetched: none",
        "    fetch gmail/carol@gmail.com:",
        "      rules, in order:",
        "        keep-gmail (10-keep.yaml): upstreams=gmail -> action=keep expire_after_days=30",
        "      after the download: kept upstream [keep-gmail]",
        "      expiry: deleted upstream after 30 days [keep-gmail]",
        "      left upstream unfetched: none",
    ]
    assert "\n".join(expected) + "\n" in out
    assert "secret-value" not in out
