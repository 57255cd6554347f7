"""The files ``popproxy run`` loaded, kept for ``check-config --against-running``.

Comparing an edited config with "a copy of the running one" says nothing about the
rules when both name the same ``rules_dir``: the copy's rules are read from the
edited directory too. So ``run`` keeps its own copy of every file it loaded, as it
read them, after the start and after each successful reload: the config file and
each rule file, with the working directory it resolved relative paths against.
``check-config --against-running`` loads that copy (its rules from the copy) and
compares (docs/operations.md, "Before reloading").

The directory is ``snapshot_dir``, or ``popproxy-loaded/`` beside a sqlite state file
(a directory ``run`` may write to). A new copy is written beside the old one and
renamed over it, so a reader sees one load or the other. Blocking file work: ``run``
calls :func:`write_snapshot` in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from popproxy.config.model import Config
from popproxy.config.schema import load_config

# The directory's name beside a sqlite state file, when snapshot_dir is not set.
DEFAULT_DIR_NAME = "popproxy-loaded"
CONFIG_FILE = "popproxy.yaml"
RULES_DIR = "rules"
ABOUT_FILE = "loaded.json"
# loaded.json is a few hundred bytes; a bigger one is not ours.
MAX_ABOUT_BYTES = 64 * 1024


class SnapshotError(Exception):
    """No usable snapshot (the text says why and what to do)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A loaded snapshot: the running config as ``run`` loaded it, and when."""

    config: Config
    directory: Path
    loaded_at: str


def snapshot_dir_of(config: Config) -> Path | None:
    """Where ``run`` keeps its copy for ``config`` (None: nowhere, for a PostgreSQL store
    without ``snapshot_dir``)."""
    if config.snapshot_dir is not None:
        return config.snapshot_dir
    sqlite = config.state.sqlite_path
    return None if sqlite is None else sqlite.parent / DEFAULT_DIR_NAME


def write_snapshot(config: Config, directory: Path, cwd: Path, now: datetime) -> bool:
    """Replace the copy in ``directory`` with ``config``'s source files; False if the
    config was not loaded from files (nothing to copy). Raises OSError."""
    if not config.sources:
        return False
    rules_dir = config.rules_dir
    fresh = directory.with_name(f"{directory.name}.new-{os.getpid()}")
    old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(mode=0o700)
    (fresh / RULES_DIR).mkdir()
    for source in config.sources:
        if source.path == config.source:
            target = fresh / CONFIG_FILE
        elif rules_dir is not None and source.path.parent == rules_dir:
            target = fresh / RULES_DIR / source.path.name
        else:
            continue
        target.write_bytes(source.data)
    about = {
        "config": str(config.source),
        "cwd": str(cwd),
        "loaded_at": now.astimezone(UTC).isoformat(timespec="seconds"),
    }
    (fresh / ABOUT_FILE).write_text(json.dumps(about) + "\n", encoding="utf-8")
    if directory.exists():
        directory.rename(old)
    fresh.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return True


def load_snapshot(directory: Path) -> Snapshot:
    """The config in ``directory`` as ``run`` loaded it: its relative paths against the
    directory ``run`` ran in, its rules from the copy. Raises :class:`SnapshotError`,
    and ``ConfigError`` if the copy no longer loads (a secret file gone, say)."""
    directory = directory.absolute()
    try:
        raw = (directory / ABOUT_FILE).read_bytes()[:MAX_ABOUT_BYTES]
    except FileNotFoundError:
        raise SnapshotError(
            f"no snapshot in {directory}: popproxy run writes one there when it starts"
            " and at each reload (is it running, with this config's state or snapshot_dir?)"
        ) from None
    except OSError as exc:
        raise SnapshotError(f"cannot read the snapshot in {directory}: {exc.strerror}") from None
    try:
        about = json.loads(raw)
        cwd, loaded_at = Path(about["cwd"]), str(about["loaded_at"])
    except (ValueError, KeyError, TypeError):
        raise SnapshotError(f"{directory / ABOUT_FILE} is not a popproxy snapshot") from None
    with contextlib.chdir(cwd):
        config = load_config(directory / CONFIG_FILE, rules_from=directory / RULES_DIR)
    return Snapshot(config, directory, loaded_at)
