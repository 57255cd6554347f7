"""``popproxy hash-password`` (popproxy/commands/hash_password.py), as a process and
through ``hash_from`` with a stand-in standard input."""

from __future__ import annotations

import getpass
import io
import sys

import pytest
from test_cli import run_popproxy

from popproxy.auth.passwords import parse_hash, verify_password
from popproxy.commands import hash_password as hash_command
from popproxy.secret import Secret


class FakeStdin(io.TextIOWrapper):
    def __init__(self, data: bytes, *, tty: bool = False) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_hash_password_from_a_pipe() -> None:
    proc = run_popproxy("hash-password", "--ln", "4", stdin=b"s3cret pw\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert verify_password(lines[0], Secret.from_str("s3cret pw"))
    assert "s3cret" not in proc.stdout + proc.stderr


def test_hash_password_default_cost() -> None:
    proc = run_popproxy("hash-password", stdin=b"demo\n")
    assert proc.returncode == 0, proc.stderr
    assert dict(parse_hash(proc.stdout.strip()).params) == {"ln": 15, "r": 8, "p": 1}


@pytest.mark.parametrize(
    ("data", "password"),
    [
        (b"pw", b"pw"),  # no newline at EOF
        (b"pw\r\n", b"pw"),
        (b" spaced pw \n", b" spaced pw "),  # only the newline is stripped
        (b"first\nsecond\n", b"first"),  # one line only
        ("pässwörd\n".encode(), "pässwörd".encode()),
        (b"\xff\xfe\n", b"\xff\xfe"),  # octets as given, not decoded
    ],
)
def test_hash_password_reads_one_line(
    data: bytes, password: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hash_command.hash_from(4, FakeStdin(data), sys.stdout, sys.stderr) == 0
    phc = capsys.readouterr().out.strip()
    assert verify_password(phc, Secret(password))


@pytest.mark.parametrize("data", [b"", b"\n", b"\r\n"])
def test_hash_password_refuses_an_empty_password(
    data: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hash_command.hash_from(4, FakeStdin(data), sys.stdout, sys.stderr) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "empty password" in captured.err


def test_hash_password_refuses_a_huge_password(capsys: pytest.CaptureFixture[str]) -> None:
    data = b"x" * (hash_command.MAX_PASSWORD_BYTES + 1) + b"\n"
    assert hash_command.hash_from(4, FakeStdin(data), sys.stdout, sys.stderr) == 2
    assert "longer than" in capsys.readouterr().err


def test_hash_password_refuses_a_bad_cost() -> None:
    proc = run_popproxy("hash-password", "--ln", "40", stdin=b"pw\n")
    assert proc.returncode == 2
    assert "ln must be" in proc.stderr


def test_hash_password_on_a_tty_asks_twice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["tty-pw", "tty-pw"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert hash_command.hash_from(4, FakeStdin(b"", tty=True), sys.stdout, sys.stderr) == 0
    assert verify_password(capsys.readouterr().out.strip(), Secret.from_str("tty-pw"))


def test_hash_password_on_a_tty_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["one", "two"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert hash_command.hash_from(4, FakeStdin(b"", tty=True), sys.stdout, sys.stderr) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "do not match" in captured.err
