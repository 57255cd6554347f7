"""What decides that a QUIT needs no write (popproxy/state/sqlite/unchanged.py)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from popproxy.state.base import AccountKey, SeenMessage, SessionRecord
from popproxy.state.checks import listing_digest
from popproxy.state.sqlite.unchanged import LAST_LISTED_REFRESH_SECONDS, ListedAccounts

T0 = datetime(2024, 5, 1, tzinfo=UTC)
SEEN = (SeenMessage("a", 1), SeenMessage("b", 2))


@given(st.lists(st.tuples(st.text(max_size=8), st.integers(0, 2**40)), max_size=20))
def test_a_listing_digest_is_that_of_its_lines_uid_nul_size(rows: list[tuple[str, int]]) -> None:
    """The digest stored in every account row (a changed one would make each account's
    next QUIT write its listing out once): the blake2b of one ``uid NUL size LF`` per
    message, as it always was."""
    text = "".join(f"{uid}\0{size}\n" for uid, size in rows)
    expected = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    assert listing_digest(tuple(SeenMessage(uid, size) for uid, size in rows)) == expected


def quit_of(n: int, at: datetime, retrieved: frozenset[str] = frozenset()) -> SessionRecord:
    return SessionRecord(AccountKey("p", f"box{n}"), "alice", "s", at, SEEN, retrieved)


def test_only_a_committed_listing_is_answered_from_memory() -> None:
    listed = ListedAccounts()
    first = quit_of(0, T0, frozenset({"a"}))
    assert not listed.answer_unchanged(first)
    listed.committed(first, listing_digest(SEEN))
    assert listed.answer_unchanged(quit_of(0, T0 + timedelta(seconds=1), frozenset({"a"})))
    assert not listed.answer_unchanged(quit_of(0, T0 - timedelta(seconds=1)))  # late
    bound = T0 + timedelta(seconds=LAST_LISTED_REFRESH_SECONDS, microseconds=1)
    assert not listed.answer_unchanged(quit_of(0, bound))
    listed.committed(first, None)  # a late record: what is latest is not known here
    assert not listed.answer_unchanged(quit_of(0, T0 + timedelta(seconds=2)))


def test_no_answer_from_memory_while_a_record_of_the_account_is_in_flight() -> None:
    listed = ListedAccounts()
    listed.committed(quit_of(0, T0), listing_digest(SEEN))
    listed.started(AccountKey("p", "box0"))
    assert not listed.answer_unchanged(quit_of(0, T0 + timedelta(seconds=1)))
    listed.finished(AccountKey("p", "box0"))
    assert listed.answer_unchanged(quit_of(0, T0 + timedelta(seconds=1)))


def test_the_kept_times_are_caught_up_once_written() -> None:
    listed = ListedAccounts()
    listed.committed(quit_of(0, T0), listing_digest(SEEN))
    later = T0 + timedelta(minutes=5)
    assert listed.answer_unchanged(quit_of(0, later))
    assert listed.answer_unchanged(quit_of(0, T0 + timedelta(minutes=4)))  # keeps the latest
    [catch_up] = listed.all_catch_ups()
    assert catch_up.at == later
    listed.caught_up([catch_up])
    assert listed.all_catch_ups() == []


def test_accounts_and_retrievals_kept_are_bounded() -> None:
    listed = ListedAccounts(max_accounts=3, max_retrievals=4)
    for n in range(5):
        listed.committed(quit_of(n, T0, frozenset({"a", "b"})), listing_digest(SEEN))
    kept = [n for n in range(5) if listed.answer_unchanged(quit_of(n, T0, frozenset({"a"})))]
    assert kept == [3, 4]  # two accounts' retrievals fill the four
