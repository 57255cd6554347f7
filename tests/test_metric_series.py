"""popproxy.metric_series: plain-number series export what prometheus_client exports.

Each family is checked against two references computed without it: prometheus_client's
own Counter, Gauge and Histogram fed the same updates (the scrape text must be
byte-identical), and the definitions (a counter is the sum of its increments, a
bucket counts the observations <= its bound).
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator

import prometheus_client
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from popproxy.metric_series import (
    CounterFamily,
    GaugeFamily,
    HistogramFamily,
    refuse_negative,
)
from popproxy.metrics import LATENCY_BUCKETS_SECONDS

LABELS = ("listener", "result")
LABEL_VALUES = st.tuples(st.sampled_from(["plain", "tls"]), st.sampled_from(["ok", "err", "x"]))
# Observations on, just beside, between and beyond the bounds, and odd floats.
OBSERVATIONS = st.one_of(
    st.sampled_from(LATENCY_BUCKETS_SECONDS),
    st.sampled_from([math.nextafter(b, 0) for b in LATENCY_BUCKETS_SECONDS]),
    st.sampled_from([math.nextafter(b, math.inf) for b in LATENCY_BUCKETS_SECONDS]),
    st.floats(min_value=0, max_value=100, allow_nan=False),
    st.sampled_from([0.0, -0.0, -1.0, math.inf, -math.inf, math.nan, 1e300]),
)


@pytest.fixture(autouse=True)
def no_created_series() -> Iterator[None]:
    """popproxy's Metrics turns prometheus_client's ``_created`` series off; so do these."""
    prometheus_client.disable_created_metrics()
    yield


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


@given(st.lists(st.tuples(LABEL_VALUES, st.integers(min_value=0, max_value=2**40))))
def test_a_counter_family_exports_what_a_prometheus_counter_does(
    updates: list[tuple[tuple[str, str], int]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    family = CounterFamily("test_events_total", "Events.", LABELS, registry=ours)
    reference = Counter("test_events_total", "Events.", LABELS, registry=theirs)
    expected: dict[tuple[str, str], int] = {}
    for labels, amount in updates:
        family.labels(*labels).value += amount
        reference.labels(*labels).inc(amount)
        expected[labels] = expected.get(labels, 0) + amount
    assert scrape(ours) == scrape(theirs)
    for labels, total in expected.items():
        assert family.labels(*labels).value == total
        sample = dict(zip(LABELS, labels, strict=True))
        assert ours.get_sample_value("test_events_total", sample) == float(total)


@given(st.lists(st.tuples(LABEL_VALUES, st.integers(min_value=-5, max_value=5))))
def test_a_gauge_family_exports_what_a_prometheus_gauge_does(
    updates: list[tuple[tuple[str, str], int]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    family = GaugeFamily("test_open", "Open things.", LABELS, registry=ours)
    reference = Gauge("test_open", "Open things.", LABELS, registry=theirs)
    for labels, change in updates:
        family.labels(*labels).value += change
        reference.labels(*labels).inc(change)
    assert scrape(ours) == scrape(theirs)


@given(st.lists(st.tuples(LABEL_VALUES, OBSERVATIONS)))
def test_a_histogram_family_exports_what_a_prometheus_histogram_does(
    updates: list[tuple[tuple[str, str], float]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    family = HistogramFamily(
        "test_seconds", "Time.", LABELS, buckets=LATENCY_BUCKETS_SECONDS, registry=ours
    )
    reference = Histogram(
        "test_seconds", "Time.", LABELS, buckets=LATENCY_BUCKETS_SECONDS, registry=theirs
    )
    for labels, seconds in updates:
        family.labels(*labels).observe(seconds)
        reference.labels(*labels).observe(seconds)
    assert scrape(ours) == scrape(theirs)


@given(st.lists(OBSERVATIONS))
def test_a_bucket_counts_the_observations_at_or_below_its_bound(observations: list[float]) -> None:
    registry = CollectorRegistry()
    family = HistogramFamily(
        "test_seconds", "Time.", (), buckets=LATENCY_BUCKETS_SECONDS, registry=registry
    )
    series = family.labels()
    for seconds in observations:
        series.observe(seconds)
    for bound in (*LATENCY_BUCKETS_SECONDS, math.inf):
        le = "+Inf" if bound == math.inf else repr(bound)
        at_or_below = sum(1 for seconds in observations if seconds <= bound)
        assert registry.get_sample_value("test_seconds_bucket", {"le": le}) == at_or_below
    counted = [seconds for seconds in observations if not math.isnan(seconds)]
    assert registry.get_sample_value("test_seconds_count") == len(counted)
    total = 0.0
    for seconds in observations:
        total += seconds
    exported = registry.get_sample_value("test_seconds_sum")
    assert exported == total or (
        math.isnan(total) and exported is not None and math.isnan(exported)
    )


def test_series_are_created_once_at_zero_and_exported_in_creation_order() -> None:
    registry = CollectorRegistry()
    family = CounterFamily("test_events_total", "Events.", LABELS, registry=registry)
    second, first = family.labels("tls", "ok"), family.labels("plain", "ok")
    assert family.labels("tls", "ok") is second
    assert first.value == 0 and second.value == 0
    assert scrape(registry).splitlines()[2:] == [
        'test_events_total{listener="tls",result="ok"} 0.0',
        'test_events_total{listener="plain",result="ok"} 0.0',
    ]


def test_label_values_must_be_one_str_per_label_name() -> None:
    family = CounterFamily("test_events_total", "Events.", LABELS, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="expected label values"):
        family.labels("plain")
    with pytest.raises(ValueError, match="expected label values"):
        family.labels("plain", "ok", "extra")
    with pytest.raises(TypeError, match="str"):
        family.labels("plain", 1)  # type: ignore[arg-type]


def test_a_family_reserves_its_names_in_the_registry() -> None:
    registry = CollectorRegistry()
    HistogramFamily("test_seconds", "Time.", (), buckets=(1.0,), registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("test_seconds_count", "Clash.", registry=registry)
    CounterFamily("test_events_total", "Events.", (), registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        CounterFamily("test_events_total", "Again.", (), registry=registry)


@pytest.mark.parametrize(
    "buckets", [(), (1.0, 1.0), (2.0, 1.0), (1.0, math.inf), (-1.0, 1.0), (0.5, math.nan)]
)
def test_buckets_must_be_finite_non_negative_distinct_and_increasing(
    buckets: tuple[float, ...],
) -> None:
    with pytest.raises(ValueError, match="buckets"):
        HistogramFamily("test_seconds", "Time.", (), buckets=buckets, registry=CollectorRegistry())


def test_a_negative_increment_is_refused() -> None:
    refuse_negative(0)
    with pytest.raises(ValueError, match="negative"):
        refuse_negative(-1)


def check_consistent(families: list[Metric], previous: dict[tuple[str, str], float]) -> None:
    """One collection from another thread: histogram buckets cumulative, +Inf equal to
    _count, and no counter or bucket below what an earlier collection saw."""
    samples = {
        (sample.name, sample.labels.get("le", "")): sample.value
        for family in families
        for sample in family.samples
    }
    buckets = [samples[("test_seconds_bucket", le)] for le in ("0.5", "1.0", "+Inf")]
    assert buckets == sorted(buckets)
    assert buckets[-1] == samples[("test_seconds_count", "")]
    for key, value in samples.items():
        if key != ("test_seconds_sum", ""):
            assert value >= previous.get(key, 0), key
    previous.update(samples)


def test_a_collection_from_another_thread_sees_consistent_numbers() -> None:
    """The trio thread counts while another thread collects (the exporter collects in the
    trio thread; this is the worst case, for a collector run elsewhere)."""
    registry = CollectorRegistry()
    counter = CounterFamily("test_events_total", "Events.", (), registry=registry).labels()
    histogram = HistogramFamily(
        "test_seconds", "Time.", (), buckets=(0.5, 1.0), registry=registry
    ).labels()
    updates, collections = 200_000, 300
    started = threading.Event()
    failures: list[BaseException] = []

    def collect_repeatedly() -> None:
        previous: dict[tuple[str, str], float] = {}
        started.set()
        try:
            for _ in range(collections):
                check_consistent(list(registry.collect()), previous)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    # Switch threads every microsecond, not every 5 ms: collections land between the
    # steps of an update, not once per long stretch of them.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        collector = threading.Thread(target=collect_repeatedly)
        collector.start()
        started.wait()
        for n in range(updates):
            counter.value += 1
            histogram.observe((n % 3) * 0.6)  # 0.0, 0.6, 1.2: all three buckets
        collector.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert failures == []
    assert counter.value == updates
    check_consistent(list(registry.collect()), {})
    assert registry.get_sample_value("test_seconds_count") == updates
