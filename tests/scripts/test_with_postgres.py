"""scripts/with-postgres (and so scripts/test, through scripts/lib.sh) on a machine with
no PostgreSQL on 5432: it starts a throwaway cluster, names it in POPPROXY_TEST_PG_URL,
and removes it afterwards, whether the command passed or failed.

``POPPROXY_TEST_PG_OWN=1`` makes the script act as if nothing listened on 5432, so
this machine (which runs a server there) takes the same path as a fresh one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "with-postgres"
# initdb, start, the command and stop; generous for a loaded 2-core machine.
SCRIPT_DEADLINE_SECONDS = 180
PROBE = (
    "import os, psycopg\n"
    "with psycopg.connect(os.environ['POPPROXY_TEST_PG_URL'], connect_timeout=10) as c:\n"
    "    print('server', c.execute('SHOW server_version').fetchone()[0])\n"
    "    print('datadir', c.execute('SHOW data_directory').fetchone()[0])\n"
)


def run_script(*command: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "POPPROXY_TEST_PG_URL"}
    env["POPPROXY_TEST_PG_OWN"] = "1"
    return subprocess.run(
        [str(SCRIPT), *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_DEADLINE_SECONDS,
        check=False,
    )


@pytest.mark.parametrize("exit_code", [0, 3])
def test_a_throwaway_cluster_serves_the_command_and_is_removed(exit_code: int) -> None:
    done = run_script(sys.executable, "-c", f"{PROBE}raise SystemExit({exit_code})")
    assert done.returncode == exit_code, done.stderr
    url = re.search(r"POPPROXY_TEST_PG_URL=(\S+)", done.stderr)
    assert url is not None, done.stderr
    assert ":5432/" not in url.group(1)
    assert re.search(r"^server \d+", done.stdout, re.M), done.stdout
    datadir = re.search(r"^datadir (\S+)", done.stdout, re.M)
    assert datadir is not None
    assert not Path(datadir.group(1)).exists()  # stopped and removed
