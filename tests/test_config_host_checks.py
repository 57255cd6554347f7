"""check-config reports what ``run`` would meet first at start on this host (issue 16, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from popproxy.auth.passwords import hash_password
from popproxy.config import load_config
from popproxy.config.host_checks import host_problems
from popproxy.secret import Secret

REPO = Path(__file__).resolve().parent.parent
HASH = hash_password(Secret.from_str("pw"), ln=4)


def write_config(state_url: str, *, upstream_user: bool = True, limits: str = "{}") -> Path:
    user = (
        f'alice: {{password_hash: "{HASH}", upstream: prov, upstream_password_env: PW}}'
        if upstream_user
        else f'demo: {{password_hash: "{HASH}", maildir: m}}'
    )
    path = Path("cfg.yaml")
    path.write_text(
        textwrap.dedent(f"""\
        listen: [{{address: 127.0.0.1, port: 0, tls: none}}]
        upstreams: {{prov: {{host: 127.0.0.1, port: 1, tls: none}}}}
        users:
          {user}
        state: {{url: "{state_url}"}}
        limits: {limits}
        """),
        encoding="utf-8",
    )
    return path


def popproxy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PW": "upstream-secret"}
    return subprocess.run(
        [sys.executable, "-m", "popproxy", *args],
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
        text=True,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PW", "upstream-secret")


def test_a_sqlite_directory_that_does_not_exist_is_a_host_problem(tmp_path: Path) -> None:
    config = load_config(write_config("sqlite:///nodir/state.db"))
    [issue] = host_problems(config)
    assert str(issue) == (
        f"cfg.yaml: state.url: the directory {tmp_path}/nodir of the sqlite file does not"
        " exist; create it, or name another (sqlite:/// with three slashes is relative to"
        " the working directory popproxy starts in, four slashes start an absolute path)"
    )
    Path("nodir").mkdir()
    assert host_problems(config) == ()


def test_maildir_users_need_the_store_for_their_known_sources(tmp_path: Path) -> None:
    """Known sources (on by default) are written at every user's logins: without the
    store a stranger's failures would lock the owner out too."""
    config = load_config(write_config("sqlite:///nodir/s.db", upstream_user=False))
    assert config.uses_state
    [issue] = host_problems(config)
    assert f"the directory {tmp_path}/nodir of the sqlite file does not exist" in str(issue)


def test_with_known_sources_off_maildir_users_never_open_the_store() -> None:
    config = load_config(
        write_config(
            "sqlite:///nodir/s.db", upstream_user=False, limits="{auth_known_source_days: 0}"
        )
    )
    assert not config.uses_state
    assert host_problems(config) == ()


def test_check_config_reports_the_missing_sqlite_directory(tmp_path: Path) -> None:
    write_config("sqlite:///nodir/state.db")
    check = popproxy("check-config", "-c", "cfg.yaml", cwd=tmp_path)
    assert check.returncode == 2
    assert check.stdout == ""
    assert check.stderr == (
        f"cfg.yaml: state.url: the directory {tmp_path}/nodir of the sqlite file does not"
        " exist; create it, or name another (sqlite:/// with three slashes is relative to"
        " the working directory popproxy starts in, four slashes start an absolute path)\n"
        "cfg.yaml: 1 problem(s) found\n"
    )


@pytest.mark.parametrize("upstream_user", [True, False])
def test_run_says_it_cannot_open_the_state_store_once(tmp_path: Path, upstream_user: bool) -> None:
    """At start, whether upstream sessions or only Maildir users' known sources use it."""
    Path("var/state.db").mkdir(parents=True)  # a directory where the file should be
    write_config("sqlite:///var/state.db", upstream_user=upstream_user)
    run = popproxy("run", "-c", "cfg.yaml", cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.count("cannot open the state store") == 1, run.stderr
    assert f'reason="cannot open the state store {tmp_path}/var/state.db: ' in run.stderr


def test_run_reports_the_missing_sqlite_directory_before_it_starts(tmp_path: Path) -> None:
    write_config("sqlite:///nodir/state.db")
    run = popproxy("run", "-c", "cfg.yaml", cwd=tmp_path)
    assert run.returncode == 2
    assert f"cfg.yaml: state.url: the directory {tmp_path}/nodir of the sqlite file" in run.stderr
    assert "msg=" not in run.stderr  # refused before logging starts, as any config problem
