"""The popproxy command (popproxy/cli.py): version, usage errors, and ``run``: exit codes,
signals, logging and reloads. The subcommands of popproxy/commands/ have their tests in
tests/commands/, which use the helpers here (``run_popproxy``, ``in_tmp``)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from popproxy import __version__, cli
from popproxy.auth.passwords import hash_password
from popproxy.secret import Secret

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


def test_configure_logging_skips_what_no_formatter_writes() -> None:
    import logging

    logger = logging.getLogger("popproxy")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    flags = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    try:
        cli.configure_logging("logfmt", "info", io.StringIO())
        record = logger.makeRecord("popproxy.x", logging.INFO, __file__, 1, "m", (), None)
        assert (record.threadName, record.processName, record.process) == (None, None, None)
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = flags


def serving_config(directory: Path, extra: str = "") -> Path:
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

    serving_config(in_tmp)
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


# -- reload (SIGHUP) ------------------------------------------------------------------


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
