"""Bench: what a login's password check costs with and without the verified-credential cache,
and how much memory a full throttle table takes.

Usage (from the repository root):

    .venv/bin/python bench/auth_cache.py [--rounds 5] [--checks 200] [--ln 15]

One user with a default-cost scrypt hash (``--ln``, 15 as `popproxy hash-password`
writes). In each round it times ``--checks`` calls of ``Authenticator.check`` with the
right password against a cache of size 0 (every check a full scrypt in a worker
thread, as a first login) and against the default cache (the first check fills it,
the rest are hits), alternating. It prints the median per check of each and their
ratio. In-process and single-task: the cost of the check itself, not of a session.

Then it fills a ``ThrottleTable`` to its bound in both tables (IPv6 /64 sources,
240-character user names, the most failures a key keeps) with the default lockout
count and with the largest the config allows, and prints the memory tracemalloc sees.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tracemalloc
from pathlib import Path

import trio

from popproxy.auth.authenticator import Authenticator
from popproxy.auth.passwords import hash_password
from popproxy.auth.throttle import MAX_TRACKED_KEYS, ThrottlePolicy, ThrottleTable
from popproxy.config import (
    MAX_ADDRESS_LOCKOUT_FAILURES_LIMIT,
    MAX_LOCKOUT_FAILURES_LIMIT,
    LimitsConfig,
    UserConfig,
)
from popproxy.secret import Secret

PASSWORD = Secret.from_str("correct horse battery staple")


async def per_check(auth: Authenticator, checks: int) -> list[float]:
    """Seconds of each of ``checks`` right-password checks."""
    times = []
    for _ in range(checks):
        start = time.perf_counter()
        verdict = await auth.check("alice", PASSWORD)
        times.append(time.perf_counter() - start)
        assert verdict.user is not None
    return times


async def main(rounds: int, checks: int, ln: int) -> None:
    user = UserConfig("alice", hash_password(PASSWORD, ln=ln), maildir=Path("/nonexistent"))
    full, cached = [], []
    for _ in range(rounds):
        uncached_auth = Authenticator({"alice": user}, LimitsConfig(auth_cache_size=0))
        # Full hashes are slow: a tenth as many per round is plenty for a median.
        full += await per_check(uncached_auth, max(checks // 10, 1))
        cached_auth = Authenticator({"alice": user}, LimitsConfig())
        await cached_auth.check("alice", PASSWORD)  # fills the cache
        cached += await per_check(cached_auth, checks)
    full_median, cached_median = statistics.median(full), statistics.median(cached)
    print(f"scrypt ln={ln}: {len(full)} full checks, {len(cached)} cached checks")
    print(f"full check (scrypt in a worker thread), median: {full_median * 1e3:.1f} ms")
    print(f"cached check (HMAC-SHA256 + compare), median:   {cached_median * 1e6:.1f} us")
    print(f"ratio: {full_median / cached_median:.0f}x")


def table_memory(user_failures: int, address_failures: int, keys: int) -> float:
    """Bytes a ThrottleTable of ``keys`` keys per table holds when every key is one
    failure short of its lockout (a lockout clears the failure times kept): first every
    address fails as one name, then every name from one address."""
    policy = ThrottlePolicy(2.0, 15.0, user_failures, address_failures, 600.0, 900.0)
    tracemalloc.start()
    table = ThrottleTable(max_keys=keys)
    for n in range(keys):
        source = f"2001:db8:{n >> 12:x}:{n & 4095:x}::/64"
        for k in range(address_failures - 1):
            table.failure(source, "x", os.urandom(32), now=n / 1000 + k / 1e6, policy=policy)
    start = keys / 1000
    for n in range(keys):
        user = "u" * 240 + str(n)
        for k in range(user_failures - 1):
            when = start + n / 1000 + k / 1e6
            table.failure("2001:db8::/64", user, os.urandom(32), now=when, policy=policy)
    assert len(table) == 2 * keys
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return float(used)


def report_table_memory() -> None:
    """The default counts on full tables; the largest counts on a tenth of the keys,
    scaled (filling 10,000 addresses with 499 failures each takes many minutes)."""
    defaults = LimitsConfig()
    for user_failures, address_failures, keys in (
        (defaults.auth_lockout_failures, defaults.auth_lockout_address_failures, MAX_TRACKED_KEYS),
        (MAX_LOCKOUT_FAILURES_LIMIT, MAX_ADDRESS_LOCKOUT_FAILURES_LIMIT, MAX_TRACKED_KEYS // 10),
    ):
        used = table_memory(user_failures, address_failures, keys) * MAX_TRACKED_KEYS / keys
        print(
            f"throttle table, {2 * MAX_TRACKED_KEYS} keys, lockout counts {user_failures} (user)"
            f" and {address_failures} (address): {used / 1e6:.1f} MB"
            + ("" if keys == MAX_TRACKED_KEYS else f" (measured on {2 * keys} keys, scaled)")
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Password check cost with and without the cache.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--ln", type=int, default=15)
    args = parser.parse_args()
    trio.run(main, args.rounds, args.checks, args.ln)
    report_table_memory()
