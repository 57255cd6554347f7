"""The harness itself: the corpus has the cases issue 2 asks for, and digests are right."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .harness import (
    BIG_MESSAGE_BYTES,
    SERVER_START_DEADLINE_SECONDS,
    Corpus,
    CrlfDigest,
    ServerFailed,
    ServerProcess,
    crlf_form,
    parse_logfmt,
)


def test_corpus_has_dot_lines_8bit_long_lines_and_a_50mb_message(corpus: Corpus) -> None:
    assert len(corpus.by_sha256()) == len(corpus.messages), "messages must differ"
    dots = corpus.by_kind("dots").crlf
    assert dots is not None
    lines = dots.split(b"\r\n")
    assert b"." in lines and b".." in lines and lines[-2] == b"."
    eightbit = corpus.by_kind("8bit").crlf
    assert eightbit is not None
    assert any(b >= 0x80 for b in eightbit)
    assert b"caf\xe9" in eightbit  # latin-1, not UTF-8
    long = corpus.by_kind("long-line").crlf
    assert long is not None
    assert max(len(line) for line in long.split(b"\r\n")) > 10_000
    big = corpus.by_kind("big")
    assert (corpus.root / big.relpath).stat().st_size == BIG_MESSAGE_BYTES
    assert big.size > BIG_MESSAGE_BYTES  # one CR per line added
    assert {m.subdir for m in corpus.messages} == {"new", "cur"}


def test_every_corpus_message_size_is_its_file_in_crlf_form(corpus: Corpus) -> None:
    for m in corpus.small:
        data = (corpus.root / m.relpath).read_bytes()
        assert m.crlf == crlf_form(data)
        assert (m.size, m.sha256) == (len(m.crlf), hashlib.sha256(m.crlf).hexdigest())


@given(
    data=st.lists(st.sampled_from([b"a", b".", b"\r", b"\n"]), max_size=60).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=6),
)
def test_crlf_digest_is_the_same_under_any_chunking(data: bytes, cuts: list[int]) -> None:
    digest = CrlfDigest()
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for a, b in itertools.pairwise(points):
        digest.update(data[a:b])
    expected = crlf_form(data)
    assert digest.finish() == (len(expected), hashlib.sha256(expected).hexdigest())


def test_crlf_form_keeps_existing_crlf_and_adds_a_final_one() -> None:
    assert crlf_form(b"a\nb\r\nc") == b"a\r\nb\r\nc\r\n"
    assert crlf_form(b"a\n") == b"a\r\n"


def test_parse_logfmt_reads_quoted_and_bare_values() -> None:
    line = (
        'ts=2026-11-26T18:00:00.123Z level=info msg=listening listener=none port=1234 x="a \\"b\\""'
    )
    assert parse_logfmt(line) == {
        "ts": "2026-11-26T18:00:00.123Z",
        "level": "info",
        "msg": "listening",
        "listener": "none",
        "port": "1234",
        "x": 'a "b"',
    }


def test_a_server_that_cannot_start_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("listen: []\nno_such_key: 1\n")
    server = ServerProcess(config, listeners=["none"], cwd=tmp_path)
    with pytest.raises(ServerFailed, match="no_such_key"):
        server.wait_ready(timeout=SERVER_START_DEADLINE_SECONDS)
    assert server.proc.returncode == 2  # popproxy's exit code for a config error
