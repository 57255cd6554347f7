"""bench/stats.py: percentiles, goals, the table, the JSON, smaps_rollup and profiles."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.stats import (
    Better,
    Figure,
    Goal,
    format_table,
    median,
    parse_proc_stat_ticks,
    parse_smaps_rollup,
    percentile,
    ratio,
    results_json,
    top_frames,
)


def test_percentile_is_a_measured_value_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0  # unsorted input


def test_percentile_and_median_of_nothing_are_nan() -> None:
    assert math.isnan(percentile([], 0.5))
    assert math.isnan(median([]))


@pytest.mark.parametrize("p", [0.0, -0.5, 1.5])
def test_percentile_outside_0_1_is_refused(p: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], p)


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1), st.floats(0.01, 1))
def test_percentile_lies_within_the_values(values: list[float], p: float) -> None:
    assert min(values) <= percentile(values, p) <= max(values)
    assert percentile(values, p) in values


def test_ratio_is_proxied_over_direct_and_nan_without_data() -> None:
    assert ratio(200.0, 100.0) == 0.5
    assert math.isnan(ratio(0.0, 1.0))
    assert math.isnan(ratio(math.nan, 1.0))


def test_goals_on_ratios_and_on_values() -> None:
    bulk = Goal(0.95, Better.HIGHER)
    assert bulk.met(100.0, 96.0) is True
    assert bulk.met(100.0, 94.0) is False
    latency = Goal(1.3, Better.LOWER)
    assert latency.met(100.0, 130.0) is True
    assert latency.met(100.0, 131.0) is False
    memory = Goal(16.0, Better.LOWER, on_ratio=False)
    assert memory.met(math.nan, 15.0) is True  # no direct side needed
    assert memory.met(300.0, 17.0) is False
    assert bulk.met(math.nan, 1.0) is None
    assert (bulk.describe(), memory.describe()) == (">= 0.95x", "<= 16")


def test_table_rows_say_ratio_goal_and_whether_met() -> None:
    figures = [
        Figure("bulk", "10 MiB RETR", "MB/s", 400.0, 380.0, Goal(0.95, Better.HIGHER)),
        Figure("latency", "p50", "µs", 50.0, 300.0, Goal(1.3, Better.LOWER), tls=True),
        Figure("big", "RSS growth", "KiB", math.nan, 700.0),
    ]
    lines = format_table(figures).splitlines()
    assert lines[0].startswith("| scenario | figure | TLS |")
    assert lines[2] == "| bulk | 10 MiB RETR (MB/s) | plain | 400 | 380 | 0.95x | >= 0.95x | yes |"
    assert lines[3] == "| latency | p50 (µs) | implicit | 50 | 300 | 6.00x | <= 1.3x | **no** |"
    assert lines[4] == "| big | RSS growth (KiB) | plain | - | 700 | - |  |  |"


def test_json_has_meta_and_figures_and_no_nan() -> None:
    figures = [Figure("big", "RSS growth", "KiB", math.nan, 700.0, Goal(2048, Better.LOWER, False))]
    data = json.loads(results_json(figures, {"date": "2026-11-27"}))
    assert data["meta"] == {"date": "2026-11-27"}
    (row,) = data["figures"]
    assert row["direct"] is None and row["ratio"] is None
    assert (row["proxied"], row["met"], row["goal"]) == (700.0, True, "<= 2048")


def test_smaps_rollup_fields_in_kib() -> None:
    text = (
        "55d4c0a00000-7ffd4b1e2000 ---p 00000000 00:00 0      [rollup]\n"
        "Rss:               19876 kB\n"
        "Pss:               12345 kB\n"
        "Pss_Anon:           9000 kB\n"
        "Swap:                  0 kB\n"
    )
    fields = parse_smaps_rollup(text)
    assert fields["Pss"] == 12345
    assert fields["Rss"] == 19876
    assert fields["Swap"] == 0
    assert "55d4c0a00000-7ffd4b1e2000 ---p 00000000 00" not in fields


def test_top_frames_ranks_own_time_and_merges_line_numbers() -> None:
    collapsed = [
        "main (popproxy/cli.py:10);run (trio/_core/_run.py:100);send_all (trio/_sock.py:5) 6",
        "main (popproxy/cli.py:10);run (trio/_core/_run.py:101);send_all (trio/_sock.py:7) 2",
        "main (popproxy/cli.py:10);run (trio/_core/_run.py:100) 2",
        "main (x.py:1);get_events (trio/_core/_io_epoll.py:9) 90",
        "garbage line",
    ]
    top = top_frames(
        collapsed, limit=2, waiting=frozenset({"get_events (trio/_core/_io_epoll.py)"})
    )
    assert [t.frame for t in top] == ["send_all (trio/_sock.py)", "run (trio/_core/_run.py)"]
    assert top[0].own == pytest.approx(0.8)
    assert top[1].own == pytest.approx(0.2)
    assert top[1].total == pytest.approx(1.0)
    assert top_frames([]) == []


def test_top_frames_leaves_out_both_kinds_of_wait_by_default() -> None:
    collapsed = [
        "run (trio/_core/_run.py:1);EpollIOManager.get_events (trio/_core/_io_epoll.py:9) 50",
        "receive_some (popproxy/socket_stream.py:3);"
        "QuickWait.readable (popproxy/quick_wait.py:7) 40",
        "receive_some (popproxy/socket_stream.py:3);send_all (popproxy/socket_stream.py:9) 10",
    ]
    top = top_frames(collapsed)
    assert [t.frame for t in top] == [
        "send_all (popproxy/socket_stream.py)",
        "receive_some (popproxy/socket_stream.py)",
    ]
    assert top[0].own == pytest.approx(1.0)


def test_proc_stat_cpu_ticks_after_a_command_name_with_spaces() -> None:
    text = "4242 (python -m (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 3 0"
    assert parse_proc_stat_ticks(text) == 1234 + 567


def test_proc_stat_ticks_with_children_add_cutime_and_cstime() -> None:
    text = "4242 (nginx) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 89 10 20 0 3 0"
    assert parse_proc_stat_ticks(text, children=True) == 1234 + 567 + 89 + 10


def test_peers_get_a_value_and_a_ratio_column_each_where_any_figure_has_them() -> None:
    figures = [
        Figure(
            "sessions",
            "sessions/s",
            "1/s",
            600.0,
            200.0,
            Goal(0.75, Better.HIGHER),
            peers=(("nginx", 450.0), ("perdition", math.nan)),
        ),
        Figure("big", "RSS growth", "KiB", math.nan, 700.0),
    ]
    lines = format_table(figures).splitlines()
    assert lines[0] == (
        "| scenario | figure | TLS | direct | proxied | ratio | nginx | ratio | perdition"
        " | ratio | goal | met |"
    )
    assert lines[1].count("|") == lines[0].count("|")
    assert lines[2] == (
        "| sessions | sessions/s (1/s) | plain | 600 | 200 | 0.33x | 450 | 0.75x | - | - "
        "| >= 0.75x | **no** |"
    )
    assert lines[3] == "| big | RSS growth (KiB) | plain | - | 700 | - | - | - | - | - |  |  |"
    row = json.loads(results_json(figures, {}))["figures"][0]
    assert row["peers"] == {
        "nginx": {"value": 450.0, "ratio": 0.75},
        "perdition": {"value": None, "ratio": None},
    }
