"""The wheel is all a server needs: built from this tree, installed into a fresh venv
from a directory of wheels with no index (docs/operations.md, Installing), it runs.

One module-scoped install serves every test: ``pip wheel`` builds popproxy's wheel and
fetches its dependencies' wheels (through the index pip is configured with), then a new
venv installs them with ``--no-index --find-links``, the way a server without network
access to an index would. The installed ``popproxy`` then checks the example config it
carries in ``share/popproxy/``, checks the example rules, and serves a POP3 login; none
of it may import from this checkout.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from popproxy import __version__

REPO = Path(__file__).resolve().parents[1]
# A build, a venv and an install from local wheels take 10-30 s here; a dependency
# fetched from the index over a slow network takes longer. This only stops a hang.
PIP_TIMEOUT_SECONDS = 300
# check-config and version start Python and read a few files.
COMMAND_TIMEOUT_SECONDS = 60
SERVER_START_DEADLINE_SECONDS = 30.0
SERVER_STOP_DEADLINE_SECONDS = 15.0
CLIENT_TIMEOUT_SECONDS = 10.0
# What the wheel installs besides the package, under the venv's prefix (pyproject.toml,
# [tool.hatch.build.targets.wheel.shared-data]), and where each comes from here.
SHARED = {
    "examples": "examples",
    "rules": "rules",
    "contrib/systemd": "contrib/systemd",
}

pytestmark = pytest.mark.slow


@dataclass(frozen=True, slots=True)
class Installed:
    """A venv with popproxy installed from its wheel."""

    venv: Path
    wheels: Path

    @property
    def popproxy(self) -> Path:
        return self.venv / "bin" / "popproxy"

    @property
    def share(self) -> Path:
        return self.venv / "share" / "popproxy"


def clean_env() -> dict[str, str]:
    """The environment without this test run's venv or source tree on any path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "NOTIFY_SOCKET"}
    }
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir
    )
    return env


def run(
    args: list[str | Path], *, cwd: Path, timeout: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``args`` in ``cwd`` with a clean environment; with ``check``, it must exit 0."""
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert not check or result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    wheels = base / "wheels"
    # The build machine: popproxy's wheel and its dependencies' wheels in one directory.
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", wheels, REPO],
        cwd=base,
        timeout=PIP_TIMEOUT_SECONDS,
    )
    # The server: a fresh venv, nothing from an index.
    venv = base / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=base, timeout=PIP_TIMEOUT_SECONDS)
    run(
        [
            venv / "bin" / "python", "-m", "pip", "install", "--quiet",
            "--no-index", "--find-links", wheels, "popproxy",
        ],
        cwd=base,
        timeout=PIP_TIMEOUT_SECONDS,
    )  # fmt: skip
    return Installed(venv=venv, wheels=wheels)


def test_the_wheel_is_pure_python_and_installs_from_its_own_directory(
    installed: Installed,
) -> None:
    names = sorted(p.name for p in installed.wheels.glob("popproxy-*.whl"))
    assert names == [f"popproxy-{__version__}-py3-none-any.whl"]
    result = run(
        [installed.venv / "bin" / "python", "-c", "import popproxy; print(popproxy.__file__)"],
        cwd=installed.venv,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    module = Path(result.stdout.strip())
    assert module.is_relative_to(installed.venv), "popproxy must come from the wheel"
    version = run([installed.popproxy, "version"], cwd=installed.venv, timeout=60)
    assert __version__ in version.stdout


def test_the_wheel_carries_the_examples_rules_and_unit(installed: Installed) -> None:
    for source, target in SHARED.items():
        here = sorted(p.relative_to(REPO / source) for p in (REPO / source).rglob("*"))
        there = sorted(
            p.relative_to(installed.share / target) for p in (installed.share / target).rglob("*")
        )
        assert there == here
        for relative in here:
            if (REPO / source / relative).is_file():
                assert (installed.share / target / relative).read_bytes() == (
                    REPO / source / relative
                ).read_bytes()


def test_check_config_accepts_the_installed_example(installed: Installed) -> None:
    """As docs/operations.md says: relative paths resolve against the working directory,
    where the example's sqlite state wants var/ (without it, check-config says so)."""
    missing = run(
        [installed.popproxy, "check-config", "-c", "examples/popproxy.yaml"],
        cwd=installed.share,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    assert missing.returncode == 2
    assert f"the directory {installed.share / 'var'} of the sqlite file" in missing.stderr
    (installed.share / "var").mkdir()
    result = run(
        [installed.popproxy, "check-config", "-c", "examples/popproxy.yaml"],
        cwd=installed.share,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    assert result.stdout.startswith("examples/popproxy.yaml: ok\n")
    maildir = installed.share / "examples" / "maildir" / "demo"
    assert f"  demo: maildir {maildir}\n" in result.stdout  # exists: no "(does not exist yet)"


def test_check_config_loads_the_installed_rules(installed: Installed, tmp_path: Path) -> None:
    """The example rules, with users they match, as an operator would start from them."""
    config = yaml.safe_load((installed.share / "examples" / "popproxy.yaml").read_text())
    config["upstreams"] = {"provider": {"host": "pop.example.net"}}
    config["rules_dir"] = str(installed.share / "rules")
    for name in ("alice-phone", "scanner-1", "erp"):
        config["users"][name] = {
            "password_hash": config["users"]["demo"]["password_hash"],
            "upstream": "provider",
            "upstream_password_env": "HOME",
        }
    config["users"]["demo"]["maildir"] = str(installed.share / "examples/maildir/demo")
    path = tmp_path / "popproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # The example's sqlite file is under var/: check-config checks that its directory
    # exists once users are served from an upstream, as here.
    (tmp_path / "var").mkdir()
    result = run(
        [installed.popproxy, "check-config", "-c", path],
        cwd=tmp_path,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )
    files = sorted((REPO / "rules").glob("*.yaml"))
    rules = sum(len(yaml.safe_load(f.read_text())["rules"]) for f in files)
    assert f"rules: {rules} in {len(files)} file(s)" in result.stdout
    for name in ("scanners-keep", "erp-drain", "expire-90", "phones-no-lists"):
        assert name in result.stdout


def test_the_installed_popproxy_serves_the_example(installed: Installed, tmp_path: Path) -> None:
    """`popproxy run` from the wheel alone: the example on kernel-picked ports, a poplib
    login and STAT, then SIGTERM and exit 0."""
    workdir = tmp_path / "srv"
    shutil.copytree(installed.share / "examples", workdir / "examples")
    config = yaml.safe_load((workdir / "examples" / "popproxy.yaml").read_text())
    config["listen"][0]["port"] = 0
    config["metrics"]["port"] = 0
    (workdir / "popproxy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (workdir / "var").mkdir()  # the example's sqlite state lives there

    proc = subprocess.Popen(
        [str(installed.popproxy), "run", "-c", "popproxy.yaml"],
        cwd=workdir,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        end = time.monotonic() + SERVER_START_DEADLINE_SECONDS
        while not any("msg=ready" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < end, "".join(lines)
            time.sleep(0.05)
        listening = next(line for line in lines if "msg=listening " in line)
        match = re.search(r" port=(\d+)", listening)
        assert match is not None
        client = poplib.POP3("127.0.0.1", int(match.group(1)), timeout=CLIENT_TIMEOUT_SECONDS)
        try:
            client.user("demo")
            client.pass_("demo")
            count, _size = client.stat()
        finally:
            client.quit()
        assert count == len(list((REPO / "examples/maildir/demo/new").iterdir())) + len(
            list((REPO / "examples/maildir/demo/cur").iterdir())
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=SERVER_STOP_DEADLINE_SECONDS) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        proc.stderr.close()
    assert any("msg=session_end" in line and "result=quit" in line for line in lines)
