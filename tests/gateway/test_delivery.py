"""Durable Maildir delivery: names, tmp files, publishing, and finding a staged file again."""

from __future__ import annotations

import errno
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from popproxy.gateway import delivery
from popproxy.gateway.delivery import DeliveryError, TmpFile, Where
from popproxy.maildrop.maildir import uid_for

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SOURCE = ("carol", "provider", "carol@example.net")


def test_names_are_deterministic_per_source_uidl_and_size() -> None:
    name = delivery.message_name(T0, SOURCE, uid="abc", size=10)
    assert name == delivery.message_name(T0, SOURCE, uid="abc", size=10)
    assert name.startswith(f"{int(T0.timestamp())}.G")
    assert name.endswith(".popproxy")
    others = {
        delivery.message_name(T0, SOURCE, uid="abc", size=11),
        delivery.message_name(T0, SOURCE, uid="abd", size=10),
        delivery.message_name(T0, ("dave", *SOURCE[1:]), uid="abc", size=10),
        delivery.message_name(T0, (SOURCE[0], "other", SOURCE[2]), uid="abc", size=10),
    }
    assert name not in others
    assert len(others) == 4
    # Served as is: the whole name is a valid UIDL (RFC 1939 §7).
    assert uid_for(name) == name


def test_ensure_maildir_makes_a_private_maildir(tmp_path: Path) -> None:
    root = tmp_path / "a" / "Maildir"
    delivery.ensure_maildir(root)
    delivery.ensure_maildir(root)  # again: nothing changes
    for sub in ("tmp", "new", "cur"):
        assert (root / sub).is_dir()
        assert (root / sub).stat().st_mode & 0o777 == 0o700


def test_a_message_is_written_in_chunks_then_published(tmp_path: Path) -> None:
    delivery.ensure_maildir(tmp_path)
    tmp = TmpFile.create(tmp_path, "m1")
    tmp.write([b"Subject: x\r\n", b"\r\n"])
    tmp.write([b"body\r\n"])
    tmp.finish()
    assert tmp.written == len(b"Subject: x\r\n\r\nbody\r\n")
    assert (tmp_path / "tmp" / "m1").stat().st_mode & 0o777 == 0o600
    delivery.sync_dir(tmp_path / "tmp")
    delivery.publish(tmp_path, ["m1"])
    assert (tmp_path / "new" / "m1").read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    assert not (tmp_path / "tmp" / "m1").exists()


def test_a_leftover_tmp_file_is_replaced_and_a_discard_leaves_nothing(tmp_path: Path) -> None:
    delivery.ensure_maildir(tmp_path)
    (tmp_path / "tmp" / "m1").write_bytes(b"half of an old attempt")
    tmp = TmpFile.create(tmp_path, "m1")
    tmp.write([b"new"])
    tmp.finish()
    assert (tmp_path / "tmp" / "m1").read_bytes() == b"new"
    again = TmpFile.create(tmp_path, "m2")
    again.write([b"partial"])
    again.discard()
    assert not (tmp_path / "tmp" / "m2").exists()
    delivery.discard_tmp(tmp_path, "m1")
    delivery.discard_tmp(tmp_path, "m1")  # already gone: fine
    assert not any((tmp_path / "tmp").iterdir())


def test_locate_finds_a_staged_file_wherever_it_is(tmp_path: Path) -> None:
    delivery.ensure_maildir(tmp_path)
    (tmp_path / "tmp" / "in-tmp").write_bytes(b"x")
    (tmp_path / "new" / "in-new").write_bytes(b"x")
    (tmp_path / "cur" / "in-cur:2,S").write_bytes(b"x")
    assert delivery.locate(tmp_path, ["in-tmp", "in-new", "in-cur", "gone"]) == {
        "in-tmp": Where.TMP,
        "in-new": Where.PUBLISHED,
        "in-cur": Where.PUBLISHED,
        "gone": Where.NOWHERE,
    }


def test_write_failures_say_why(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as info:
        TmpFile.create(tmp_path / "missing", "m1")
    assert info.value.errno == errno.ENOENT
    assert not info.value.disk_full
    full = DeliveryError("cannot write", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert full.disk_full
    assert "No space left on device" in str(full)
    quota = DeliveryError("cannot write", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert quota.disk_full
    with pytest.raises(DeliveryError):
        delivery.publish(tmp_path, ["not-there"])
