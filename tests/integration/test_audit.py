"""`popproxy audit` answers "why did this message disappear?" for a running popproxy
(issue 18, item 5): a client's DELE under a `delete` rule, and one under a `keep` rule
(a hide), go through popproxy in front of the session's Dovecot, and the audit command,
run as an operator would run it (a separate process on the same config), names each
message, its size, the rule, the action and the session of the `session_end` line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from state.state_backends import BACKENDS, new_postgres_backend

from popproxy.config import StateConfig
from popproxy.state import open_store
from popproxy.state.base import AccountKey, Disposal, SeenMessage, SessionRecord

from .conftest import StartServer
from .dovecot import DovecotServer, DovecotUser
from .harness import state_url
from .test_proxy import UPSTREAM, local_name, local_user
from .test_retention import KEEP, login, proxy, uidls

DELETE = {"10-delete.yaml": "rules:\n  - name: purge-on-dele\n    action: delete\n"}
# How long the audit command may take (a cold Python start and one query).
AUDIT_DEADLINE_SECONDS = 60


def run_audit(config: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popproxy", "audit", "-c", str(config), *arguments],
        capture_output=True,
        text=True,
        timeout=AUDIT_DEADLINE_SECONDS,
        check=False,
        cwd=config.parent,
    )


@pytest.fixture(params=BACKENDS)
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """The state store of the test's popproxy: a sqlite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        return tmp_path / "state.db"
    return new_postgres_backend(request.getfixturevalue("pg_database")).url


def test_a_delete_under_a_rule_shows_in_popproxy_audit_with_the_rule_name(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser, state: Path | str
) -> None:
    server = proxy(start, dovecot, DELETE, [local_user(account)], state=state)
    keys_before = account.keys()
    pop = login(server, local_name(account))
    listed = uidls(pop)
    sizes = [int(line.split()[1]) for line in pop.list()[1]]
    pop.dele(2)
    assert pop.quit().startswith(b"+OK")
    (end,) = server.wait_sessions_ended(1)
    dovecot.wait_sessions_ended(account, 1)
    assert len(account.keys()) == len(keys_before) - 1  # really gone upstream

    proc = run_audit(server.config, "--json", "--user", local_name(account))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 1
    at = rows[0].pop("at")
    assert at.endswith("Z")
    assert rows[0] == {
        "session": end["session"],
        "user": local_name(account),
        "upstream": UPSTREAM,
        "upstream_user": account.name,
        "uid": listed[1],
        "size": sizes[1],
        "rule": "purge-on-dele",
        "action": "delete_upstream",
    }
    table = run_audit(server.config, "--uid", listed[1])
    assert table.returncode == 0, table.stderr
    header, line = table.stdout.splitlines()
    assert header.split()[:3] == ["TIME", "SESSION", "USER"]
    assert line.split()[2:] == [
        end["session"],
        local_name(account),
        UPSTREAM,
        account.name,
        listed[1],
        str(sizes[1]),
        "purge-on-dele",
        "delete_upstream",
    ]
    assert run_audit(server.config, "--rule", "keep-all", "--json").stdout == ""


def test_a_dele_under_a_keep_rule_shows_as_a_hide(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser, tmp_path: Path
) -> None:
    server = proxy(start, dovecot, KEEP, [local_user(account)], state=tmp_path / "state.db")
    pop = login(server, local_name(account))
    listed = uidls(pop)
    pop.dele(1)
    assert pop.quit().startswith(b"+OK")
    (end,) = server.wait_sessions_ended(1)
    proc = run_audit(server.config, "--json", "--rule", "keep-on-server")
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert (row["uid"], row["action"], row["session"]) == (listed[0], "hide", end["session"])


def test_a_running_popproxy_trims_the_audit_log_to_its_retention(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser, tmp_path: Path
) -> None:
    """The default state.audit_retention_days is 400: a row of 500 days ago goes at start
    (then every AUDIT_TRIM_INTERVAL_SECONDS), one of 5 days ago stays."""
    state = tmp_path / "state.db"
    now = datetime.now(UTC)

    async def fill() -> None:
        store = await open_store(StateConfig(state_url(state)))
        try:
            for days, uid in ((500, "ancient"), (5, "recent")):
                await store.record(
                    SessionRecord(
                        AccountKey(UPSTREAM, account.name),
                        local_name(account),
                        f"old{days}",
                        now - timedelta(days=days),
                        seen=(SeenMessage(uid, 10),),
                        deleted_upstream=(Disposal(uid, "purge-on-dele"),),
                    )
                )
        finally:
            await store.aclose()

    trio.run(fill)
    server = proxy(start, dovecot, DELETE, [local_user(account)], state=state)
    server.wait_for_log(
        lambda records: any(r.get("msg") == "audit_trimmed" for r in records),
        timeout=10,
        what="msg=audit_trimmed",
    )
    (trimmed,) = server.records("audit_trimmed")
    assert (trimmed["rows"], trimmed["retention_days"]) == ("1", "400")
    proc = run_audit(server.config, "--json")
    assert [json.loads(line)["uid"] for line in proc.stdout.splitlines()] == ["recent"]
