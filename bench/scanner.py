"""Bench: the relay's body scanner (``StuffedBodyScanner.feed``) on one relay chunk.

Usage (from the repository root):

    .venv/bin/python bench/scanner.py [--repeats 7] [--feeds 200]

The relay reads up to 128 KiB from the upstream into its line buffer and hands the
buffer to ``StuffedBodyScanner.feed``, which finds the end of the body and returns
the octets to pass on. This times that call alone, in-process, on one 128 KiB chunk
of each kind of body:

- ``text``: 75-octet printable lines ended by CRLF, every 17th one dot-stuffed (as
  ``bench/maildir_retr.py`` writes);
- ``base64``: 76-octet base64 lines ended by CRLF, no dot at all (an attachment);
- ``dots``: 12-octet lines that all begin with a stuffed dot (the worst case for a
  scanner that stops at every line-initial dot);
- ``poisoned``: ``text`` with one line of a single dot ended by a bare LF every 64
  lines (refused by a scanner without the repair).

For each kind it runs ``--repeats`` rounds of ``--feeds`` feeds (a fresh buffer per
feed, built outside the timed part) and prints the best round's time per feed and
the rate. Compare two trees by running the same script with ``PYTHONPATH`` pointing
at each, alternating. The figures depend on the machine and its load: give the load
average with them (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import time

from popproxy.pop3.dotstuff import StuffedBodyScanner
from popproxy.pop3.errors import RemoteProtocolError

CHUNK_BYTES = 128 * 1024  # RETRIEVE_CHUNK_BYTES, one upstream read


def _fill(lines: list[bytes]) -> bytes:
    """Repeat ``lines`` to one chunk of exactly ``CHUNK_BYTES`` that ends a line."""
    block = b"".join(lines)
    body = block * (CHUNK_BYTES // len(block) + 1)
    return body[: body.rfind(b"\n", 0, CHUNK_BYTES) + 1]


def corpora() -> dict[str, bytes]:
    """One chunk of each kind of body (module docstring)."""
    rng = random.Random(1)
    text = [bytes(rng.randrange(32, 127) for _ in range(75)) + b"\r\n" for _ in range(512)]
    text[::17] = [b"." + line for line in text[::17]]
    b64 = [
        base64.b64encode(rng.randbytes(57)) + b"\r\n"  # 76 characters, as MIME writes them
        for _ in range(512)
    ]
    dots = [b"..dot-line\r\n"]
    poisoned = list(text)
    poisoned[::64] = [b".\n"] * len(poisoned[::64])
    return {
        "text": _fill(text),
        "base64": _fill(b64),
        "dots": _fill(dots),
        "poisoned": _fill(poisoned),
    }


def best_feed_seconds(chunk: bytes, repeats: int, feeds: int) -> float | None:
    """Seconds per feed in the best of ``repeats`` rounds; None if the scanner refuses."""
    best = float("inf")
    for _ in range(repeats):
        buffers = [bytearray(chunk) for _ in range(feeds)]
        scanners = [StuffedBodyScanner() for _ in range(feeds)]
        start = time.perf_counter()
        try:
            for scanner, buf in zip(scanners, buffers, strict=True):
                scanner.feed(buf)
        except RemoteProtocolError:
            return None
        best = min(best, (time.perf_counter() - start) / feeds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--feeds", type=int, default=200)
    args = parser.parse_args()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, chunk in corpora().items():
        seconds = best_feed_seconds(chunk, args.repeats, args.feeds)
        if seconds is None:
            print(f"{name:9} refused")
            continue
        rate = len(chunk) / seconds / 1e9
        print(f"{name:9} {seconds * 1e6:8.1f} us per 128 KiB feed  {rate:5.2f} GB/s")


if __name__ == "__main__":
    main()
