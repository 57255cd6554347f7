"""The refresh-token file: read at each refresh, rewritten atomically when it rotates.

Blocking (file I/O and fsync): callers run these in a worker thread. The file
holds the token on one line. A rotated token (RFC 6749 §6: "The authorization
server MAY issue a new refresh token") replaces the old one without a moment in
which the file is missing, partial or readable by others: the new content is
written to a temporary file in the same directory, created with mode 0600,
fsync'ed, renamed over the old one, and the directory fsync'ed, so that a crash
leaves either the old token or the new one (and the old one may already be dead
at the provider, which is why the new one must be durable before it is used).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from popproxy.fsync import fsync_dir
from popproxy.secret import Secret

# A refresh token is at most a few KiB (Microsoft's are about 1.5 KiB); more is the wrong file.
MAX_TOKEN_FILE_BYTES = 64 * 1024
TOKEN_FILE_MODE = 0o600


class TokenFileError(Exception):
    """The refresh-token file cannot be read or written; the message names the file and why."""


def read_refresh_token(path: Path) -> Secret:
    """The refresh token in ``path`` (surrounding white space removed)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise TokenFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    token = raw.strip()
    if len(raw) > MAX_TOKEN_FILE_BYTES or not token or b"\n" in token:
        raise TokenFileError(f"{path} does not hold one refresh token")
    return Secret(token)


def write_refresh_token(path: Path, token: Secret) -> None:
    """Replace the content of ``path`` with ``token``: temporary file (0600), fsync, rename,
    directory fsync. The file's owner is whoever runs popproxy."""
    value = token.reveal()
    if not value or b"\n" in value or b"\r" in value:
        raise TokenFileError("refusing to write a refresh token that is empty or has a line break")
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, TOKEN_FILE_MODE)
        try:
            os.fchmod(fd, TOKEN_FILE_MODE)  # whatever the umask
            data = value + b"\n"
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TokenFileError(f"cannot write {path}: {exc.strerror or exc}") from None
