"""The Maildir maildrop: exact CRLF sizes, streaming RETR/TOP, UIDLs, locking, commit.

References here are written independently of the implementation (a regex over the
whole message held in memory), so a shared bug cannot hide.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from maildirs import make_maildir

from popproxy.maildrop import (
    RETRIEVE_CHUNK_BYTES,
    Maildrop,
    MaildropError,
    MaildropInUse,
)
from popproxy.maildrop import maildir as maildir_module
from popproxy.maildrop.maildir import MaildirMaildrop, open_maildir, unique_part
from popproxy.pop3.replies import ResponseCode

UIDL_RE = re.compile(rb"[\x21-\x7e]{1,70}")

# -- references -----------------------------------------------------------------------------


def ref_crlf(data: bytes) -> bytes:
    """RFC 1939 §3 form: bare LF -> CRLF, CRLF stays, a final CRLF if missing."""
    out = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    return out if out.endswith(b"\r\n") else out + b"\r\n"


def ref_top(data: bytes, body_lines: int) -> bytes:
    """RFC 1939 §7 TOP: header, blank line, then `body_lines` lines; no blank line: all."""
    lines = re.findall(rb".*?\r\n", ref_crlf(data), re.DOTALL)
    if b"\r\n" not in lines:
        return b"".join(lines)
    blank = lines.index(b"\r\n")
    return b"".join(lines[: blank + 1 + body_lines])


# -- helpers --------------------------------------------------------------------------------

_names = itertools.count(1)


def deliver(root: Path, data: bytes, *, subdir: str = "new", name: str | None = None) -> Path:
    """Write a message file; names get increasing timestamps in call order."""
    if name is None:
        n = next(_names)
        name = f"{1_700_000_000 + n}.M{n}P1.test" + (":2,S" if subdir == "cur" else "")
    path = root / subdir / name
    path.write_bytes(data)
    return path


async def chunks_of(md: Maildrop, index: int, body_lines: int | None = None) -> list[bytes]:
    return [chunk async for chunk in md.retrieve(index, body_lines=body_lines)]


async def read_all(md: Maildrop, index: int, body_lines: int | None = None) -> bytes:
    return b"".join(await chunks_of(md, index, body_lines))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_maildir(tmp_path / "Maildir")


@pytest.fixture
async def opened(root: Path) -> AsyncIterator[list[MaildirMaildrop]]:
    """Maildrops a test opened, closed at the end even when the test fails."""
    drops: list[MaildirMaildrop] = []
    yield drops
    for md in drops:
        await md.aclose()


async def open_(root: Path, opened: list[MaildirMaildrop], **kw: int) -> MaildirMaildrop:
    md = await open_maildir(root, **kw)  # type: ignore[arg-type]
    opened.append(md)
    return md


HEAD = b"From: a@example.org\nSubject: test\n\n"
LONG_LINE = bytes(i % 26 + 0x61 for i in range(12_345))
CONTENTS = {
    "plain": HEAD + b"Hello,\nthis is a body.\n",
    "mixed-lf-crlf": b"From: a\r\nSubject: x\n\r\nline one\r\nline two\nthree\r\n\n",
    "no-final-newline": HEAD + b"last line without newline",
    "dots": HEAD + b".\n..\n.leading\n...\n.\n",
    "8bit": HEAD + "Grüße, 日本語, €\n".encode() + b"\xff\xfe\x80 raw\n",
    "long-line": HEAD + LONG_LINE + b"\n." + LONG_LINE + b"\n",
    "empty-file": b"",
    "only-lf": b"\n",
    "only-crlf": b"\r\n",
    "bare-cr": HEAD + b"a\rb\r\rc\n",
    "trailing-cr": HEAD + b"ends with CR\r",
    "cr-cr-lf": b"a\r\r\nb\r\r\r\n",
    "lf-runs": b"\n\n\n\r\n\n\r\n\r\n",
}
# 1..9 put a chunk boundary everywhere in the short messages, CR|LF splits included.
CHUNK_SIZES = [1, 2, 3, 4, 5, 7, 9, 64, RETRIEVE_CHUNK_BYTES]


# -- sizes and content ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", CHUNK_SIZES)
async def test_size_equals_retrieved_octets(
    root: Path, opened: list[MaildirMaildrop], chunk_bytes: int
) -> None:
    for data in CONTENTS.values():
        deliver(root, data)
    md = await open_(root, opened, chunk_bytes=chunk_bytes)
    assert len(md.messages) == len(CONTENTS)
    for i, (kind, data) in enumerate(CONTENTS.items()):
        chunks = await chunks_of(md, i)
        got = b"".join(chunks)
        assert got == ref_crlf(data), kind
        assert md.messages[i].size == len(got), kind
        assert got.endswith(b"\r\n")
        assert all(0 < len(c) <= chunk_bytes for c in chunks), kind


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 4])
async def test_crlf_split_across_chunks_stays_crlf(
    root: Path, opened: list[MaildirMaildrop], chunk_bytes: int
) -> None:
    # A CR at the end of one read and its LF at the start of the next: one CRLF, not CR CR LF.
    data = b"a\r\nbc\r\nd\r\r\ne\nf"
    for shift in range(4):
        deliver(root, b"x" * shift + data)
    md = await open_(root, opened, chunk_bytes=chunk_bytes)
    for i in range(4):
        got = await read_all(md, i)
        assert got == b"x" * i + b"a\r\nbc\r\nd\r\r\ne\r\nf\r\n"
        assert md.messages[i].size == len(got)


# Content that is mostly line-end trouble: CR, LF, CRLF, dots, 8-bit, plus plain text.
trouble = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\xff", b"\n\n", b"\r\r"]), max_size=60
).map(b"".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(trouble, st.binary(max_size=300)),
    chunk_bytes=st.integers(min_value=1, max_value=40),
    body_lines=st.integers(min_value=0, max_value=6),
)
async def test_any_content_size_and_bytes_match_reference(
    data: bytes, chunk_bytes: int, body_lines: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_maildir(Path(tmp) / "Maildir")
        deliver(root, data)
        md = await open_maildir(root, chunk_bytes=chunk_bytes)
        try:
            chunks = await chunks_of(md, 0)
            assert md.messages[0].size == len(b"".join(chunks))
            assert b"".join(chunks) == ref_crlf(data)
            assert all(0 < len(c) <= chunk_bytes for c in chunks)
            top = await chunks_of(md, 0, body_lines)
            assert b"".join(top) == ref_top(data, body_lines)
            assert all(0 < len(c) <= chunk_bytes for c in top)
        finally:
            await md.aclose()


# -- TOP ------------------------------------------------------------------------------------

MESSAGE = b"From: a\nSubject: top\n\nline 1\nline 2\n\nline 4\n"


@pytest.mark.parametrize(
    ("body_lines", "expected"),
    [
        (0, b"From: a\r\nSubject: top\r\n\r\n"),
        (1, b"From: a\r\nSubject: top\r\n\r\nline 1\r\n"),
        (3, b"From: a\r\nSubject: top\r\n\r\nline 1\r\nline 2\r\n\r\n"),
        (4, b"From: a\r\nSubject: top\r\n\r\nline 1\r\nline 2\r\n\r\nline 4\r\n"),
        (1000, b"From: a\r\nSubject: top\r\n\r\nline 1\r\nline 2\r\n\r\nline 4\r\n"),
    ],
)
@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, RETRIEVE_CHUNK_BYTES])
async def test_top(
    root: Path,
    opened: list[MaildirMaildrop],
    body_lines: int,
    expected: bytes,
    chunk_bytes: int,
) -> None:
    deliver(root, MESSAGE)
    md = await open_(root, opened, chunk_bytes=chunk_bytes)
    assert await read_all(md, 0, body_lines) == expected == ref_top(MESSAGE, body_lines)


@pytest.mark.parametrize(
    "case",
    [
        # Header and blank line only: there is no body to count.
        (b"From: a\nSubject: b\n\n", 0, b"From: a\r\nSubject: b\r\n\r\n"),
        (b"From: a\nSubject: b\n\n", 5, b"From: a\r\nSubject: b\r\n\r\n"),
        # No blank line at all: the whole message is header.
        (b"From: a\nSubject: b\n", 0, b"From: a\r\nSubject: b\r\n"),
        (b"From: a\nSubject: b", 3, b"From: a\r\nSubject: b\r\n"),
        # A blank first line: an empty header.
        (b"\nbody 1\nbody 2\n", 1, b"\r\nbody 1\r\n"),
        # The last body line has no newline: it still counts, with its CRLF added.
        (b"H: v\n\nonly line", 1, b"H: v\r\n\r\nonly line\r\n"),
        (b"H: v\n\nonly line", 0, b"H: v\r\n\r\n"),
        # CRLF in the file, and a blank line written CRLF after LF lines.
        (b"H: v\r\n\r\nb1\r\nb2\r\n", 1, b"H: v\r\n\r\nb1\r\n"),
        (b"H: v\n\r\nb1\n", 0, b"H: v\r\n\r\n"),
        # A line of just CR is not blank.
        (b"H: v\n\r\nb1\n", 0, b"H: v\r\n\r\n"),
        (b"H: v\n\r\r\nb1\n\nb2\n", 0, b"H: v\r\n\r\r\nb1\r\n\r\n"),
        (b"", 0, b"\r\n"),
    ],
)
@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, RETRIEVE_CHUNK_BYTES])
async def test_top_edge_cases(
    root: Path, opened: list[MaildirMaildrop], case: tuple[bytes, int, bytes], chunk_bytes: int
) -> None:
    data, body_lines, expected = case
    deliver(root, data)
    md = await open_(root, opened, chunk_bytes=chunk_bytes)
    assert await read_all(md, 0, body_lines) == expected == ref_top(data, body_lines)


async def test_top_stops_reading_early(
    root: Path, opened: list[MaildirMaildrop], monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver(root, HEAD + b"x\n" * 100_000)
    md = await open_(root, opened, chunk_bytes=1024)
    reads = 0
    real = maildir_module._read_converted

    def counting(*args: Any) -> tuple[bytes, bool]:
        nonlocal reads
        reads += 1
        return real(*args)

    monkeypatch.setattr(maildir_module, "_read_converted", counting)
    chunks = await chunks_of(md, 0, 2)
    assert b"".join(chunks) == ref_crlf(HEAD) + b"x\r\nx\r\n"
    assert reads == 1  # header and two lines fit in the first 1024 octets; 200 KB are not read


async def test_retrieve_rejects_bad_arguments(root: Path, opened: list[MaildirMaildrop]) -> None:
    deliver(root, b"x\n")
    md = await open_(root, opened)
    with pytest.raises(IndexError):
        md.retrieve(1)
    with pytest.raises(IndexError):
        md.retrieve(-1)
    with pytest.raises(ValueError, match="body_lines"):
        md.retrieve(0, body_lines=-1)


# -- UIDLs and order ------------------------------------------------------------------------


async def listing(root: Path) -> list[tuple[str, int]]:
    md = await open_maildir(root)
    try:
        return [(m.uid, m.size) for m in md.messages]
    finally:
        await md.aclose()


async def test_uidl_is_the_unique_name_and_stable_across_moves_and_flags(root: Path) -> None:
    a = deliver(root, b"A\n", name="1700000001.M1P1.host")
    deliver(root, b"BB\n", name="1700000002.M2P1.host")
    c = deliver(root, b"CCC\n", subdir="cur", name="1700000003.M3P1.host:2,")
    before = await listing(root)
    assert [uid for uid, _ in before] == [
        "1700000001.M1P1.host",
        "1700000002.M2P1.host",
        "1700000003.M3P1.host",
    ]
    # A mail reader moves a message new/ -> cur/ and changes flags on another.
    a.rename(root / "cur" / "1700000001.M1P1.host:2,S")
    c.rename(root / "cur" / "1700000003.M3P1.host:2,RS")
    assert await listing(root) == before


async def test_listing_sorted_by_delivery_time_then_name(root: Path) -> None:
    deliver(root, b"x\n", name="1700000000.M2P1.host")
    deliver(root, b"x\n", subdir="cur", name="999999999.M1P1.host:2,S")  # 9 digits: older
    deliver(root, b"x\n", name="1700000000.M1P1.host")
    deliver(root, b"x\n", name="not-a-timestamp")
    deliver(root, b"x\n", subdir="cur", name="1600000000.M9P1.host:2,")
    uids = [uid for uid, _ in await listing(root)]
    assert uids == [
        "999999999.M1P1.host",
        "1600000000.M9P1.host",
        "1700000000.M1P1.host",
        "1700000000.M2P1.host",
        "not-a-timestamp",
    ]


async def test_dotfiles_tmp_and_directories_are_not_messages(root: Path) -> None:
    deliver(root, b"real\n", name="1700000001.M1P1.host")
    deliver(root, b"x\n", name=".hidden")
    deliver(root, b"x\n", subdir="cur", name=".gitkeep")
    deliver(root, b"x\n", subdir="tmp", name="1700000002.M2P1.host")
    (root / "cur" / "1700000003.M3P1.host:2,").mkdir()
    assert await listing(root) == [("1700000001.M1P1.host", 6)]


async def test_uidl_valid_and_unique_for_long_and_odd_names(root: Path) -> None:
    odd = [
        "1700000001." + "x" * 100,  # longer than 70 octets
        "1700000002.with space",
        "1700000003.caf\u00e9",  # non-ASCII
        "1700000004.tab\there",
        "1700000005." + "y" * 59,  # exactly 70: kept as is
    ]
    for name in odd:
        deliver(root, b"m\n", name=name)
    # A name that is not valid UTF-8 (os.fsdecode keeps it as surrogate escapes).
    deliver(root, b"m\n", name=os.fsdecode(b"1700000006.\xff\xfe"))
    # Two files with one unique name (new/ and cur/): still two distinct UIDLs.
    deliver(root, b"m\n", name="1700000007.dup")
    deliver(root, b"m\n", subdir="cur", name="1700000007.dup:2,S")
    first = await listing(root)
    uids = [uid for uid, _ in first]
    assert len(uids) == 8
    assert len(set(uids)) == 8
    for uid in uids:
        assert UIDL_RE.fullmatch(uid.encode("ascii")), uid
    assert "1700000005." + "y" * 59 in uids
    assert "1700000007.dup" in uids
    assert not any(" " in u or "\t" in u for u in uids)
    assert await listing(root) == first  # stable


async def test_hashed_uidl_stable_across_moves(root: Path) -> None:
    long = "1700000001." + "z" * 80
    p = deliver(root, b"m\n", name=long)
    (before,) = await listing(root)
    p.rename(root / "cur" / (long + ":2,S"))
    assert await listing(root) == [before]
    assert before[0] == maildir_module.uid_for(long)


# -- locking --------------------------------------------------------------------------------


async def test_second_open_is_in_use_until_aclose(root: Path, tmp_path: Path) -> None:
    md = await open_maildir(root)
    try:
        with pytest.raises(MaildropInUse) as info:
            await open_maildir(root)
        assert info.value.code is ResponseCode.IN_USE
        assert info.value.text == "mailbox is locked by another session"
        assert str(info.value) == "[IN-USE] mailbox is locked by another session"
        # The same Maildir by another path is the same maildrop.
        (tmp_path / "link").symlink_to(root)
        with pytest.raises(MaildropInUse):
            await open_maildir(tmp_path / "link" / ".." / "link")
    finally:
        await md.aclose()
    await md.aclose()  # idempotent
    again = await open_maildir(root)
    await again.aclose()


async def test_not_a_maildir(tmp_path: Path) -> None:
    with pytest.raises(MaildropError) as info:
        await open_maildir(tmp_path / "missing")
    assert info.value.code is ResponseCode.SYS_PERM
    (tmp_path / "half" / "cur").mkdir(parents=True)
    with pytest.raises(MaildropError):
        await open_maildir(tmp_path / "half")
    # A failed open holds no lock.
    (tmp_path / "half" / "new").mkdir()
    md = await open_maildir(tmp_path / "half")
    await md.aclose()


# -- commit and aclose ----------------------------------------------------------------------


async def test_commit_deletes_exactly_the_set(root: Path) -> None:
    paths = [deliver(root, b"%d\n" % i, subdir="cur" if i % 2 else "new") for i in range(6)]
    md = await open_maildir(root)
    try:
        await md.commit({1, 4})
    finally:
        await md.aclose()
    assert [p.exists() for p in paths] == [True, False, True, True, False, True]


async def test_aclose_deletes_nothing(root: Path) -> None:
    paths = [deliver(root, b"x\n") for _ in range(3)]
    md = await open_maildir(root)
    await md.aclose()
    assert all(p.exists() for p in paths)


async def test_commit_tolerates_missing_and_follows_moved_files(root: Path) -> None:
    gone = deliver(root, b"gone\n")
    moved = deliver(root, b"moved\n")
    kept = deliver(root, b"kept\n")
    md = await open_maildir(root)
    try:
        gone.unlink()  # another program deleted it: the deletion wanted is done
        moved_to = root / "cur" / (moved.name + ":2,S")
        moved.rename(moved_to)  # a mail reader marked it seen
        await md.commit({0, 1})
        await md.commit(set())
    finally:
        await md.aclose()
    assert not moved_to.exists()
    assert kept.exists()


async def test_commit_failure_is_a_maildrop_error(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver(root, b"x\n")

    def refuse(path: object) -> None:
        raise PermissionError(13, "refused")

    md = await open_maildir(root)
    try:
        monkeypatch.setattr(os, "unlink", refuse)
        with pytest.raises(MaildropError) as info:
            await md.commit({0})
        monkeypatch.undo()
        assert info.value.code is ResponseCode.SYS_TEMP
        assert len(list((root / "new").iterdir())) == 1  # nothing was removed
    finally:
        await md.aclose()


# -- files that change under us ------------------------------------------------------------


async def test_vanished_file_is_a_maildrop_error(root: Path, opened: list[MaildirMaildrop]) -> None:
    path = deliver(root, HEAD + b"body\n")
    md = await open_(root, opened)
    path.unlink()
    for body_lines in (None, 0):
        with pytest.raises(MaildropError) as info:
            await read_all(md, 0, body_lines)
        assert info.value.code is ResponseCode.SYS_TEMP
        assert "message 1" in info.value.text
        assert str(root) not in info.value.text  # no paths to the client


async def test_moved_file_is_still_retrieved(root: Path, opened: list[MaildirMaildrop]) -> None:
    path = deliver(root, HEAD + b"body\n")
    md = await open_(root, opened)
    path.rename(root / "cur" / (path.name + ":2,S"))
    assert await read_all(md, 0) == ref_crlf(HEAD + b"body\n")


async def test_changed_file_is_a_maildrop_error(root: Path, opened: list[MaildirMaildrop]) -> None:
    path = deliver(root, HEAD + b"body\n")
    md = await open_(root, opened)
    path.write_bytes(HEAD + b"a longer body than before\n")
    with pytest.raises(MaildropError) as info:
        await read_all(md, 0)
    assert info.value.code is ResponseCode.SYS_TEMP


# -- the size cache -------------------------------------------------------------------------


async def test_sizes_are_cached_across_opens_and_moves(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scans = 0
    real = maildir_module._crlf_size_of

    def counting(fd: int, chunk_bytes: int) -> int:
        nonlocal scans
        scans += 1
        return real(fd, chunk_bytes)

    monkeypatch.setattr(maildir_module, "_crlf_size_of", counting)
    path = deliver(root, b"a\nb\n")
    first = await listing(root)
    assert scans == 1
    path.rename(root / "cur" / (path.name + ":2,S"))
    assert await listing(root) == first
    assert scans == 1
    # A new version of the file (other size) is scanned again.
    (root / "cur" / (path.name + ":2,S")).write_bytes(b"a\nb\nc\n")
    assert await listing(root) == [(first[0][0], 9)]
    assert scans == 2


def test_size_cache_is_bounded() -> None:
    cache = maildir_module._SizeCache(2)
    cache.put(("a", 0, 1, 0, 0), 1)
    cache.put(("b", 0, 2, 0, 0), 2)
    assert cache.get(("a", 0, 1, 0, 0)) == 1  # now most recently used
    cache.put(("c", 0, 3, 0, 0), 3)
    assert len(cache) == 2
    assert cache.get(("b", 0, 2, 0, 0)) is None
    assert cache.get(("a", 0, 1, 0, 0)) == 1
    assert maildir_module.MAX_SIZE_CACHE_ENTRIES > 0


# -- threads --------------------------------------------------------------------------------


async def test_uses_the_given_limiter(root: Path) -> None:
    deliver(root, HEAD + b"body\n")
    limiter = trio.CapacityLimiter(1)
    md = await open_maildir(root, limiter=limiter)
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await read_all(md, 0))

    try:
        async with trio.open_nursery() as nursery, limiter:
            # The only token is taken: reading must wait for it, not go around it.
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert limiter.statistics().tasks_waiting == 1
            assert got == []
        assert got == [ref_crlf(HEAD + b"body\n")]
    finally:
        await md.aclose()


# -- streaming a big message ----------------------------------------------------------------

BIG_BYTES = 50 * 1024 * 1024


@pytest.mark.slow
async def test_50mb_message_streams_in_bounded_chunks(root: Path) -> None:
    block = b"".join(b".line %06d of a big message\n" % i for i in range(4096))
    path = root / "new" / "1700000001.M1P1.big"
    with path.open("wb") as f:
        written = 0
        while written < BIG_BYTES:
            f.write(block)
            written += len(block)
    lf_count = block.count(b"\n") * (written // len(block))
    md = await open_maildir(root)
    try:
        assert md.messages[0].size == written + lf_count
        total = 0
        largest = 0
        async for chunk in md.retrieve(0):
            total += len(chunk)
            largest = max(largest, len(chunk))
        assert largest <= RETRIEVE_CHUNK_BYTES
        assert total == md.messages[0].size
    finally:
        await md.aclose()


def _unique_names(root: Path) -> list[str]:
    return sorted(unique_part(p.name) for sub in ("new", "cur") for p in (root / sub).iterdir())


async def test_duplicate_unique_names_are_renamed_apart_and_the_oldest_keeps_its_uidl(
    root: Path,
) -> None:
    older = deliver(root, b"Subject: A\n\nold\n", subdir="cur", name="1700000008.dup:2,S")
    os.utime(older, ns=(1_700_000_008_000_000_000, 1_700_000_008_000_000_000))
    deliver(root, b"Subject: B\n\nnew\n", name="1700000008.dup")
    first = await listing(root)
    names = _unique_names(root)
    assert len(names) == len(set(names)) == 2  # renamed on disk, as Dovecot does
    assert (root / "cur" / "1700000008.dup:2,S").read_bytes() == b"Subject: A\n\nold\n"
    renamed = next(p for p in (root / "new").iterdir())
    assert renamed.name.startswith("1700000008.dup.R")
    assert renamed.read_bytes() == b"Subject: B\n\nnew\n"
    # The UIDLs now stay with their content whatever happens to either file.
    renamed.rename(root / "cur" / (renamed.name + ":2,"))
    assert await listing(root) == first
    older.unlink()
    assert [uid for uid, _ in await listing(root)] == [unique_part(renamed.name)]


async def test_a_duplicate_that_cannot_be_renamed_gets_an_inode_uidl(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError("read-only Maildir")

    monkeypatch.setattr(os, "link", refuse)
    older = deliver(root, b"A\n", subdir="cur", name="1700000009.dup:2,S")
    os.utime(older, ns=(1_700_000_009_000_000_000, 1_700_000_009_000_000_000))
    copy = deliver(root, b"BB\n", name="1700000009.dup")  # another size: (uid, size) pins content
    first = await listing(root)
    uids = [uid for uid, _ in first]
    assert len(set(uids)) == 2
    assert ("1700000009.dup", 3) in first  # the oldest copy keeps the name
    # the inode-based UIDL survives the other program's new/ -> cur/ move
    copy.rename(root / "cur" / "1700000009.dup:2,")
    assert sorted(await listing(root)) == sorted(first)  # numbering may change; UIDLs not
