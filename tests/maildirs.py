"""Maildirs for the tests that serve local mail: the directories and the message files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def make_maildir(root: Path, messages: Mapping[str, bytes] | None = None) -> Path:
    """A Maildir at ``root`` (new/, cur/ and tmp/, parents made) with each of ``messages``
    in new/ under its unique name; returns ``root``."""
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True)
    for name, body in (messages or {}).items():
        (root / "new" / name).write_bytes(body)
    return root
