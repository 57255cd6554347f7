"""What the ``popproxy`` subcommands share: the exit codes, the config loaded with its
problems printed, and the check that a sqlite state store exists."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TypeAlias

from popproxy.config import Config, ConfigError, load_config
from popproxy.config.host_checks import host_problems

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

LOG_LEVELS = ("debug", "info", "warning", "error")

# What each command module's add_parser adds its subcommand to.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def load(path: Path, *, on_this_host: bool = False) -> Config | None:
    """Load the config, printing every problem to stderr as FILE: key.path: message.

    ``on_this_host``: also what ``run`` would meet at start here (``check-config`` and
    ``run`` itself; see popproxy/config/host_checks.py).
    """
    try:
        config = load_config(path)
        issues = host_problems(config) if on_this_host else ()
    except ConfigError as exc:
        issues = exc.issues
    else:
        if not issues:
            return config
    for issue in issues:
        print(issue, file=sys.stderr)
    print(f"{path}: {len(issues)} problem(s) found", file=sys.stderr)
    return None


def state_missing(config: Config) -> bool:
    """Whether the config names a sqlite file that does not exist (and say so)."""
    path = config.state.sqlite_path
    if path is not None and not path.exists():
        print(
            f"popproxy: no state store at {path} (popproxy creates it when it first runs)",
            file=sys.stderr,
        )
        return True
    return False
