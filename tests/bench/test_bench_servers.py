"""bench/servers.py: the baseline's popproxy is imported from its own checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.servers import _python_path


def test_the_checkout_goes_first_on_pythonpath_and_the_old_value_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/repo")
    with _python_path(Path("/before")):
        assert os.environ["PYTHONPATH"] == os.pathsep.join(["/before", "/repo"])
    assert os.environ["PYTHONPATH"] == "/repo"


def test_without_pythonpath_it_is_set_then_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with _python_path(Path("/before")):
        assert os.environ["PYTHONPATH"] == "/before"
    assert "PYTHONPATH" not in os.environ
