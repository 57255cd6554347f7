"""What retention rules read at login (size, first seen, hidden), kept in memory.

A login asks the state store what it knows of every UIDL of the listing
(``StateStore.facts``): for a mailbox of 100,000 messages that is most of the
login's time, and for every login a thread hand-off. ``FactsCache`` keeps the
answer per (account, local user) and updates it from this process's own QUIT
records, so that a returning user's login asks the store only about UIDLs it has
not seen before, and nothing at all when the listing is the same.

Coherent only where this process is the store's one writer: a sqlite file serves
one process (docs/scaling.md), and every write to what is kept here is a
``SessionRecord`` of this process's sessions. With PostgreSQL other instances
write behind it, so the server makes no cache there. What the cache keeps after a
record mirrors the store's rules (docs/state.md), so that the next login of the
account needs no read: a listed UIDL of the same size keeps the earlier first-seen
time; a UIDL the store did not know is stored as the record lists it (its size,
first seen at the record's time, hidden only where the record hides it); another
size is new content, which the store may or may not take (a later sighting of the
old content wins), so it is asked again; a hide is this user's for good. The cache
is brought up to date only after the store has committed the record, in the same
step of the event loop: a process that dies in between loses the cache with it,
and a record that fails or is cancelled may or may not be stored, so the account's
entries are dropped. A read of the store that a record of the same account
overtook is used for that login and not kept. Entries live at most
``FACTS_CACHE_SECONDS`` (trio's clock), which also bounds how stale an entry can
be after ``popproxy state prune`` ran in another process.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence, Set
from datetime import datetime
from operator import attrgetter
from typing import NamedTuple, Protocol

import trio

from popproxy.state.base import AccountKey, MessageFacts, SessionRecord

# Messages kept over all entries (about 200 bytes each: 40 MB at most); a listing
# longer than this is never kept. Least recently used entries go first.
FACTS_CACHE_MESSAGES = 200_000
# How long an entry is used before it is read from the store again.
FACTS_CACHE_SECONDS = 600.0


class FactsSource(Protocol):
    """Where the facts come from: ``StateStore.facts``."""

    async def facts(
        self, account: AccountKey, user: str, uids: Collection[str]
    ) -> Mapping[str, MessageFacts]: ...


class KnownMessage(Protocol):
    """What a rule reads of a UIDL the store knows (``MessageFacts`` is one)."""

    @property
    def size(self) -> int: ...

    @property
    def first_seen(self) -> datetime: ...

    @property
    def hidden(self) -> bool: ...


class RuleFacts(NamedTuple):
    """A ``KnownMessage`` as the cache keeps it: what rules read of a store's answer,
    or of a record. A named tuple: an entry may hold 100,000 of them, and a tuple of
    these values is built in C and not tracked by the cyclic collector."""

    size: int
    first_seen: datetime
    hidden: bool


_uid = attrgetter("uid")
_size = attrgetter("size")
_first_seen = attrgetter("first_seen")


class _Entry:
    """One (account, user): ``known`` as the store would answer, for every UIDL of
    ``asked`` (a UIDL of ``asked`` not in ``known`` is one the store does not know)."""

    __slots__ = ("asked", "expires", "known")

    def __init__(self, known: dict[str, KnownMessage], asked: set[str], expires: float) -> None:
        self.known = known
        self.asked = asked
        self.expires = expires


class FactsCache:
    """Per (account, local user), the store's facts of the UIDLs last listed."""

    def __init__(
        self,
        *,
        max_messages: int = FACTS_CACHE_MESSAGES,
        ttl_seconds: float = FACTS_CACHE_SECONDS,
    ) -> None:
        self._max_messages = max_messages
        self._ttl_seconds = ttl_seconds
        # Least recently used first, for the bound on messages.
        self._entries: OrderedDict[tuple[AccountKey, str], _Entry] = OrderedDict()
        # The same entries by account, then user: a record touches only its account's.
        self._accounts: dict[AccountKey, dict[str, _Entry]] = {}
        self._messages = 0  # len(entry.asked) over all entries, kept as they change
        # Writes seen while a read of the store was in flight: account -> write number.
        # Emptied whenever no read is in flight (one key per account at most).
        self._writes = 0
        self._written: dict[AccountKey, int] = {}
        self._reads = 0

    @property
    def messages(self) -> int:
        """How many UIDLs the cache holds facts (or the store's not knowing) of."""
        return self._messages

    async def facts(
        self, store: FactsSource, account: AccountKey, user: str, uids: Sequence[str]
    ) -> Mapping[str, KnownMessage]:
        """``store.facts(account, user, uids)`` as far as rules read it; the store is
        asked only about UIDLs the entry does not cover. The mapping may hold UIDLs
        beyond ``uids``; the caller must not change it."""
        key = (account, user)
        now = trio.current_time()
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            self._drop(key)
            entry = None
        if entry is None:
            missing: Sequence[str] = uids
        elif entry.asked.issuperset(uids):
            self._entries.move_to_end(key)
            return entry.known
        else:
            asked = entry.asked
            missing = [uid for uid in uids if uid not in asked]
        started = self._writes
        self._reads += 1
        try:
            read = await store.facts(account, user, missing)
        finally:
            self._reads -= 1
            overtaken = self._written.get(account, -1) > started
            if not self._reads:
                self._written.clear()
        known: dict[str, KnownMessage] = {}
        cached = entry.known if entry is not None else {}
        for uid in uids:
            stored = read.get(uid)
            fact: KnownMessage | None
            if stored is not None:
                fact = RuleFacts(stored.size, stored.first_seen, stored.hidden)
            else:
                fact = cached.get(uid)
            if fact is not None:
                known[uid] = fact
        if not overtaken and len(uids) <= self._max_messages:
            entry = self._entries.get(key)  # another login of this user may have filled it
            expires = entry.expires if entry is not None else now + self._ttl_seconds
            self._store(key, _Entry(known, set(uids), expires))
        return known

    def recorded(self, record: SessionRecord) -> None:
        """``record`` was committed: bring the account's entries up to date, as the
        store now answers (module doc). Call it in the same step of the event loop as
        the commit returned, with no ``await`` in between."""
        self._wrote(record.account)
        entries = self._accounts.get(record.account)
        if entries is None:
            return
        uids = list(map(_uid, record.seen))
        sizes = list(map(_size, record.seen))
        hides = {hidden.uid for hidden in record.hidden}
        for user, entry in entries.items():
            self._apply(entry, record.at, uids, sizes, hides if user == record.user else set())

    def _apply(
        self, entry: _Entry, at: datetime, uids: list[str], sizes: list[int], hides: Set[str]
    ) -> None:
        """One entry after a record at ``at`` of the listing ``uids`` and ``sizes`` that
        hid ``hides`` for the entry's user."""
        known, asked = entry.known, entry.asked
        facts = list(map(known.get, uids))
        # The usual QUIT lists what the login did and the store knew it all: nothing
        # changes but the hides (checked over the whole listing at once).
        unchanged = (
            None not in facts
            and list(map(_size, facts)) == sizes
            and (not facts or max(map(_first_seen, facts)) <= at)
        )
        if not unchanged:
            before = len(asked)
            for uid, size, fact in zip(uids, sizes, facts, strict=True):
                if fact is None:
                    if uid in asked:  # unknown to the store before: stored as listed
                        known[uid] = RuleFacts(size, at, uid in hides)
                elif fact.size != size:
                    del known[uid]  # other content under the UIDL: the store decides
                    asked.discard(uid)
                elif at < fact.first_seen:  # a late record: the store keeps the earlier
                    known[uid] = RuleFacts(size, at, fact.hidden)
            self._messages -= before - len(asked)
        for uid in hides:
            fact = known.get(uid)
            if fact is not None and not fact.hidden:
                known[uid] = RuleFacts(fact.size, fact.first_seen, True)

    def forget(self, account: AccountKey) -> None:
        """A record of ``account`` may or may not be stored: drop its entries."""
        self._wrote(account)
        for user in list(self._accounts.get(account, ())):
            self._drop((account, user))

    def _wrote(self, account: AccountKey) -> None:
        if self._reads:
            self._writes += 1
            self._written[account] = self._writes

    def _store(self, key: tuple[AccountKey, str], entry: _Entry) -> None:
        self._drop(key)
        self._entries[key] = entry
        self._accounts.setdefault(key[0], {})[key[1]] = entry
        self._messages += len(entry.asked)
        while self._messages > self._max_messages:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[AccountKey, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._messages -= len(entry.asked)
            account, user = key
            entries = self._accounts[account]
            del entries[user]
            if not entries:
                del self._accounts[account]
