"""bench/shared_calls.py runs against the test PostgreSQL server and cleans up after itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
from state.state_backends import server_url

REPO = Path(__file__).resolve().parents[2]
RUN_SECONDS = 120


def test_a_short_run_prints_cpu_and_wall_per_call_and_drops_its_schema() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "POPPROXY_TEST_PG_URL": server_url()}
    result = subprocess.run(
        [sys.executable, "-m", "bench.shared_calls", "--tasks", "3", "--loops", "5"],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=RUN_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    line = result.stdout.decode().strip()
    found = re.fullmatch(
        r"3 tasks x 5 loops x 4 calls: CPU ([\d.]+) us/call, wall ([\d.]+) us/call", line
    )
    assert found, line
    assert float(found[1]) > 0 and float(found[2]) > 0
    with psycopg.connect(server_url(), autocommit=True) as conn:
        left = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench_shared_%'"
        ).fetchall()
    assert left == []
