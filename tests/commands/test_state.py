"""``popproxy state show`` and ``state prune`` (popproxy/commands/state.py), through
``cli.main`` and as a process, on both backends; the fixtures and helpers here serve
tests/commands/test_audit.py too."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from state.state_backends import BACKENDS, new_postgres_backend
from test_cli import HASH, in_tmp, run_popproxy

from popproxy import cli
from popproxy.config import StateConfig
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

__all__ = ["in_tmp"]  # a fixture, used by name


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
