"""``check-config --against-running`` and the reload log name the rule that changed
(issue 16, item 5), against the real `popproxy run` process.

``--against COPY`` of the running config cannot see a rule change when both configs
name the same ``rules_dir``; ``run`` therefore keeps a copy of every file it loaded
(popproxy/config/snapshot.py) and ``--against-running`` compares with that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .conftest import StartServer
from .harness import PASSWORD, SOCKET_TIMEOUT_SECONDS, ProxyUser, ServerProcess, Upstream
from .test_reload import sighup_and_wait

RULES = {
    "10-scanners.yaml": "rules:\n  - name: scanners-keep\n    action: keep\n",
    "20-erp.yaml": "rules:\n  - name: erp-drain\n    action: delete_after_retrieve\n",
}
# An upstream that is never contacted: no client logs in here.
NOWHERE = Upstream("127.0.0.1", 9, "none")


def check_config(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popproxy", "check-config", "-c", str(server.config), *args],
        capture_output=True,
        text=True,
        cwd=server.config.parent,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=SOCKET_TIMEOUT_SECONDS,
        check=False,
    )


def wait_snapshots(server: ServerProcess, count: int) -> None:
    server.wait_for_log(
        lambda rs: sum(r.get("msg") == "snapshot_written" for r in rs) >= count,
        timeout=10,
        what=f"{count} snapshot_written lines",
    )


def against(output: str) -> list[str]:
    """The lines from "against ..." on."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("against "))
    return lines[start:]


def test_a_changed_rule_is_named_before_and_by_the_reload(start: StartServer) -> None:
    users = [ProxyUser("scanner", PASSWORD, "office", "scan@example.net", "x")]
    users.append(ProxyUser("erp", PASSWORD, "office", "erp@example.net", "x"))
    server = start(users=users, upstreams={"office": NOWHERE}, rules=RULES, listeners=["none"])
    snapshot = server.config.parent / "popproxy-loaded"
    wait_snapshots(server, 1)
    assert [r["directory"] for r in server.records("snapshot_written")] == [str(snapshot)]
    copy = server.config.with_name("running-copy.yaml")
    shutil.copy(server.config, copy)  # the "copy of the running config" of old

    rules_dir = server.config.parent / "rules"
    (rules_dir / "20-erp.yaml").write_text(
        "rules:\n  - name: erp-drain\n    action: keep\n", encoding="utf-8"
    )
    # The copy names the same rules_dir: it cannot see the change.
    old_way = check_config(server, "--against", str(copy))
    assert old_way.returncode == 0, old_way.stderr
    assert against(old_way.stdout) == [f"against {copy}: no changes"]

    running = check_config(server, "--against-running")
    assert running.returncode == 0, running.stderr
    lines = against(running.stdout)
    assert lines[0].startswith("against the running config (loaded ")
    assert lines[0].endswith(f", copy in {snapshot}):")
    assert lines[1:] == [
        "  applied by a reload (SIGHUP):",
        "    policy.rules[1] (erp-drain).action",
        "restart required: no",
    ]

    outcome = sighup_and_wait(server)
    assert outcome["msg"] == "reloaded", outcome
    assert outcome["changed"] == "policy.rules[1] (erp-drain).action"
    wait_snapshots(server, 2)
    after = check_config(server, "--against-running")
    assert against(after.stdout)[0].endswith("no changes"), after.stdout


def test_without_a_snapshot_check_config_says_where_it_looked(start: StartServer) -> None:
    users = [ProxyUser("erp", PASSWORD, "office", "erp@example.net", "x")]
    server = start(users=users, upstreams={"office": NOWHERE}, rules=RULES, listeners=["none"])
    snapshot = server.config.parent / "popproxy-loaded"
    wait_snapshots(server, 1)
    shutil.rmtree(snapshot)
    done = check_config(server, "--against-running")
    assert done.returncode == 1
    assert done.stderr == (
        f"popproxy check-config: no snapshot in {snapshot}: popproxy run writes one there"
        " when it starts and at each reload (is it running, with this config's state or"
        " snapshot_dir?)\n"
    )
