"""Durability of names in a directory: ``fsync`` of the directory itself.

A file's own ``fsync`` makes its content durable, not the name that points at it: a
rename into a directory, a file created there or one unlinked from it survives a
crash only once the directory is synced too (fsync(2), "Calling fsync() does not
necessarily ensure that the entry in the directory containing the file has also
reached disk"). The Maildir's deletions, the gateway's deliveries and the OAuth2
token file's atomic rewrite all end with this step.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path``; an OSError (absent, not a directory, I/O) is raised."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
