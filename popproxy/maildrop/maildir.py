"""A local Maildir as a ``Maildrop``: the embedded default (maildir(5), RFC 1939).

Messages are the files in ``new/`` and ``cur/`` (``tmp/`` and dotfiles are not
messages). A file holds a message with LF line ends; POP3 sends it with CRLF
(RFC 1939 §3), so every size in the listing is the exact octet count of that CRLF
form, found by scanning the file once (cached process-wide). The UIDL is the
unique part of the file name, the part before the ``:2,FLAGS`` info, so it stays
the same when a message moves from ``new/`` to ``cur/`` or its flags change
(RFC 1939 §7). Files are deleted only by ``commit`` (RFC 1939 §6).

Every file operation runs in ``trio.to_thread.run_sync`` behind a
``trio.CapacityLimiter``; messages are read in chunks and never held whole; the
LF→CRLF and TOP transforms are in ``crlf.py``. A session holds the Maildir's
mailbox lock (``popproxy.locks``) from open to ``aclose``; a second one is refused
at once.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence, Set
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, TypeVar, TypeVarTuple

import trio

from popproxy.fsync import fsync_dir
from popproxy.locks import MailboxLocks, MaildirMailbox, default_locks
from popproxy.maildrop.base import RETRIEVE_CHUNK_BYTES, Committed, MaildropError, MessageInfo
from popproxy.maildrop.crlf import CrlfConverter, TopFilter
from popproxy.pop3.limits import MAX_UIDL_OCTETS
from popproxy.pop3.replies import ResponseCode

# Worker threads doing Maildir file work at once, across all sessions. trio's own
# default thread limiter has 40 tokens; a smaller share keeps a burst of big RETRs
# from crowding out password hashing and state-store work.
MAILDIR_THREADS = 8

# Entries in the process-wide cache of CRLF sizes. One entry is a small tuple
# (~200 octets), so the cache stays near 13 MB at most however many Maildirs are served.
MAX_SIZE_CACHE_ENTRIES = 65_536

# A UIDL made from a file name that is not a valid one (RFC 1939 §7: 1..70 octets in
# 0x21..0x7E): this many hex digits of its sha256, 160 bits, well inside the 70.
HASHED_UID_HEX_CHARS = 40

# maildir(5): the sub-directories that hold messages, in listing order of equal names.
MESSAGE_SUBDIRS = ("cur", "new")

# maildir(5): "unique:info"; the info (":2,FLAGS") changes, the unique part does not.
INFO_SEPARATOR = ":"

# Sizes are found by reading each file once; larger reads than retrieve's chunks, and a
# different chunking from retrieve's, so a boundary bug shows as a size mismatch in tests.
SCAN_CHUNK_BYTES = 1024 * 1024

# retrieve() reads limit - limit/16 raw octets per chunk, so that the CRLF form of a
# chunk whose lines average 16 octets or more still fits in the limit.
READ_HEADROOM_DIVISOR = 16

# Tries at finding a free unique name for a duplicate (each a fresh 32-bit random suffix).
MAX_RENAME_ATTEMPTS = 8

log = logging.getLogger("popproxy.maildrop")

_R = TypeVar("_R")
_Args = TypeVarTuple("_Args")
_LEADING_DIGITS = re.compile(r"[0-9]+")


# -- the size cache -----------------------------------------------------------------------

# (unique name, st_dev, st_ino, st_mtime_ns, st_size): a message file's identity and
# version. The unique name rather than the path, so a new/ -> cur/ move is a cache hit.
_SizeKey = tuple[str, int, int, int, int]


class _SizeCache:
    """A bounded LRU of CRLF sizes, shared by worker threads (hence the lock)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._data: collections.OrderedDict[_SizeKey, int] = collections.OrderedDict()

    def get(self, key: _SizeKey) -> int | None:
        with self._lock:
            size = self._data.get(key)
            if size is not None:
                self._data.move_to_end(key)
            return size

    def put(self, key: _SizeKey, size: int) -> None:
        with self._lock:
            self._data[key] = size
            self._data.move_to_end(key)
            while len(self._data) > self._limit:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


# -- listing (runs in a worker thread) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """One message file as listed at open."""

    subdir: str
    name: str
    unique: str
    mtime_ns: int
    file_size: int
    info: MessageInfo


@dataclass(frozen=True, slots=True)
class _Found:
    subdir: str
    name: str
    unique: str
    key: _SizeKey
    uid: str | None = None  # set only for a duplicate that could not be renamed


def unique_part(name: str) -> str:
    """The unique part of a Maildir file name: everything before the info (maildir(5))."""
    return name.split(INFO_SEPARATOR, 1)[0]


def _is_valid_uid(raw: bytes) -> bool:
    return 1 <= len(raw) <= MAX_UIDL_OCTETS and all(0x21 <= b <= 0x7E for b in raw)


def _hashed_uid(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:HASHED_UID_HEX_CHARS]


def uid_for(unique: str) -> str:
    """The UIDL of a unique name: itself if valid (RFC 1939 §7), else a stable hash of it."""
    raw = os.fsencode(unique)
    return unique if _is_valid_uid(raw) else _hashed_uid(raw)


def _sort_key(found: _Found) -> tuple[int, int, str, str, str]:
    # maildir(5) names start with the delivery time in seconds; names that do not sort last.
    match = _LEADING_DIGITS.match(found.unique)
    stamp = (0, int(match.group())) if match else (1, 0)
    return (*stamp, found.unique, found.subdir, found.name)


def _crlf_size_of(fd: int, chunk_bytes: int) -> int:
    conv = CrlfConverter()
    size = 0
    while chunk := os.read(fd, chunk_bytes):
        size += len(conv.feed(chunk))
    return size + len(conv.finish())


def _scan(root: Path, cache: _SizeCache) -> list[_Entry]:
    """List new/ and cur/, with exact CRLF sizes and unique UIDLs (blocking)."""
    found: list[_Found] = []
    seen_files: set[tuple[int, int]] = set()
    for subdir in MESSAGE_SUBDIRS:
        with os.scandir(root / subdir) as it:
            for de in it:
                if de.name.startswith("."):
                    continue
                try:
                    if not de.is_file():
                        continue
                    st = de.stat()
                except FileNotFoundError:
                    continue  # moved or deleted while we looked: not part of this listing
                if (st.st_dev, st.st_ino) in seen_files:
                    continue  # moved new/ -> cur/ while we listed: seen once already
                seen_files.add((st.st_dev, st.st_ino))
                unique = unique_part(de.name)
                key = (unique, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
                found.append(_Found(subdir, de.name, unique, key))
    found = _separate_duplicates(root, found)
    found.sort(key=_sort_key)
    entries: list[_Entry] = []
    uids: set[str] = set()
    for f in found:
        key = f.key
        size = cache.get(key)
        if size is None:
            try:
                fd = os.open(root / f.subdir / f.name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                # Size and mtime from the open file, so the key matches what was read.
                st = os.fstat(fd)
                size = _crlf_size_of(fd, SCAN_CHUNK_BYTES)
            finally:
                os.close(fd)
            key = (f.unique, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            cache.put(key, size)
        uid = f.uid or uid_for(f.unique)
        if uid in uids:
            # Two files with one unique name (or a hash that matches a real name): keep
            # UIDLs unique in the listing (RFC 1939 §7) with a hash of the full name.
            uid = _hashed_uid(os.fsencode(f"{f.subdir}/{f.name}"))
            while uid in uids:
                uid = _hashed_uid(uid.encode("ascii"))
        uids.add(uid)
        _, _, _, mtime_ns, file_size = key
        info = MessageInfo(uid, size)
        entries.append(_Entry(f.subdir, f.name, f.unique, mtime_ns, file_size, info))
    return entries


def _separate_duplicates(root: Path, found: list[_Found]) -> list[_Found]:
    """Give every message a unique name of its own, as Dovecot does (blocking).

    Two files with one unique name (a restored backup, a copy made by hand) would
    otherwise trade their UIDL as they move between new/ and cur/ or as one of them
    is deleted, and a client would skip one message and fetch another twice
    (RFC 1939 §7; DESIGN.md invariant 3). The file delivered first (oldest mtime,
    then the one in cur/) keeps the name; every other one is renamed in place to a
    new unique name. Where a rename is refused (a read-only Maildir), that file's
    UIDL is a hash of its unique name and inode, which survives renames.
    """
    groups: dict[str, list[_Found]] = collections.defaultdict(list)
    for f in found:
        groups[f.unique].append(f)
    if all(len(group) == 1 for group in groups.values()):
        return found
    taken = set(groups)
    separated: list[_Found] = []
    for group in groups.values():
        group.sort(key=lambda f: (f.key[3], f.subdir != "cur", f.key[2]))
        separated.append(group[0])
        separated.extend(_rename_duplicate(root, dup, taken) for dup in group[1:])
    return separated


def _rename_duplicate(root: Path, dup: _Found, taken: set[str]) -> _Found:
    unique, dev, ino, mtime_ns, file_size = dup.key
    info = dup.name[len(dup.unique) :]
    source = root / dup.subdir / dup.name
    for _ in range(MAX_RENAME_ATTEMPTS):
        new_unique = f"{unique}.R{secrets.token_hex(4)}"
        if new_unique in taken:
            continue
        try:
            os.link(source, root / dup.subdir / (new_unique + info))  # never overwrites
        except FileExistsError:
            continue
        except OSError:
            break
        with contextlib.suppress(OSError):  # else two names, one inode: listed once, by inode
            os.unlink(source)
        taken.add(new_unique)
        log.warning("maildir_duplicate_renamed", extra={"fields": {"unique": unique}})
        return _Found(
            dup.subdir, new_unique + info, new_unique, (new_unique, dev, ino, mtime_ns, file_size)
        )
    log.warning("maildir_duplicate_not_renamed", extra={"fields": {"unique": unique}})
    return replace(dup, uid=_hashed_uid(os.fsencode(f"{unique}\0{dev}:{ino}")))


def _resolve(path: Path) -> Path:
    """The Maildir's real path; ``MaildropError`` if it is not a Maildir (blocking)."""
    try:
        root = path.resolve(strict=True)
        if all((root / sub).is_dir() for sub in MESSAGE_SUBDIRS):
            return root
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MaildropError(ResponseCode.SYS_TEMP, "the maildrop cannot be opened") from exc
    raise MaildropError(ResponseCode.SYS_PERM, "the maildrop does not exist")


def _relocate(root: Path, entry: _Entry) -> Path | None:
    """Where a message moved to (another program renamed it: new/ -> cur/, flags)."""
    for subdir in MESSAGE_SUBDIRS:
        try:
            with os.scandir(root / subdir) as it:
                for de in it:
                    if de.name.startswith(".") or unique_part(de.name) != entry.unique:
                        continue
                    try:
                        st = de.stat()
                    except FileNotFoundError:
                        continue  # moving on again; looked for in the next directory
                    if (st.st_size, st.st_mtime_ns) == (entry.file_size, entry.mtime_ns):
                        return Path(de.path)
        except FileNotFoundError:
            continue
    return None


def _open_entry(root: Path, entry: _Entry, number: int) -> int:
    """Open a listed message for reading; it must be the file that was listed (blocking)."""
    try:
        try:
            fd = os.open(root / entry.subdir / entry.name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            moved = _relocate(root, entry)
            if moved is None:
                raise
            fd = os.open(moved, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise MaildropError(
            ResponseCode.SYS_TEMP, f"message {number} is no longer in the maildrop"
        ) from exc
    except OSError as exc:
        raise MaildropError(ResponseCode.SYS_TEMP, f"message {number} cannot be read") from exc
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise MaildropError(ResponseCode.SYS_TEMP, f"message {number} cannot be read") from exc
    if (st.st_size, st.st_mtime_ns) != (entry.file_size, entry.mtime_ns):
        os.close(fd)
        raise MaildropError(ResponseCode.SYS_TEMP, f"message {number} changed since login")
    return fd


def _read_converted(fd: int, conv: CrlfConverter, nbytes: int, number: int) -> tuple[bytes, bool]:
    """Read and convert the next chunk: (CRLF output, end of file) (blocking)."""
    try:
        raw = os.read(fd, nbytes)
    except OSError as exc:
        raise MaildropError(ResponseCode.SYS_TEMP, f"message {number} cannot be read") from exc
    if raw:
        return conv.feed(raw), False
    return conv.finish(), True


def _delete_entries(root: Path, entries: Iterable[_Entry]) -> int:
    """Unlink the files, then fsync the directories; the number of failures (blocking)."""
    failed = 0
    touched: set[str] = set()
    for entry in entries:
        path: Path | None
        try:
            os.unlink(root / entry.subdir / entry.name)
            touched.add(entry.subdir)
            continue
        except FileNotFoundError:
            path = _relocate(root, entry)
        except OSError:
            failed += 1
            continue
        if path is None:
            continue  # already gone: the deletion wanted is done
        try:
            os.unlink(path)
            touched.add(path.parent.name)
        except FileNotFoundError:
            pass
        except OSError:
            failed += 1
    for subdir in sorted(touched):
        try:
            fsync_dir(root / subdir)  # make the unlinks durable before the client hears +OK
        except OSError:
            failed += 1
    return failed


# -- the maildrop ---------------------------------------------------------------------------

_DEFAULT_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "popproxy_maildir_limiter"
)


def default_limiter() -> trio.CapacityLimiter:
    """The limiter shared by every Maildir in this trio run (``MAILDIR_THREADS`` tokens)."""
    try:
        return _DEFAULT_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(MAILDIR_THREADS)
        _DEFAULT_LIMITER.set(limiter)
        return limiter


class MaildirMaildrop:
    """A Maildir opened for one POP3 session (RFC 1939 §4: an exclusive-access lock).

    Made by ``open_maildir``; holds the listing taken at open and the lock until
    ``aclose``.
    """

    # CRLF sizes by file identity, shared by every session in the process.
    size_cache: ClassVar[_SizeCache] = _SizeCache(MAX_SIZE_CACHE_ENTRIES)
    # Chunks are message content; the session dot-stuffs them. Nothing times out.
    dot_stuffed: ClassVar[bool] = False
    keepalive_interval_seconds: ClassVar[float | None] = None
    # RFC 2449 §6.7: a local Maildir is never pruned by the server on its own.
    expire: ClassVar[str] = "NEVER"

    def __init__(
        self,
        root: Path,
        entries: Sequence[_Entry],
        *,
        limiter: trio.CapacityLimiter,
        chunk_bytes: int,
        release: Callable[[], Awaitable[object]],
    ) -> None:
        self._root = root
        self._release = release  # the maildrop lock
        self._entries = tuple(entries)
        self._messages = tuple(e.info for e in self._entries)
        self._limiter = limiter
        self._chunk_bytes = chunk_bytes
        self._closed = False

    @property
    def root(self) -> Path:
        """The resolved path of the Maildir."""
        return self._root

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The listing taken at open; index ``i`` is message number ``i + 1`` (RFC 1939 §5)."""
        return self._messages

    def retrieve(self, index: int, *, body_lines: int | None = None) -> AsyncGenerator[bytes, None]:
        """Stream message ``index`` in CRLF form (RFC 1939 §5 RETR), or its top (§7 TOP).

        Chunks have at most the chunk size (``RETRIEVE_CHUNK_BYTES`` by default). The
        whole message is exactly ``messages[index].size`` octets. ``MaildropError``
        (``[SYS/TEMP]``) if the file vanished or changed since the listing.
        """
        self._check_open()
        if not 0 <= index < len(self._entries):
            raise IndexError(f"no message at index {index}")
        if body_lines is not None and body_lines < 0:
            raise ValueError("body_lines must be >= 0")
        return self._stream(index, body_lines)

    async def _stream(self, index: int, body_lines: int | None) -> AsyncGenerator[bytes, None]:
        entry = self._entries[index]
        number = index + 1
        fd = await self._run(_open_entry, self._root, entry, number)
        try:
            conv = CrlfConverter()
            top = None if body_lines is None else TopFilter(body_lines)
            limit = self._chunk_bytes
            # LF -> CRLF grows a chunk; reading a little less than the limit lets most
            # chunks of ordinary mail (lines of 16 octets or more) pass on uncopied.
            read_bytes = max(1, limit - limit // READ_HEADROOM_DIVISOR)
            produced = 0
            while True:
                out, eof = await self._run(_read_converted, fd, conv, read_bytes, number)
                if top is not None:
                    out = top.feed(out)
                    eof = eof or top.done
                produced += len(out)
                if top is None and (
                    produced > entry.info.size or (eof and produced != entry.info.size)
                ):
                    raise MaildropError(
                        ResponseCode.SYS_TEMP, f"message {number} changed while being read"
                    )
                for start in range(0, len(out), limit):
                    yield out if len(out) <= limit else out[start : start + limit]
                if eof:
                    return
        finally:
            os.close(fd)  # closing a regular file does not block

    async def keep_alive(self) -> None:
        """Nothing to keep alive in a local Maildir."""
        await trio.lowlevel.checkpoint()

    async def commit(self, deleted: Set[int]) -> Committed:
        """Delete the files of these message indexes, then fsync (RFC 1939 §6 UPDATE).

        Files already gone count as deleted. ``MaildropError`` (``[SYS/TEMP]``) if
        some could not be removed or the removal could not be made durable.
        """
        self._check_open()
        entries = [self._entries[i] for i in sorted(deleted)]
        if not entries:
            await trio.lowlevel.checkpoint()
            return Committed()
        failed = await self._run(_delete_entries, self._root, entries)
        if failed:
            raise MaildropError(ResponseCode.SYS_TEMP, "some deleted messages were not removed")
        return Committed(deleted_local=len(entries))

    async def aclose(self) -> None:
        """Release the maildrop lock; never deletes anything. Idempotent."""
        if not self._closed:
            self._closed = True
            with trio.CancelScope(shield=True):
                await self._release()
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the maildrop is closed")

    async def _run(self, fn: Callable[[*_Args], _R], *args: *_Args) -> _R:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)


async def open_maildir(
    path: Path,
    *,
    locks: MailboxLocks | None = None,
    limiter: trio.CapacityLimiter | None = None,
    chunk_bytes: int = RETRIEVE_CHUNK_BYTES,
) -> MaildirMaildrop:
    """Open a Maildir for one POP3 session: lock it and take the listing (RFC 1939 §4).

    ``MaildropInUse`` (``[IN-USE]``, RFC 2449 §8.1.1) at once if ``locks`` (default:
    ``default_locks()``) has it held already; ``MaildropError`` if it is not a Maildir
    or cannot be read. File work runs in worker threads behind ``limiter`` (default:
    ``default_limiter()``). ``chunk_bytes`` bounds reads and retrieved chunks (tests
    use small values).
    """
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    if limiter is None:
        limiter = default_limiter()
    if locks is None:
        locks = default_locks()
    root = await trio.to_thread.run_sync(_resolve, path, limiter=limiter)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(locks.hold(MaildirMailbox(root), wait_seconds=0))
        try:
            entries = await trio.to_thread.run_sync(
                _scan, root, MaildirMaildrop.size_cache, limiter=limiter
            )
        except OSError as exc:
            raise MaildropError(ResponseCode.SYS_TEMP, "the maildrop cannot be read") from exc
        # The lock passes to the maildrop, which releases it at aclose.
        release = stack.pop_all().aclose
    return MaildirMaildrop(root, entries, limiter=limiter, chunk_bytes=chunk_bytes, release=release)
