"""The refresh-token file (popproxy.oauth2.token_file): read, and rewritten atomically 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from popproxy.oauth2.token_file import (
    MAX_TOKEN_FILE_BYTES,
    TokenFileError,
    read_refresh_token,
    write_refresh_token,
)
from popproxy.secret import Secret


def test_round_trip_with_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "a.token"
    path.write_text("old\n")
    path.chmod(0o644)
    old = os.umask(0)
    try:
        write_refresh_token(path, Secret(b"1//new-token"))
    finally:
        os.umask(old)
    assert path.read_bytes() == b"1//new-token\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_refresh_token(path) == Secret(b"1//new-token")
    assert [p.name for p in tmp_path.iterdir()] == ["a.token"]  # no temporary file left


def test_the_file_is_replaced_not_rewritten_in_place(tmp_path: Path) -> None:
    # A reader that opened the old file keeps reading the old token whole: rename, not truncate.
    path = tmp_path / "a.token"
    path.write_text("old-token\n")
    with path.open("rb") as reader:
        write_refresh_token(path, Secret(b"new-token"))
        assert reader.read() == b"old-token\n"
    assert path.read_bytes() == b"new-token\n"


def test_a_failed_write_leaves_the_old_token_and_no_temporary_file(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    path = directory / "a.token"
    path.write_text("old\n")
    directory.chmod(0o500)
    try:
        if os.access(directory, os.W_OK):  # root ignores the mode: make the rename fail instead
            (directory / "a.token").unlink()
            (directory / "a.token").mkdir()
            (directory / "a.token" / "x").write_text("")
            with pytest.raises(TokenFileError, match="cannot write"):
                write_refresh_token(path, Secret(b"new"))
            assert sorted(p.name for p in directory.iterdir()) == ["a.token"]
        else:
            with pytest.raises(TokenFileError, match="cannot write"):
                write_refresh_token(path, Secret(b"new"))
            assert path.read_text() == "old\n"
    finally:
        directory.chmod(0o700)


@pytest.mark.parametrize("value", [b"", b"a\nb", b"a\rb"])
def test_refuses_to_write_what_cannot_be_read_back(tmp_path: Path, value: bytes) -> None:
    with pytest.raises(TokenFileError):
        write_refresh_token(tmp_path / "t", Secret(value))


@pytest.mark.parametrize(
    "content", [b"", b"\n", b"two\nlines\n", b"x" * (MAX_TOKEN_FILE_BYTES + 1)]
)
def test_reading_something_that_is_not_one_token(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "t"
    path.write_bytes(content)
    with pytest.raises(TokenFileError, match="does not hold one refresh token"):
        read_refresh_token(path)


def test_reading_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read"):
        read_refresh_token(tmp_path / "nope")
