"""Durable delivery into a Maildir (maildir(5)), in the order the crash table needs.

A message is written to ``tmp/NAME`` in chunks, the file fsync'ed and closed; a
batch of such files is made durable with one fsync of ``tmp/``; the store then
records the batch as STAGED (the intent); each file is renamed into ``new/NAME``
and ``new/`` fsync'ed once; then the store records them DELIVERED. After a crash
the STAGED names are found again with :func:`locate` and settled
(docs/gateway.md, "Delivery and the crash table").

Names are deterministic per (source, UIDL, size): ``TIME.GDIGEST.popproxy``, where
TIME is when the store first saw the message (so clients list mail in arrival
order) and DIGEST is a hash of the source and the message's (UIDL, size). Two
deliveries of one message can never take two names, and no two messages share one.

Every function here blocks: the fetcher runs them in worker threads behind a
limiter. Nothing here knows about POP3 or the store.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from popproxy.fsync import fsync_dir

# maildir(5): where messages are written, where new mail appears, where read mail goes.
TMP, NEW, CUR = "tmp", "new", "cur"
# maildir(5): "unique:info"; a client moving a message to cur/ appends ":2,FLAGS".
INFO_SEPARATOR = ":"
# Hex digits of the name's digest: 128 bits, far from any collision, and the whole
# name (about 50 octets) stays a valid UIDL when popproxy serves it (RFC 1939 §7: 70).
NAME_DIGEST_HEX = 32
# A Maildir the gateway creates is private to the user's mail (as Dovecot makes it).
MAILDIR_MODE = 0o700
MESSAGE_MODE = 0o600


class Where(enum.Enum):
    """Where a staged file is after a crash (see :func:`locate`)."""

    TMP = "tmp"  # written and fsync'ed, not yet moved: publish it
    PUBLISHED = "published"  # in new/ or cur/: it was delivered
    NOWHERE = "nowhere"  # neither: fetch it again (docs/gateway.md says why)


class DeliveryError(Exception):
    """A Maildir write failed; ``errno`` says why (ENOSPC, EROFS, EACCES, EDQUOT...)."""

    def __init__(self, what: str, exc: OSError) -> None:
        super().__init__(f"{what}: {exc.strerror or exc}")
        self.errno = exc.errno

    @property
    def disk_full(self) -> bool:
        """Whether the disk or the user's quota is full."""
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


def message_name(first_seen: datetime, source: Sequence[str], *, uid: str, size: int) -> str:
    """The Maildir file name of one upstream message, the same for every delivery of it.

    ``source`` names the source (local user, upstream, upstream user).
    """
    key = "\0".join((*source, uid, str(size))).encode("utf-8")
    digest = hashlib.sha256(key).hexdigest()[:NAME_DIGEST_HEX]
    return f"{int(first_seen.timestamp())}.G{digest}.popproxy"


def ensure_maildir(root: Path) -> None:
    """Create ``root`` with ``tmp/``, ``new/`` and ``cur/`` where missing (mode 0700)."""
    try:
        root.mkdir(mode=MAILDIR_MODE, parents=True, exist_ok=True)
        for sub in (TMP, NEW, CUR):
            (root / sub).mkdir(mode=MAILDIR_MODE, exist_ok=True)
    except OSError as exc:
        raise DeliveryError(f"cannot create the Maildir {root}", exc) from exc


def sync_dir(path: Path) -> None:
    """fsync a directory, so the names created or moved in it survive a crash."""
    try:
        fsync_dir(path)
    except OSError as exc:
        raise DeliveryError(f"cannot sync {path}", exc) from exc


@dataclass(slots=True)
class TmpFile:
    """A message being written to ``tmp/``: open, written in chunks, then fsync'ed."""

    path: Path
    fd: int
    written: int = 0

    @classmethod
    def create(cls, root: Path, name: str) -> TmpFile:
        """Open ``tmp/name`` for writing, replacing what a crashed poll left there."""
        path = root / TMP / name
        try:
            fd = os.open(
                path,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                MESSAGE_MODE,
            )
        except OSError as exc:
            raise DeliveryError(f"cannot create {path}", exc) from exc
        return cls(path, fd)

    def write(self, chunks: Iterable[bytes]) -> None:
        """Append ``chunks`` (the message's octets, as received, un-stuffed)."""
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:  # ends: each write takes at least one octet or raises
                    done = os.write(self.fd, view)
                    view = view[done:]
                    self.written += done
        except OSError as exc:
            self.discard()
            raise DeliveryError(f"cannot write {self.path}", exc) from exc

    def finish(self) -> None:
        """fsync and close: the octets are on disk (the name is not, until tmp/ is synced)."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.discard()
            raise DeliveryError(f"cannot sync {self.path}", exc) from exc
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        """Close and remove the file: nothing half-written stays behind."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # a read-only or vanished tmp/: nothing more can be done here


def publish(root: Path, names: Sequence[str]) -> None:
    """Move each ``tmp/NAME`` to ``new/NAME``, then fsync ``new/`` once (maildir(5)).

    A name already in ``new/`` is replaced by the same message (rename is atomic).
    Raises ``DeliveryError`` at the first failure; the names moved before it stay moved.
    """
    for name in names:
        try:
            os.rename(root / TMP / name, root / NEW / name)
        except OSError as exc:
            raise DeliveryError(f"cannot move {name} into new/", exc) from exc
    if names:
        sync_dir(root / NEW)


def locate(root: Path, names: Iterable[str]) -> dict[str, Where]:
    """Where each staged name is now: in ``tmp/``, in ``new/`` or ``cur/``, or nowhere.

    ``cur/`` is listed once (a client moved the file there with ``:2,FLAGS``).
    """
    wanted = list(names)
    found: dict[str, Where] = {}
    in_cur: set[str] | None = None
    for name in wanted:
        if (root / NEW / name).exists():
            found[name] = Where.PUBLISHED
            continue
        if (root / TMP / name).exists():
            found[name] = Where.TMP
            continue
        if in_cur is None:
            try:
                in_cur = {entry.split(INFO_SEPARATOR, 1)[0] for entry in os.listdir(root / CUR)}
            except FileNotFoundError:
                in_cur = set()
        found[name] = Where.PUBLISHED if name in in_cur else Where.NOWHERE
    return found


def maildir_bytes(root: Path) -> int:
    """The octets of the files in ``new/``, ``cur/`` and ``tmp/`` (a file that vanishes
    while this looks is not counted)."""
    total = 0
    for sub in (NEW, CUR, TMP):
        try:
            with os.scandir(root / sub) as entries:
                for entry in entries:
                    try:
                        if entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            continue
    return total


def discard_tmp(root: Path, name: str) -> None:
    """Remove ``tmp/name`` if it is there (a message that will be fetched again)."""
    try:
        os.unlink(root / TMP / name)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise DeliveryError(f"cannot remove tmp/{name}", exc) from exc
