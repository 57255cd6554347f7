"""The fetch gateway: polls upstream accounts into local Maildirs (DESIGN.md, "Gateway").

- ``delivery.py``: the Maildir file operations (tmp/, fsync, new/, fsync), blocking.
- ``durable.py``: durable delivery of a poll's messages: receive into tmp/, fsync,
  record STAGED, publish, record DELIVERED; recovery of a poll that died.
- ``fetcher.py``: one poll of one source: recover, list, fetch, delete per policy.
- ``schedule.py``: when each source is polled next (interval, jitter, backoff) and
  the trio driver that runs polls within the concurrency limits.

docs/gateway.md describes the guarantees, the crash table and the scheduling.
"""
