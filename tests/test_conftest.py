"""tests/conftest.py: under CI a skipped test fails (issue 18: a skip must not hide a
tool that scripts/test installs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# A pytest run of two tiny tests takes about a second; this only stops a hung one.
RUN_TIMEOUT_SECONDS = 120

SAMPLE = """
import pytest

def test_missing_tool():
    pytest.skip("some-tool is not installed")

@pytest.mark.xfail(reason="known")
def test_known_failure():
    assert False

def test_fine():
    assert True
"""


def run_sample(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """The suite's conftest loaded as a plugin, on SAMPLE, with CI set to ``ci``."""
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(TESTS)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-rA", str(tmp_path)],
        check=False,  # the exit status is what the tests look at
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT_SECONDS,
    )  # fmt: skip


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_a_skip_fails_and_says_why(tmp_path: Path, ci: str) -> None:
    done = run_sample(tmp_path, ci)
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 passed, 1 xfailed" in done.stdout
    assert f"skipped under CI={ci}, where nothing may skip: Skipped: some-tool" in done.stdout


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_outside_ci_a_skip_is_a_skip(tmp_path: Path, ci: str | None) -> None:
    done = run_sample(tmp_path, ci)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 1 skipped, 1 xfailed" in done.stdout
