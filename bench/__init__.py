"""Benchmarks: popproxy against a direct connection to the same Dovecot (issue 7).

Run ``python -m bench.run --help`` from the repository root (as root: it starts a
Dovecot); docs/benchmarks.md has the figures and how they were taken.

The harness reuses the integration suite's Dovecot and popproxy fixtures
(tests/integration/dovecot.py, harness.py), importable as ``integration`` once
tests/ is on the path, which importing this package sees to.
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
