"""The fetch gateway: polls upstream accounts into local Maildirs (DESIGN.md, "Gateway").

- ``delivery.py``: durable Maildir delivery (tmp/, fsync, new/, fsync), blocking.
- ``fetcher.py``: one poll of one source: recover, list, fetch, delete per policy.
- ``schedule.py``: when each source is polled next (interval, jitter, backoff) and
  the trio driver that runs polls within the concurrency limits.

docs/gateway.md describes the guarantees, the crash table and the scheduling.
"""
