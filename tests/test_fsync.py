"""popproxy.fsync: syncing a directory, and the errors a caller turns into its own."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from popproxy.fsync import fsync_dir


def test_a_directory_is_synced(tmp_path: Path) -> None:
    (tmp_path / "name").write_bytes(b"x")
    fsync_dir(tmp_path)
    assert (tmp_path / "name").read_bytes() == b"x"


def test_a_missing_directory_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "absent")


def test_a_file_is_not_a_directory(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_bytes(b"x")
    with pytest.raises(NotADirectoryError) as info:
        fsync_dir(file)
    assert info.value.errno == errno.ENOTDIR
