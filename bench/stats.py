"""Pure helpers of the benchmark harness: statistics, goals, the table and the JSON.

No I/O here (the harness's tests import this module alone). A figure is measured
on both sides, ``direct`` (Dovecot alone) and ``proxied`` (popproxy in front of the
same Dovecot), in one run; its ratio is proxied over direct. Peers (other proxies in
front of the same Dovecot, bench/peers.py) may add their own value and ratio.
"""

from __future__ import annotations

import enum
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-quantile (0 < p <= 1) by the nearest-rank method; NaN when empty.

    Nearest rank, not interpolation: a p99 is a value that was measured.
    """
    if not 0 < p <= 1:
        raise ValueError(f"percentile {p} is not in (0, 1]")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = math.ceil(p * len(ordered))  # 1-based
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """The median, NaN when empty."""
    return statistics.median(values) if values else math.nan


class Better(enum.Enum):
    """Which way a figure improves, so a ratio can be held against its goal."""

    HIGHER = "higher"  # throughput: proxied/direct must be at least the goal
    LOWER = "lower"  # latency, memory: proxied/direct (or the value) at most the goal


@dataclass(frozen=True, slots=True)
class Goal:
    """A goal from issue 7: a bound on the ratio, or on the proxied value itself."""

    bound: float
    better: Better
    on_ratio: bool = True  # False: the bound applies to the proxied value (its unit)

    def met(self, direct: float, proxied: float) -> bool | None:
        """Whether the figure meets the goal; None when it cannot be told (no data)."""
        value = ratio(direct, proxied) if self.on_ratio else proxied
        if math.isnan(value):
            return None
        return value >= self.bound if self.better is Better.HIGHER else value <= self.bound

    def describe(self) -> str:
        """``>= 0.95x``, ``<= 16 KB``, ... for the table."""
        sign = ">=" if self.better is Better.HIGHER else "<="
        return f"{sign} {self.bound:g}x" if self.on_ratio else f"{sign} {self.bound:g}"


def ratio(direct: float, proxied: float) -> float:
    """proxied / direct; NaN when either is missing or direct is 0."""
    if math.isnan(direct) or math.isnan(proxied) or direct == 0:
        return math.nan
    return proxied / direct


@dataclass(frozen=True, slots=True)
class Figure:
    """One row of the results: a figure on both sides, its unit and its goal."""

    scenario: str  # "bulk", "sessions", ...
    name: str  # "MB/s", "p50", ...
    unit: str
    direct: float
    proxied: float
    goal: Goal | None = None
    tls: bool = False  # implicit TLS on the client leg (both sides)
    peers: tuple[tuple[str, float], ...] = ()  # (peer, its value), in the run's order

    @property
    def ratio(self) -> float:
        """proxied / direct (NaN when a side is missing)."""
        return ratio(self.direct, self.proxied)

    def peer(self, name: str) -> float:
        """A peer's value (NaN if it has none here)."""
        return dict(self.peers).get(name, math.nan)

    @property
    def met(self) -> bool | None:
        """Whether the goal is met; None without a goal or without data."""
        return None if self.goal is None else self.goal.met(self.direct, self.proxied)

    def as_json(self) -> dict[str, object]:
        """A JSON-ready dict (NaN becomes null)."""
        out = asdict(self)
        out["goal"] = None if self.goal is None else self.goal.describe()
        out["ratio"] = self.ratio
        out["met"] = self.met
        out["peers"] = {
            name: {"value": _json_number(value), "ratio": _json_number(ratio(self.direct, value))}
            for name, value in self.peers
        }
        return {k: _json_number(v) for k, v in out.items()}


def _json_number(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value


def _number(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def format_table(figures: Iterable[Figure]) -> str:
    """The figures as a Markdown table: direct, proxied, ratio, then each peer's value and
    ratio (columns only for peers some figure has), goal and whether popproxy meets it."""
    figures = list(figures)
    peers = list(dict.fromkeys(name for f in figures for name, _ in f.peers))
    header = "| scenario | figure | TLS | direct | proxied | ratio |"
    header += "".join(f" {name} | ratio |" for name in peers)
    rows = [header + " goal | met |", "|---|---|---|---:|---:|---:|" + "---:|---:|" * len(peers)]
    rows[1] += "---|---|"
    for f in figures:
        met = {True: "yes", False: "**no**", None: ""}[f.met]
        cells = f"| {_number(f.direct)} | {_number(f.proxied)} | {_ratio(f.ratio)} "
        cells += "".join(
            f"| {_number(f.peer(name))} | {_ratio(ratio(f.direct, f.peer(name)))} "
            for name in peers
        )
        rows.append(
            f"| {f.scenario} | {f.name} ({f.unit}) | {'implicit' if f.tls else 'plain'} "
            f"{cells}| {f.goal.describe() if f.goal else ''} | {met} |"
        )
    return "\n".join(rows)


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def results_json(figures: Iterable[Figure], meta: Mapping[str, object]) -> str:
    """The figures and the run's facts (machine, command, date, CPU share) as JSON."""
    return json.dumps(
        {"meta": dict(meta), "figures": [f.as_json() for f in figures]},
        indent=2,
        allow_nan=False,
    )


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """The ``Key: N kB`` fields of /proc/PID/smaps_rollup, in KiB (proc(5))."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        words = rest.split()
        if sep and len(words) == 2 and words[1] == "kB" and words[0].isdigit():
            fields[key.strip()] = int(words[0])
    return fields


def parse_proc_stat_ticks(text: str, *, children: bool = False) -> int:
    """utime + stime of /proc/PID/stat, in clock ticks (proc(5): fields 14 and 15), and
    with ``children`` cutime + cstime as well (16 and 17: the children it waited for).

    The command name (field 2) may hold spaces and parentheses: fields are counted
    after its closing parenthesis.
    """
    fields = text[text.rindex(")") + 2 :].split()
    own = int(fields[11]) + int(fields[12])
    return own + int(fields[13]) + int(fields[14]) if children else own


# Innermost frames of a profile sample that is waiting, not working: trio's I/O wait,
# and a read's brief wait in poll(2) (popproxy/quick_wait.py: its own Python is a few
# attribute reads around the poll, so its samples are the wait).
WAITING_FRAMES = frozenset(
    {
        "EpollIOManager.get_events (trio/_core/_io_epoll.py)",
        "QuickWait.readable (popproxy/quick_wait.py)",
    }
)


@dataclass(frozen=True, slots=True)
class StackShare:
    """A function's share of a py-spy profile's samples."""

    frame: str
    own: float  # samples where it was the innermost frame, as a fraction
    total: float  # samples where it was anywhere on the stack, as a fraction


def top_frames(
    collapsed: Iterable[str], *, limit: int = 15, waiting: frozenset[str] = WAITING_FRAMES
) -> list[StackShare]:
    """The hottest functions of a collapsed-stack profile (``py-spy record -f raw``).

    Each line is ``frame;frame;...;innermost COUNT``; frames are taken as written
    (py-spy writes ``function (file:line)``; the line number is dropped so that one
    function is counted once). Samples whose innermost frame is in ``waiting`` (the
    event loop asleep in epoll) are left out: shares are of the busy samples. Sorted
    by own share, then total share.
    """
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in collapsed:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")]
        if frames[-1] in waiting:
            continue
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    if not samples:
        return []
    ranked = sorted(total, key=lambda f: (own.get(f, 0), total[f]), reverse=True)
    return [StackShare(f, own.get(f, 0) / samples, total[f] / samples) for f in ranked[:limit]]


def _function(frame: str) -> str:
    """``send_all (trio/_highlevel_socket.py:123)`` -> ``send_all (trio/_highlevel_socket.py)``."""
    head, sep, location = frame.rpartition(" (")
    if not sep:
        return frame
    path = location.rstrip(")").rsplit(":", 1)[0]
    return f"{head} ({path})"
