"""Which QUITs change nothing the sqlite store keeps, decided without reading it.

A QUIT whose listing equals the account's latest (same ``listing_digest``) and
which retrieved nothing new and hid and deleted nothing changes one value only:
``accounts.last_listed``. ``ListedAccounts`` remembers, per account, what this
process's own committed records left there (the latest listing's digest, the
``last_listed`` on disk, the retrievals stored), so ``SqliteStore.record`` can
answer such a QUIT without a thread hand-off, a transaction or an fsync.

Its ``last_listed`` is then not written at once: the time is kept here and goes
into the next transaction that writes the account (``catch_ups``), or the one at
``aclose``, and this process's reads (``facts``, ``messages``) apply it
(``facts_as_stored``), so within this process the store stays exact (unless the
account was evicted, see ``LISTED_ACCOUNTS``). What a crash can leave behind is bounded: a
QUIT writes when the ``last_listed`` on disk is more than
``LAST_LISTED_REFRESH_SECONDS`` older than it. Nothing a session decides reads
``last_listed``: rules read size, first seen and hides; pruning reads a row's
stored ``last_seen`` and ``listing_since``, never ``last_listed``, and a row of
the latest listing is never gone. A late ``last_listed`` only moves, by at most
that bound, the ``last_seen`` written out for the rows a later, different listing
drops (so ``state prune --gone-days N`` may forget them that much sooner) and what
``popproxy state show`` prints (docs/state.md, "Only what changed").

Coherent where this process is the file's one writer of records, as the facts
cache (``popproxy/state/facts_cache.py``) is; ``popproxy state prune`` only
deletes rows that are not in an account's latest listing, which changes nothing
kept here. A record that fails or is cancelled may or may not be stored: the
account is forgotten and its next QUIT writes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from popproxy.state.base import AccountKey, MessageFacts, SessionRecord, StoredMessage
from popproxy.state.checks import LISTING_REFRESH_SECONDS, listing_digest

# How far behind a QUIT the last_listed on disk may be before the QUIT writes it.
LAST_LISTED_REFRESH_SECONDS = LISTING_REFRESH_SECONDS
# Listings longer than this go to the worker thread as before: their digest is not
# computed on the event loop (about a millisecond per 2,000 messages).
UNCHANGED_MAX_MESSAGES = 1_000
# Accounts remembered, least recently recorded first out.
LISTED_ACCOUNTS = 10_000
# (user, UIDL) retrievals remembered over all accounts (about 150 bytes each).
LISTED_RETRIEVALS = 100_000

_REFRESH = timedelta(seconds=LAST_LISTED_REFRESH_SECONDS)


@dataclass(slots=True, eq=False)
class _Listed:
    """One account as the store holds it after this process's latest record of it."""

    digest: bytes
    written: datetime  # accounts.last_listed on disk
    retrieved: set[tuple[str, str]] = field(default_factory=set)  # (user, uid) stored
    unwritten: datetime | None = None  # the latest QUIT answered without a write


@dataclass(frozen=True, slots=True)
class CatchUp:
    """A ``last_listed`` to write for ``account`` if its latest listing is still ``digest``."""

    account: AccountKey
    digest: bytes
    at: datetime


class ListedAccounts:
    """Per account, what the store holds of its latest listing; see the module doc."""

    def __init__(
        self, *, max_accounts: int = LISTED_ACCOUNTS, max_retrievals: int = LISTED_RETRIEVALS
    ) -> None:
        self._max_accounts = max_accounts
        self._max_retrievals = max_retrievals
        self._accounts: OrderedDict[AccountKey, _Listed] = OrderedDict()
        self._retrievals = 0
        self._in_flight: dict[AccountKey, int] = {}  # records queued or committing

    def answer_unchanged(self, record: SessionRecord) -> bool:
        """Whether ``record`` changes nothing but a ``last_listed`` that may wait; if
        so it is taken (kept for the next write) and needs no transaction."""
        if record.hidden or record.deleted_upstream or record.account in self._in_flight:
            return False
        listed = self._accounts.get(record.account)
        if listed is None or len(record.seen) > UNCHANGED_MAX_MESSAGES:
            return False
        at = record.at
        if not listed.written <= at <= listed.written + _REFRESH:
            return False
        user = record.user
        if any((user, uid) not in listed.retrieved for uid in record.retrieved):
            return False
        if listing_digest(record.seen) != listed.digest:
            return False
        if listed.unwritten is None or listed.unwritten < at:
            listed.unwritten = at
        return True

    def started(self, account: AccountKey) -> None:
        """A record of ``account`` is queued: nothing of it is answered unwritten
        until it is done (``finished``)."""
        self._in_flight[account] = self._in_flight.get(account, 0) + 1

    def finished(self, account: AccountKey) -> None:
        left = self._in_flight[account] - 1
        if left:
            self._in_flight[account] = left
        else:
            del self._in_flight[account]

    def catch_ups(self, accounts: Iterable[AccountKey]) -> list[CatchUp]:
        """The ``last_listed`` times kept for ``accounts``, to write first in their
        transaction."""
        out = []
        for account in dict.fromkeys(accounts):
            listed = self._accounts.get(account)
            if listed is not None and listed.unwritten is not None:
                out.append(CatchUp(account, listed.digest, listed.unwritten))
        return out

    def all_catch_ups(self) -> list[CatchUp]:
        """Every ``last_listed`` kept (for the store's close)."""
        return self.catch_ups(self._accounts)

    def caught_up(self, done: Sequence[CatchUp]) -> None:
        """``done`` is committed: those times are on disk."""
        for catch_up in done:
            listed = self._accounts.get(catch_up.account)
            if listed is None or listed.digest != catch_up.digest:
                continue
            listed.written = max(listed.written, catch_up.at)
            if listed.unwritten is not None and listed.unwritten <= catch_up.at:
                listed.unwritten = None

    def committed(self, record: SessionRecord, latest: bytes | None) -> None:
        """``record`` is committed; ``latest`` is the digest it made the account's
        latest listing, None if it was a late record that left the latest alone."""
        account = record.account
        listed = self._accounts.get(account)
        if latest is None:
            self.forget(account)
            return
        if listed is None or listed.digest != latest:
            self.forget(account)
            listed = _Listed(latest, record.at)
            self._accounts[account] = listed
        else:
            listed.written = max(listed.written, record.at)
            self._accounts.move_to_end(account)
        new = {(record.user, uid) for uid in record.retrieved} - listed.retrieved
        if len(new) <= self._max_retrievals:  # else the next QUIT retrieving them writes
            listed.retrieved |= new
            self._retrievals += len(new)
        # Least recently recorded first out (never this one, now the last); a kept
        # last_listed goes with its account, as after a crash.
        while len(self._accounts) > self._max_accounts or self._retrievals > self._max_retrievals:
            self.forget(next(iter(self._accounts)))

    def facts_as_stored(
        self, account: AccountKey, read: Mapping[str, MessageFacts]
    ) -> Mapping[str, MessageFacts]:
        """``read`` with the kept ``last_listed`` applied: a row of the latest listing
        reads as last seen then (only such a row was last seen at the ``last_listed``
        on disk; any other was last seen before ``listing_since``)."""
        listed = self._accounts.get(account)
        if listed is None or listed.unwritten is None:
            return read
        written, at = listed.written, listed.unwritten
        return {
            uid: replace(f, last_seen=at) if f.last_seen == written else f
            for uid, f in read.items()
        }

    def messages_as_stored(self, rows: Sequence[StoredMessage]) -> Sequence[StoredMessage]:
        """``rows`` with the kept ``last_listed`` times applied (``facts_as_stored``)."""
        if not any(listed.unwritten is not None for listed in self._accounts.values()):
            return rows
        out = []
        for row in rows:
            listed = self._accounts.get(row.account)
            at = None if listed is None else listed.unwritten
            if listed is not None and at is not None and row.account_last_listed == listed.written:
                last_seen = at if row.last_seen == listed.written else row.last_seen
                out.append(replace(row, last_seen=last_seen, account_last_listed=at))
            else:
                out.append(row)
        return out

    def forget(self, account: AccountKey) -> None:
        """Whatever ``account``'s record left in the store is unknown now."""
        listed = self._accounts.pop(account, None)
        if listed is not None:
            self._retrievals -= len(listed.retrieved)
