"""The checks every state backend makes before its SQL (popproxy.state.checks).

``check_record`` checks a whole listing at once when every row is plain, and row
by row otherwise: with hypothesis, it refuses what a row-by-row reference refuses,
with the same reason, and accepts the rest.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.pop3.limits import MAX_UIDL_OCTETS
from popproxy.state.base import AccountKey, SeenMessage, SessionRecord
from popproxy.state.checks import check_record

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ACCOUNT = AccountKey("provider", "shared@example.net")


def reference_row_checks(seen: tuple[SeenMessage, ...]) -> str | None:
    """Each row in order: the UIDL 1-70 octets in UTF-8 without NUL, each once, the
    size not negative; the first failure's reason, None when all pass."""
    listed: set[str] = set()
    for message in seen:
        try:
            octets = len(message.uid.encode("utf-8"))
        except UnicodeEncodeError:
            return "surrogates not allowed"
        if not 0 < octets <= MAX_UIDL_OCTETS:
            return f"a UIDL must be 1-{MAX_UIDL_OCTETS} octets"
        if "\0" in message.uid:
            return "a UIDL must not contain NUL"
        if message.uid in listed:
            return "a UIDL is listed twice in one record"
        if message.size < 0:
            return "a message size must not be negative"
        listed.add(message.uid)
    return None


plain_uids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70)
odd_uids = st.one_of(
    st.just(""),
    st.just("x" * (MAX_UIDL_OCTETS + 1)),
    st.just("é" * 35),  # 70 octets
    st.just("é" * 36),  # 72 octets, 36 characters
    st.just("a\0b"),
    st.just("\udc80"),
    st.text(max_size=4),
)


@given(
    st.lists(
        st.tuples(
            st.one_of(plain_uids, plain_uids, odd_uids),
            st.one_of(st.integers(0, 10**9), st.just(-1)),
        ),
        max_size=8,
    ),
    st.lists(st.integers(0, 7), max_size=3),
)
def test_a_listing_is_refused_as_row_by_row_checks_refuse_it(
    rows: list[tuple[str, int]], repeats: list[int]
) -> None:
    seen = [SeenMessage(uid, size) for uid, size in rows]
    seen += [seen[i] for i in repeats if i < len(seen)]  # a UIDL listed twice
    record = SessionRecord(ACCOUNT, "alice", "s1", AT, seen=tuple(seen))
    reason = reference_row_checks(record.seen)
    if reason is None:
        check_record(record)
    else:
        with pytest.raises(ValueError, match=reason):
            check_record(record)


def test_a_large_plain_listing_passes_and_one_bad_row_is_named() -> None:
    seen = tuple(SeenMessage(f"uid-{i:06d}", i) for i in range(100_000))
    check_record(SessionRecord(ACCOUNT, "alice", "s1", AT, seen=seen))
    for bad, reason in [
        (SeenMessage("uid-000007", 1), "listed twice"),
        (SeenMessage("x" * 71, 1), "1-70 octets"),
        (SeenMessage("a\0", 1), "NUL"),
        (SeenMessage("uid-x", -1), "negative"),
    ]:
        record = SessionRecord(ACCOUNT, "alice", "s1", AT, seen=(*seen, bad))
        with pytest.raises(ValueError, match=reason):
            check_record(record)
