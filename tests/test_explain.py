"""explain.py routes a user as a session would, without the server stack.

(The dry run itself is tested through ``popproxy explain`` in tests/test_cli.py.)
"""

from __future__ import annotations

import subprocess
import sys


def test_explain_does_not_import_the_server() -> None:
    """explain uses the maildrop router and tls.py, never serve.py (issue 12, layering)."""
    code = "import sys, popproxy.explain; print('popproxy.serve' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
