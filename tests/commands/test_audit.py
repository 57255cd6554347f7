"""``popproxy audit`` (popproxy/commands/audit.py through cli.main), on both backends."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_cli import in_tmp, run_popproxy

from popproxy import cli
from popproxy.commands.audit import MAX_AUDIT_LIMIT, parse_since
from popproxy.state.base import MAX_AUDIT_ROWS, Disposal

from .test_state import (  # the state commands' fixtures and helpers
    ALICE_ACCOUNT,
    STATE_T0,
    TEAM_ACCOUNT,
    fill_state,
    state_config,
    state_session,
    state_url,
)

__all__ = ["in_tmp", "state_url"]  # fixtures, used by name

DAY = timedelta(days=1)


def fill_audit(url: str) -> None:
    """alice hides uid-1 and deletes uid-2 on day 0; bob deletes t on day 1."""
    fill_state(
        url,
        state_session(
            ALICE_ACCOUNT,
            STATE_T0,
            {"uid-1": 1234, "uid-2": 5},
            session_id="a1b2c3d4",
            hidden=(Disposal("uid-1", "keep-all"),),
            deleted_upstream=(Disposal("uid-2", "old-mail"),),
        ),
        state_session(
            TEAM_ACCOUNT,
            STATE_T0 + DAY,
            {"t": 9},
            user="bob",
            session_id="e5f6a7b8",
            deleted_upstream=(Disposal("t", "spam"),),
        ),
    )


def test_audit_prints_a_table_newest_first(
    in_tmp: Path, state_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_audit(state_url)
    assert cli.main(["audit", "-c", str(state_config(in_tmp, state_url))]) == 0
    captured = capsys.readouterr()
    assert captured.out == textwrap.dedent("""\
        TIME                  SESSION   USER   UPSTREAM  UPSTREAM USER      UIDL   SIZE  RULE      ACTION
        2024-05-02 12:00:00Z  e5f6a7b8  bob    other     team@example.net   t         9  spam      delete_upstream
        2024-05-01 12:00:00Z  a1b2c3d4  alice  provider  alice@example.net  uid-2     5  old-mail  delete_upstream
        2024-05-01 12:00:00Z  a1b2c3d4  alice  provider  alice@example.net  uid-1  1234  keep-all  hide
        """)  # noqa: E501
    assert captured.err == ""


@pytest.mark.parametrize(
    ("filters", "uids"),
    [
        (["--user", "alice"], ["uid-2", "uid-1"]),
        (["--user", "carol"], []),
        (["--upstream", "other"], ["t"]),
        (["--rule", "keep-all"], ["uid-1"]),
        (["--uid", "uid-2"], ["uid-2"]),
        (["--since", "2024-05-02"], ["t"]),
        (["--since", "2024-05-01T12:00:00Z"], ["t", "uid-2", "uid-1"]),
        (["--since", "2024-05-01T14:00:01+02:00"], ["t"]),
        (["--since", "2024-05-01T12:00:01"], ["t"]),  # no offset: UTC
        (["--user", "alice", "--rule", "old-mail", "--upstream", "provider"], ["uid-2"]),
        (["--limit", "1"], ["t"]),
    ],
)
def test_audit_filters(
    in_tmp: Path,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    filters: list[str],
    uids: list[str],
) -> None:
    fill_audit(state_url)
    config = str(state_config(in_tmp, state_url))
    assert cli.main(["audit", "-c", config, "--json", *filters]) == 0
    out = capsys.readouterr().out
    assert [json.loads(line)["uid"] for line in out.splitlines()] == uids


def test_audit_json_is_one_object_per_line(
    in_tmp: Path, state_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_audit(state_url)
    assert cli.main(["audit", "-c", str(state_config(in_tmp, state_url)), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert json.loads(lines[2]) == {
        "at": "2024-05-01T12:00:00.000000Z",
        "session": "a1b2c3d4",
        "user": "alice",
        "upstream": "provider",
        "upstream_user": "alice@example.net",
        "uid": "uid-1",
        "size": 1234,
        "rule": "keep-all",
        "action": "hide",
    }


def test_audit_says_when_the_limit_cut_the_list(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_audit(f"sqlite:///{in_tmp}/state.db")
    config = str(state_config(in_tmp))
    assert cli.main(["audit", "-c", config, "--limit", "2"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3  # the header and two rows
    assert "showing the newest 2 rows" in captured.err
    assert cli.main(["audit", "-c", config, "--limit", "3"]) == 0
    assert capsys.readouterr().err == ""


def test_an_empty_audit_log(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill_state(f"sqlite:///{in_tmp}/state.db")
    config = str(state_config(in_tmp))
    assert cli.main(["audit", "-c", config]) == 0
    assert capsys.readouterr().out == "no audit rows match\n"
    assert cli.main(["audit", "-c", config, "--json"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        ("yesterday", "expected a date (2024-05-01), a time (2024-05-01T12:00:00Z)"),
        ("2024-13-01", "got '2024-13-01'"),
        ("99999d", "at most 36500 days ago"),
        ("", "expected a date"),
    ],
)
def test_a_bad_since_is_a_usage_error_saying_what_fits(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], since: str, expected: str
) -> None:
    fill_audit(f"sqlite:///{in_tmp}/state.db")
    assert cli.main(["audit", "-c", str(state_config(in_tmp)), "--since", since]) == 2
    err = capsys.readouterr().err
    assert "argument --since: " in err
    assert expected in err


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--limit", "0"], "--limit must be 1-99999"),
        (["--limit", "100000"], "--limit must be 1-99999"),
        (["--user", ""], "user must be 1-248 octets"),
        (["--rule", "r" * 200], "a rule name must be 1-128 characters"),
    ],
)
def test_audit_usage_errors(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], expected: str
) -> None:
    fill_audit(f"sqlite:///{in_tmp}/state.db")
    assert cli.main(["audit", "-c", str(state_config(in_tmp)), *arguments]) == 2
    assert expected in capsys.readouterr().err


def test_the_largest_limit_is_one_row_less_than_a_store_call() -> None:
    assert MAX_AUDIT_LIMIT == MAX_AUDIT_ROWS - 1


def test_since_days_ago_counts_from_now() -> None:
    now = datetime(2024, 5, 10, 8, 30, tzinfo=UTC)
    assert parse_since("7d", now) == now - 7 * DAY
    assert parse_since("0d", now) == now
    assert parse_since("2024-05-01", now) == datetime(2024, 5, 1, tzinfo=UTC)
    east = parse_since("2024-05-01T02:00:00+02:00", now)
    assert east == datetime(2024, 5, 1, tzinfo=UTC)
    assert east.tzinfo == timezone(timedelta(hours=2))


def test_audit_needs_an_existing_store_and_creates_none(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["audit", "-c", str(state_config(in_tmp))]) == 1
    assert f"no state store at {in_tmp}/state.db" in capsys.readouterr().err
    assert not (in_tmp / "state.db").exists()


def test_audit_reads_a_store_it_may_not_write(in_tmp: Path) -> None:
    """Read-only: the file and its directory may be unwritable, as for an auditor's account,
    and not a byte of the file changes (compared, as root ignores the modes)."""
    url = f"sqlite:///{in_tmp}/store/state.db"
    (in_tmp / "store").mkdir()
    fill_audit(url)
    database = in_tmp / "store" / "state.db"
    before = database.read_bytes()
    database.chmod(0o400)
    (in_tmp / "store").chmod(0o500)
    try:
        proc = run_popproxy("audit", "-c", str(state_config(in_tmp, url)), cwd=in_tmp)
    finally:
        (in_tmp / "store").chmod(0o700)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 4
    assert database.read_bytes() == before


def test_audit_cannot_reach_a_postgres_server(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(state_config(in_tmp, "postgresql://popproxy@127.0.0.1:1/popproxy"))
    assert cli.main(["audit", "-c", config]) == 1
    err = capsys.readouterr().err
    assert err.startswith("popproxy audit: cannot open the state store postgresql://127.0.0.1:1/")
