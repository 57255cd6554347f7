"""Fixtures and hooks for every test: the loopback client streams are closed after each
test, a PostgreSQL database of the run's own for the tests of the state store on
PostgreSQL, under CI a skipped test is a failed one, and hypothesis examples have no
deadline."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator

import pytest
from hypothesis import settings
from pop3client import close_opened
from state.state_backends import run_database

# No hypothesis test is a timed test: its per-example deadline (200 ms by default) failed
# examples that took 400-600 ms while two workers and a Dovecot shared two loaded cores
# (tests/auth/test_throttle.py, tests/pop3/test_client_replies.py), and what the
# properties check does not depend on time. Loaded before any test module is collected.
settings.register_profile("popproxy", deadline=None)
settings.load_profile("popproxy")

# Set by CI (.ci/run runs with CI=true). There every tool the suite needs is installed by
# scripts/test, so a test that skips (a missing tool, a missing directory) hides a gap:
# it fails instead (docs/testing.md).
CI_ENV = "CI"


def skips_fail() -> bool:
    """Whether a skipped test counts as failed: CI set to anything but empty or false."""
    return os.environ.get(CI_ENV, "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI, turn a skip into a failure that says why it was skipped."""
    report = yield
    if report.skipped and skips_fail() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under {CI_ENV}={os.environ[CI_ENV]}, where nothing may skip: {reason}"
        )
    return report


@pytest.fixture(autouse=True)
def close_client_streams() -> Iterator[None]:
    """Close the streams `pop3client.open_loopback` opened, whatever the test did.

    Synchronous on purpose: pytest-trio runs an async fixture only for a test that
    names it (directly or through another fixture), never for autouse alone, so an
    async one here would never run and every stream would stay open until the
    interpreter exited.
    """
    yield
    close_opened()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of a database of this test run's own on the test PostgreSQL server
    (tests/state/state_backends.py), dropped at the end of the run."""
    yield from run_database()


# The default state.url, relative to the working directory (the checkout when pytest runs
# from it): a test that builds a Config without a state URL of its own would write here.
DEFAULT_STATE_FILE = "popproxy-state.db"


@pytest.fixture(scope="session", autouse=True)
def no_state_file_in_working_directory() -> Iterator[None]:
    """Fail the run if a test created the default state file in the working directory:
    every test keeps its store under its own tmp_path (a file left in the checkout
    outlives the run and carries one test's migrations into the next run)."""
    before = os.path.exists(DEFAULT_STATE_FILE)
    yield
    if not before and os.path.exists(DEFAULT_STATE_FILE):
        pytest.fail(f"a test wrote {DEFAULT_STATE_FILE} in {os.getcwd()}", pytrace=False)
