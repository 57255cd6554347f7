"""``popproxy hash-password``: read a password and print its scrypt PHC hash, for
``users.NAME.password_hash`` (docs/configuration.md)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TextIO

from popproxy.auth.passwords import (
    DEFAULT_SCRYPT_LN,
    MAX_SCRYPT_LN,
    PasswordHashError,
    hash_password,
)
from popproxy.commands.common import EXIT_OK, EXIT_USAGE, Subcommands
from popproxy.secret import Secret

# A password read by hash-password: longer than any POP3 PASS line (RFC 2449 §4, 255
# octets) or AUTH PLAIN response could carry is a mistake (a whole file piped in).
MAX_PASSWORD_BYTES = 1024


def add_parser(commands: Subcommands) -> None:
    """Declare ``popproxy hash-password`` and its options."""
    hashpw = commands.add_parser(
        "hash-password",
        help="hash a password for users.NAME.password_hash",
        description=(
            "Read a password (one line from standard input when it is not a terminal,"
            " else asked twice) and print its scrypt PHC hash on one line."
        ),
    )
    hashpw.add_argument(
        "--ln",
        type=int,
        default=DEFAULT_SCRYPT_LN,
        metavar="N",
        help=f"scrypt cost: N = 2**ln (default: {DEFAULT_SCRYPT_LN}, at most {MAX_SCRYPT_LN})",
    )


def run(args: argparse.Namespace) -> int:
    """Hash the password read from this process's standard input or terminal."""
    return hash_from(args.ln, sys.stdin, sys.stdout, sys.stderr)


def hash_from(ln: int, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Read the password (asked twice on a terminal, else one line of ``stdin``, its
    octets as given), print its hash to ``stdout``; return the exit code."""
    if stdin.isatty():
        first = getpass.getpass("Password: ").encode("utf-8")
        second = getpass.getpass("Again: ").encode("utf-8")
        if first != second:
            print("popproxy: the passwords do not match", file=stderr)
            return EXIT_USAGE
        raw = first
    else:
        # The octets as given, so a non-UTF-8 password hashes as the client will send it.
        source = getattr(stdin, "buffer", None)
        line = (
            source.readline(MAX_PASSWORD_BYTES + 2)
            if source is not None
            else stdin.readline(MAX_PASSWORD_BYTES + 2).encode("utf-8")
        )
        raw = line.removesuffix(b"\n").removesuffix(b"\r")
        if len(raw) > MAX_PASSWORD_BYTES:
            print(
                f"popproxy: the password is longer than {MAX_PASSWORD_BYTES} octets",
                file=stderr,
            )
            return EXIT_USAGE
    if not raw:
        print("popproxy: refusing to hash an empty password", file=stderr)
        return EXIT_USAGE
    try:
        phc = hash_password(Secret(raw), ln=ln)
    except PasswordHashError as exc:
        print(f"popproxy: {exc}", file=stderr)
        return EXIT_USAGE
    print(phc, file=stdout)
    return EXIT_OK
