"""Which QUITs change nothing the PostgreSQL store keeps, decided from the login's facts.

Several processes write one database, so no process can know what it holds from
its own writes (the sqlite store's ``unchanged.py``). But each login asks it: the
facts of the listed UIDLs, read at login (``PostgresStore._read_facts``), are what
the database held then, and nothing takes them away before the QUIT. A row of the
listing is deleted only by pruning (its ``last_seen`` long before the listing's
last write) or by a record that lists its UIDL with another size, and a retrieval
only with its row. Another session may add to the account meanwhile (upstreams
without ``exclusive_sessions``); that only makes the check more cautious than it
needs to be.

So a QUIT is answered without a transaction when, by its login's facts, every UIDL
of its listing is stored with the listed size and was written out within
``UNCHANGED_REFRESH_SECONDS``, every message it retrieved is stored as retrieved by
its user, and it hid and deleted nothing. Writing it would only move the listing's
``last_seen`` and the account's ``last_listed`` forward. Leaving them costs at most
that refresh interval, as with sqlite (docs/state.md, "Only what changed"): a UIDL
that dropped out of the listing still counts as listed until the next write, so
``state prune --gone-days N`` (whole days) may forget it up to an hour later.

What a login's facts leave for its QUIT is small (a digest, the few UIDLs not yet
retrieved, one time), kept for ``LOGINS_KEPT`` (account, user) pairs, and only for
the listings read on the event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from popproxy.state.base import AccountKey, MessageFacts, SessionRecord
from popproxy.state.checks import LISTING_REFRESH_SECONDS, listing_digest

# How long after a listing was written out a QUIT of the same listing still writes
# nothing (the same bound as sqlite's).
UNCHANGED_REFRESH_SECONDS = LISTING_REFRESH_SECONDS
# (account, user) pairs whose login's facts are kept for the QUIT, least recent out
# first (an entry goes at its QUIT): each about 200 octets, and about 70 more per
# UIDL not yet retrieved, of which it keeps at most NOT_RETRIEVED_KEPT (a login with
# more keeps nothing: its QUIT writes). At most about 5 MB.
LOGINS_KEPT = 2_000
NOT_RETRIEVED_KEPT = 32

_REFRESH = timedelta(seconds=UNCHANGED_REFRESH_SECONDS)


@dataclass(frozen=True, slots=True)
class _AtLogin:
    """What the store held of one listing at its login."""

    digest: bytes  # listing_digest of the listing, every UIDL stored with its size
    not_retrieved: frozenset[str]  # UIDLs the user has no stored retrieval of
    written: datetime  # the oldest last_seen of the listing's rows


class LoginFacts:
    """Per (account, user), the latest login's facts; see the module doc."""

    def __init__(self, *, max_logins: int = LOGINS_KEPT) -> None:
        self._max_logins = max_logins
        self._logins: OrderedDict[tuple[AccountKey, str], _AtLogin] = OrderedDict()

    def read(
        self,
        account: AccountKey,
        user: str,
        wanted: Sequence[str],
        facts: Mapping[str, MessageFacts],
    ) -> None:
        """A login of ``user`` read ``facts`` for ``wanted`` (in listing order)."""
        key = (account, user)
        self._logins.pop(key, None)
        if not wanted or len(facts) != len(wanted):
            return  # some UIDL is new: its QUIT writes
        found = [facts[uid] for uid in wanted]
        not_retrieved = frozenset(f.uid for f in found if f.retrieved_at is None)
        if len(not_retrieved) > NOT_RETRIEVED_KEPT:
            return
        self._logins[key] = _AtLogin(
            digest=listing_digest([(f.uid, f.size) for f in found]),
            not_retrieved=not_retrieved,
            written=min(f.last_seen for f in found),
        )
        if len(self._logins) > self._max_logins:
            self._logins.popitem(last=False)

    def forget(self, account: AccountKey, user: str) -> None:
        """A login whose facts were not read here: its QUIT writes."""
        self._logins.pop((account, user), None)

    def answer_unchanged(self, record: SessionRecord) -> bool:
        """Whether ``record`` would change nothing but times that may wait; the login's
        facts are used once either way."""
        at_login = self._logins.pop((record.account, record.user), None)
        if at_login is None or record.hidden or record.deleted_upstream:
            return False
        if record.at - at_login.written > _REFRESH:
            return False
        if not at_login.not_retrieved.isdisjoint(record.retrieved):
            return False
        return listing_digest(record.seen) == at_login.digest
